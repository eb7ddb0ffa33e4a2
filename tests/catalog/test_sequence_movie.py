"""`video.sequence_fps`: a frame sequence also becomes a movie of its upscaled frames, beside them — frame i at i/fps,
every frame in order, bit depth kept as far as the codec goes, explicit colour tags; made once, remade (without
redoing the frames) when its settings change, and a movie that cannot be made fails its sequence alone."""

from __future__ import annotations

import pathlib

import av
import numpy as np
import pytest
from support.catalog import image_bytes, job_config, manifests, run_index, write_catalog

from media import decode_image, to_float_pixels
from pipeline import sequence_movie
from pipeline.config import validate_config
from pipeline.manifest import utcnow
from pipeline.plan import make_plan
from pipeline.run import EXIT_OK, run_job
from pipeline.spec import RunSpec
from pipeline.storage import Location

SCALE = 2
REEL = {f"reel/frame_{i:04d}.png": image_bytes(24, 16, seed=i) for i in range(1, 9)}  # 8-bit RGB, 8 frames


def png16(seed: int, width: int = 20, height: int = 14) -> bytes:
    """A 16-bit RGB PNG of noise (FFmpeg's PNG encoder: Pillow writes no 16-bit RGB)."""
    pixels = (np.random.default_rng(100 + seed).random((height, width, 3)) * 65535).astype(np.uint16)
    context = av.CodecContext.create("png", "w")
    context.width, context.height, context.pix_fmt = width, height, "rgb48be"
    frame = av.VideoFrame.from_ndarray(pixels, format="rgb48le").reformat(format="rgb48be")
    return b"".join(bytes(packet) for packet in [*context.encode(frame), *context.encode(None)])


SCANS = {f"scans/s_{i:03d}.png": png16(i) for i in range(1, 7)}  # 16-bit RGB, 6 frames


def config(tmp_path: pathlib.Path, **video) -> dict:
    return job_config(str(tmp_path / "in"), str(tmp_path / "out"), upscale={"scale": SCALE},
                      video={"segment_seconds": 0.2, "sequence_folders": ["reel", "scans"], **video})  # 5 frames


def float_frame(data: bytes) -> np.ndarray:
    return to_float_pixels(decode_image(data, "frame", 10**9).pixels)[..., :3]


def movie_frames(path: pathlib.Path) -> tuple[list[float], list[np.ndarray], dict]:
    """Every frame's time (s) and pixels (float RGB, shrunk back by SCALE), and the stream's facts."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        facts = {"codec": context.codec.canonical_name, "pix_fmt": context.pix_fmt, "size": (stream.width,
                 stream.height), "tags": (context.color_primaries, context.color_trc, context.colorspace,
                                          context.color_range)}
        times, frames = [], []
        for frame in container.decode(stream):
            times.append(float(frame.pts * frame.time_base))
            pixels = frame.to_ndarray(format="rgb48le").astype(np.float32) / 65535
            height, width = pixels.shape[0] // SCALE, pixels.shape[1] // SCALE
            frames.append(pixels.reshape(height, SCALE, width, SCALE, 3).mean(axis=(1, 3)))
    return times, frames, facts


def check_movie(path: pathlib.Path, sources: list[bytes], fps: float) -> dict:
    """As many frames as the sequence, frame i at i/fps, and frame i shrunk back matches source frame i best."""
    times, frames, facts = movie_frames(path)
    assert len(frames) == len(sources)
    assert max(abs(t - i / fps) for i, t in enumerate(times)) <= 0.001, times
    originals = [float_frame(data) for data in sources]
    for i, frame in enumerate(frames):
        errors = [np.abs(frame - original).mean() for original in originals]
        assert int(np.argmin(errors)) == i, (i, errors)
    return facts


@pytest.mark.slow  # a whole job; the movie's settings, keys and failures are checked without one below
def test_sequences_become_movies_of_their_upscaled_frames(ray_local, tmp_path):
    write_catalog(tmp_path / "in", {**REEL, **SCANS})
    assert run_job(validate_config(config(tmp_path, sequence_fps=24))) == EXIT_OK
    out = tmp_path / "out"
    rows = manifests(out)
    sequences = rows[rows.unit == "sequence"].set_index("source_key")
    assert set(sequences.status) == {"ok"}, sequences[["status", "error_type", "error_message"]]
    assert dict(sequences.movie_key) == {"reel/frame_%04d.png": "reel/frame.mp4", "scans/s_%03d.png": "scans/s.mp4"}
    assert rows[rows.unit == "segment"].movie_key.isna().all()

    reel = sequences.loc["reel/frame_%04d.png"]
    assert (reel.codec, reel.frames_out) == ("h264", 8) and reel.duration_out == pytest.approx(8 / 24)
    assert "reel/frame.mp4: h264 yuv420p, 8 frames at 24 fps" in reel.processing
    facts = check_movie(out / "reel/frame.mp4", list(REEL.values()), 24)
    assert facts["size"] == (24 * SCALE, 16 * SCALE) and facts["pix_fmt"] == "yuv420p"
    # Explicit tags: BT.709 primaries and transfer (sRGB's), BT.601 matrix below 720 lines, limited range.
    assert facts["tags"] == (1, 1, 6, 1)

    scans = sequences.loc["scans/s_%03d.png"]
    assert (scans.codec, scans.frames_out) == ("hevc", 6) and scans.duration_out == pytest.approx(6 / 24)
    facts = check_movie(out / "scans/s.mp4", list(SCANS.values()), 24)
    assert facts["pix_fmt"] == "yuv420p10le" and facts["tags"] == (1, 1, 6, 1)  # 16-bit frames: a 10-bit movie
    for key, data in {**REEL, **SCANS}.items():  # the frames are still there, in their own format and depth
        frame, source = decode_image((out / key).read_bytes(), key, 10**9).info, decode_image(data, key, 10**9).info
        assert (frame.format, frame.bit_depth, frame.width, frame.height) == \
            (source.format, source.bit_depth, source.width * SCALE, source.height * SCALE)


@pytest.mark.slow
def test_a_movie_is_made_once_and_never_redoes_the_frames(ray_local, tmp_path):
    write_catalog(tmp_path / "in", {**REEL, **SCANS})
    assert run_job(validate_config(config(tmp_path))) == EXIT_OK  # without the setting: frames only
    out = tmp_path / "out"
    first = manifests(out)
    assert sorted(first[first.unit == "sequence"].source_key) == ["reel/frame_%04d.png", "scans/s_%03d.png"]
    assert first.movie_key.isna().all() and not list(out.rglob("*.mp4"))
    frames_written = {key: (out / key).stat().st_mtime_ns for key in [*REEL, *SCANS]}

    assert run_job(validate_config(config(tmp_path, sequence_fps=25))) == EXIT_OK  # the movie only
    run = run_index(out).iloc[-1]
    rows = manifests(out)
    rows = rows[rows.run_id == run.run_id]
    assert set(rows.unit) == {"sequence"} and set(rows.status) == {"ok"}  # no segment redone
    assert {key: (out / key).stat().st_mtime_ns for key in frames_written} == frames_written
    check_movie(out / "reel/frame.mp4", list(REEL.values()), 25)
    check_movie(out / "scans/s.mp4", list(SCANS.values()), 25)

    movies = {key: (out / key).read_bytes() for key in ("reel/frame.mp4", "scans/s.mp4")}
    assert run_job(validate_config(config(tmp_path, sequence_fps=25))) == EXIT_OK  # unchanged: nothing to do
    run = run_index(out).iloc[-1]
    assert run.skipped == 2 and not (manifests(out).run_id == run.run_id).any()
    assert {key: (out / key).read_bytes() for key in movies} == movies
    (out / "scans/s.mp4").unlink()  # a movie gone: made again, from the committed frames
    assert run_job(validate_config(config(tmp_path, sequence_fps=25))) == EXIT_OK
    assert (out / "scans/s.mp4").read_bytes() == movies["scans/s.mp4"]  # same frames, same settings: same bytes


def test_movie_settings_enter_the_sequence_fingerprint_only():
    base = {"input": {"uri": "in"}, "output": {"uri": "out"}}

    def fingerprints(**video) -> tuple[str, str, str]:
        spec = RunSpec.resolve(validate_config({**base, "video": video}), "run")
        return tuple(spec.unit_fingerprint(unit, "image") for unit in ("sequence", "sequence_frames", "video"))

    plain = fingerprints()
    assert plain[0] == plain[1]  # no movie: a sequence is its frames (earlier runs' rows stay valid)
    movies = [fingerprints(sequence_fps=24), fingerprints(sequence_fps="24000/1001"),
              fingerprints(sequence_fps=24, crf=23), fingerprints(sequence_fps=24, codec="ffv1")]
    assert len({sequence for sequence, _, _ in movies} | {plain[0]}) == 5
    assert {frames for _, frames, _ in movies} == {plain[1]}  # the frames are not redone
    assert {video for _, _, video in movies[:2]} == {plain[2]}  # videos do not depend on it
    assert fingerprints(sequence_fps=24) == fingerprints(sequence_fps=24.0)
    with pytest.raises(Exception, match="video.sequence_fps"):
        validate_config({**base, "video": {"sequence_fps": "fast"}})
    with pytest.raises(Exception, match="video.sequence_fps"):
        validate_config({**base, "video": {"sequence_fps": 0}})


def test_movie_keys_come_from_the_sequence_key_and_collisions_are_rejected(tmp_path):
    spec = RunSpec.resolve(validate_config({"input": {"uri": "in"}, "output": {"uri": "out"},
                                            "video": {"sequence_fps": 25}}), "run")
    assert [sequence_movie.movie_key(key, spec.video) for key in
            ("reels/coffee/frame_%04d.png", "reels/coffee/%06d.dpx", "%04d.png", "plate.%04d.exr")] == \
        ["reels/coffee/frame.mp4", "reels/coffee/coffee.mp4", "sequence.mp4", "plate.mp4"]
    prores = RunSpec.resolve(validate_config({"input": {"uri": "in"}, "output": {"uri": "out"},
                                              "video": {"sequence_fps": 25, "codec": "prores"}}), "run")
    assert sequence_movie.movie_key("r/f_%04d.png", prores.video) == "r/f.mov"

    # Two sequences whose movies would share a key: the second fails at planning, its frames untouched.
    write_catalog(tmp_path / "in", {**{f"reel/f_{i}.png": image_bytes(8, 6, seed=i) for i in range(1, 4)},
                                    **{f"reel/f_{i}.jpg": image_bytes(8, 6, "JPEG", seed=i) for i in range(1, 4)}})
    cfg = validate_config(config(tmp_path, sequence_fps=25))
    plan = make_plan(RunSpec.resolve(cfg, "run"))
    assert [clip.movie_key for clip in plan.clips.values()] == ["reel/f.mp4"]
    (rejected,) = plan.rejected
    assert rejected["error_type"] == "output_collision" and "reel/f.mp4" in rejected["error_message"]


def test_a_movie_that_cannot_be_made_fails_its_sequence(tmp_path, monkeypatch):
    """Called as the Ray task would be: a frame that cannot be read back fails the sequence as encode_failed, a
    commit that fails as write_failed; nothing is left at the movie's key."""
    out = tmp_path / "out"
    write_catalog(out, {f"reel/f_{i}.png": image_bytes(16, 12, seed=i) for i in range(1, 5)})
    (out / "reel/f_3.png").write_bytes(b"not a png")
    cfg = validate_config(config(tmp_path, sequence_fps=24))
    spec = RunSpec.resolve(cfg, "run")
    output = Location(str(out), {})
    row = {"source_key": "reel/f_%d.png", "status": "ok", "started_at": utcnow()}
    keys = [f"reel/f_{i}.png" for i in range(1, 5)]
    failed = sequence_movie.write_movie(row, keys, "reel/f.mp4", output, spec)
    assert (failed["status"], failed["error_type"], failed["movie_key"]) == ("failed", "encode_failed", "reel/f.mp4")
    assert "reel/f_3.png" in failed["error_message"]
    assert sorted(p.name for p in (out / "reel").iterdir()) == [f"f_{i}.png" for i in range(1, 5)]  # no temp

    (out / "reel/f_3.png").write_bytes(image_bytes(16, 12, seed=3))

    def refuse(self, key, path):
        raise PermissionError(f"cannot write {key}")

    monkeypatch.setattr(Location, "commit_file", refuse)
    failed = sequence_movie.write_movie(row, keys, "reel/f.mp4", output, spec)
    assert (failed["status"], failed["error_type"]) == ("failed", "write_failed")
    assert "PermissionError" in failed["error_message"]
    assert sorted(p.name for p in (out / "reel").iterdir()) == [f"f_{i}.png" for i in range(1, 5)]
