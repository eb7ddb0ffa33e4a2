"""Every error_type a unit of work can fail with, in one job, each bad input sharing its batches with good ones
that still come out right: a bad input fails alone, classified."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from support import video_clips
from support.catalog import image_bytes, job_config, manifests, small_catalog, write_catalog

import media
from pipeline.config import validate_config
from pipeline.engine import BicubicEngine
from pipeline.run import execute, prepare

# A baseline TIFF whose directory is damaged (two bytes changed, found by fuzzing): Pillow's TIFF plugin raises a
# TypeError ("Missing dimensions") that no media classification expects, so it is the catch-all decode_failed.
UNEXPECTED_DECODER_ERROR = base64.b64decode(
    "SUkqAAgAAAAKAAABBAABAAAABwAAAAEBBAABAAAACQAAAAIBAwADAAAAhgAAAAMBAwABAAAAAQAAAAYBAwABAAAAAgAAABEBBAABAAAAjAAAAB"
    "UBAwABAAAAAwAAABYBBAABAAAACQAAABcBBAABAAAAvQAAABwBAwABAAAAAQAAAAAGAAAIAAgACABfgsLZz+sPoyHX2YL4vRBFuOjNTqk9fQod"
    "8EITtic7BDtR3ix4ejLQThxApnlZqul/su2AcXtMm0WagvhfScC6v3/coecBK4vtv1aPB+hg70w3AEdNx9vQsJC+q2h4swDw9eZkv9h+2x+V54"
    "1zEJkIedPPwwezyrqmJ7nYScT3LA5/2xY6S/ncLnmo1dkznYo4EpUUIOu5TPHWJnvPOjVsDKM6Zz31Pwdoyl4BYAfRH6jrHgKpCq6ru+KOhjo=")


def _huge_exif_png() -> bytes:
    """A valid PNG whose EXIF (70 kB: a long UserComment) cannot fit a JPEG's 64 kB APP1 segment."""
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif[0x9286] = b"x" * 70_000
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), 128, np.uint8)).save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


def _ppm_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 60, np.uint8)).save(buffer, "PPM")
    return buffer.getvalue()


EXPECTED = {  # source -> error_type (engine behaviours: catalog_test_engines.faulty_by_width)
    "bad/read_failed.png": "read_failed",  # replaced by a folder after listing: reading it fails (not missing)
    "bad/missing_source.png": "missing_source",  # deleted after listing
    "bad/decode_failed.tif": "decode_failed",
    "bad/unsupported.png": "unsupported",  # a PPM file under a PNG name
    "bad/engine_failed.png": "engine_failed",  # 11 px: the engine raises
    "bad/engine_wrong_size.png": "engine_failed",  # 17 px: the engine returns the wrong size
    "bad/out_of_memory.png": "out_of_memory",  # 13 px: torch.cuda.OutOfMemoryError
    "bad/encode_failed.png": "encode_failed",  # its EXIF is too long for a JPEG
    "bad/too_large_for_format.png": "too_large_for_format",  # 32760 px wide: 65520 px as JPEG, limit 65500
    "bad/write_failed.png": "write_failed",  # a folder occupies its output key
    "oom.mp4": "out_of_memory",  # video segments: 22 px, out of memory
    "blocked.mp4": "write_failed",  # its segments upscale fine; a folder occupies the assembled film's key
    "crash/f_%03d.png": "engine_failed",  # sequence segments: 11 px frames, the engine raises
}


def test_every_error_type_fails_alone_beside_good_batch_mates(ray_local, tmp_path):
    source = tmp_path / "in"
    good = small_catalog(6)
    write_catalog(source, {
        **good,
        "bad/read_failed.png": image_bytes(6, 4, seed=20),
        "bad/missing_source.png": image_bytes(6, 4, seed=21),
        "bad/decode_failed.tif": UNEXPECTED_DECODER_ERROR,
        "bad/unsupported.png": _ppm_bytes(),
        "bad/engine_failed.png": image_bytes(11, 4, seed=22),
        "bad/engine_wrong_size.png": image_bytes(17, 4, seed=23),
        "bad/out_of_memory.png": image_bytes(13, 4, seed=24),
        "bad/encode_failed.png": _huge_exif_png(),
        "bad/too_large_for_format.png": image_bytes(32760, 1, seed=25),
        "bad/write_failed.png": image_bytes(6, 4, seed=26),
        **{f"crash/f_{i:03d}.png": image_bytes(11, 6, seed=30 + i) for i in (1, 2, 3)},
        **{f"reel/f_{i:03d}.png": image_bytes(8, 6, seed=40 + i) for i in (1, 2, 3)},
    })
    video_clips.write_clip(source / "oom.mp4", frames=4, size=(22, 16))
    video_clips.write_clip(source / "blocked.mp4", frames=4, size=(8, 6))
    config = job_config(str(source), str(tmp_path / "out"), model={"path": "support.engines:faulty_by_width"},
                        output={"format": "jpeg"},
                        video={"segment_seconds": 0.08, "sequence_folders": ["crash", "reel"]},
                        # one batch per stage: every bad unit shares its batches with the good ones
                        compute={"batch_size": 64, "actors": {"min": 1, "max": 1}})
    cfg = validate_config(config)
    plan = prepare(cfg)
    assert not plan.rejected  # every failure below happens in the job's stages, not at planning
    (source / "bad/missing_source.png").unlink()
    (source / "bad/read_failed.png").unlink()
    (source / "bad/read_failed.png").mkdir()
    (tmp_path / "out/bad/write_failed.jpg").mkdir(parents=True)
    (tmp_path / "out/bad/write_failed.jpg/occupied").write_bytes(b"")
    (tmp_path / "out/blocked.mp4").mkdir()
    summary = execute(plan)
    assert (summary["ok"], summary["failed"]) == (len(good) + 1, len(EXPECTED))

    rows = manifests(tmp_path / "out")
    final = rows[rows.unit != "segment"].set_index("source_key")
    failed = final[final.status == "failed"]
    assert dict(zip(failed.index, failed.error_type)) == EXPECTED
    assert failed.error_message.str.len().min() > 10
    assert "OutOfMemoryError: CUDA out of memory" in failed.loc["bad/out_of_memory.png"].error_message
    assert "EXIF data is too long" in failed.loc["bad/encode_failed.png"].error_message

    # the good batch-mates: ok, and exactly the bytes the bicubic engine gives them alone
    ok = final[final.status == "ok"]
    assert sorted(ok.index) == sorted([*good, "reel/f_%03d.png"])
    engine = BicubicEngine({"scale": 2})
    for key, data in good.items():
        decoded = media.decode_image(data, key, 10**6)
        expected = media.encode_image(engine.upscale(media.to_float_pixels(decoded.pixels), seed=0, prompt=""),
                                      decoded.info, "jpeg", 95)[0]
        assert (tmp_path / "out" / ok.loc[key].output_key).read_bytes() == expected, key
    assert sorted(p.name for p in (tmp_path / "out/reel").iterdir()) == ["f_001.png", "f_002.png", "f_003.png"]
    # nothing of a failed unit is presented as an output
    assert [p.name for p in (tmp_path / "out/bad").iterdir()] == ["write_failed.jpg"]  # the blocking folder only
    assert not (tmp_path / "out/oom.mp4").exists() and not (tmp_path / "out/crash").exists()
