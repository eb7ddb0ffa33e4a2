"""Videos and frame sequences through the catalog job: faithful outputs in a mixed catalog, bad inputs failing
alone, one noise field per clip across segments, settings that redo only what they affect."""

from __future__ import annotations

import pathlib

import av
import numpy as np
import pytest
from PIL import Image
from support import video_clips, video_corpus
from support.catalog import image_bytes, job_config, manifests, run_index, write_catalog

from media import video
from pipeline.config import validate_config
from pipeline.run import EXIT_INPUTS_FAILED, EXIT_OK, run_job

SCALE = 2


def video_config(tmp_path: pathlib.Path, **sections) -> dict:
    return job_config(str(tmp_path / "in"), str(tmp_path / "out"),
                      video={"segment_seconds": 0.2, **sections.pop("video", {})}, upscale={"scale": SCALE},
                      **sections)


def packets(path: pathlib.Path, kind: str) -> list[tuple[float | None, bytes]]:
    """(pts in seconds, payload) of every packet of the streams of one kind."""
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == kind]
        if not streams:  # demux([]) would demux every stream
            return []
        return [(float(p.pts * p.time_base) if p.pts is not None else None, bytes(p))
                for p in container.demux(streams) if p.size]


def frame_times(path: pathlib.Path) -> list[float]:
    with av.open(str(path)) as container:
        return sorted(round(float(f.pts * f.time_base), 6) for f in container.decode(video=0))


def decoded(path: pathlib.Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24").astype(np.float32) / 255 for f in container.decode(video=0)]


def video_stream_facts(path: pathlib.Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        # yuvj* is FFmpeg's deprecated spelling of a full-range tag: the range is compared on its own.
        return {"size": (stream.width, stream.height), "pix_fmt": context.pix_fmt.replace("yuvj", "yuv"),
                "range": context.color_range, "primaries": context.color_primaries, "trc": context.color_trc,
                "matrix": context.colorspace, "rotation": video.index_video(str(path), path.name).rotation}


@pytest.mark.slow
def test_mixed_catalog_keeps_what_each_source_had(ray_local, tmp_path):
    clips = tmp_path / "in" / "clips"
    clips.mkdir(parents=True)
    sources = {
        "clips/audio.mp4": video_clips.audio_clip(clips),
        "clips/subtitles.mkv": video_clips.subtitle_clip(clips),
        "clips/vfr.mp4": video_clips.vfr_clip(clips),
        "clips/ten_bit.mkv": video_clips.ten_bit_clip(clips),
        "clips/rotated.mp4": video_clips.rotated_clip(clips),
        "clips/full_range.mp4": video_clips.full_range_clip(clips),
        "clips/tagged.mp4": video_clips.tagged_clip(clips, "bt709", name="tagged.mp4"),
    }
    reel = {f"reel/frame_{i:05d}.png": image_bytes(12, 8, seed=i) for i in range(1, 8)}
    sixteen = {}
    for i in range(1, 4):
        buffer = __import__("io").BytesIO()
        Image.fromarray((np.random.default_rng(i).random((6, 10)) * 65535).astype(np.uint16)).save(buffer, "PNG")
        sixteen[f"scans/s{i}.png"] = buffer.getvalue()
    write_catalog(tmp_path / "in", {"photo.png": image_bytes(9, 7), **reel, **sixteen})
    config = video_config(tmp_path, video={"sequence_folders": ["reel", "scans"]})
    assert run_job(validate_config(config)) == EXIT_OK

    rows = manifests(tmp_path / "out")
    final = rows[rows.unit != "segment"]
    assert sorted(final.source_key) == sorted([*sources, "photo.png", "reel/frame_%05d.png", "scans/s%d.png"])
    assert set(final.status) == {"ok"} and final.source_key.is_unique  # one ok row per input
    segments = rows[rows.unit == "segment"]
    assert set(segments.status) == {"staged"} and segments.unit_key.is_unique
    assert (segments.groupby("source_key").seed.nunique() == 1).all()  # one seed per clip, every segment
    out = tmp_path / "out"
    assert not (out / "_staging").exists()  # staged segments are removed once their clip is committed

    for key, source in sources.items():
        output = out / key
        assert frame_times(output) == frame_times(source), key  # same frames at the same times (VFR too)
        for kind in ("audio", "subtitle"):
            assert packets(output, kind) == packets(source, kind), f"{key}: {kind} not copied packet for packet"
        facts, source_facts = video_stream_facts(output), video_stream_facts(source)
        assert facts["size"] == tuple(side * SCALE for side in source_facts["size"]), key
        assert (facts["pix_fmt"], facts["rotation"]) == (source_facts["pix_fmt"], source_facts["rotation"]), key
        tags = ("range", "primaries", "trc", "matrix")
        if source_facts["matrix"] == 2:  # untagged: the output states the matrix it was decoded with (SD: BT.601)
            assert (facts["matrix"], facts["range"]) == (6, source_facts["range"] or 1), key
        else:
            assert {k: facts[k] for k in tags} == {k: source_facts[k] for k in tags}, key
        row = final[final.source_key == key].iloc[0]
        assert (row.frames_in, row.frames_out) == (len(frame_times(source)),) * 2
        assert row.duration_out == pytest.approx(row.duration_in, abs=1e-3)
    assert video_stream_facts(out / "clips/ten_bit.mkv")["pix_fmt"] == "yuv420p10le"
    assert video_stream_facts(out / "clips/full_range.mp4")["range"] == 2
    assert video_stream_facts(out / "clips/rotated.mp4")["rotation"] == 90
    audio_row = final[final.source_key == "clips/subtitles.mkv"].iloc[0]
    assert "subtitle:ass" in audio_row.streams_copied and "audio:aac" in audio_row.streams_copied

    for key in reel:  # a sequence comes back as a sequence: same names, format, size x2
        assert Image.open(out / key).size == (24, 16)
    for key in sixteen:
        assert Image.open(out / key).mode in ("I;16", "I")  # 16-bit stays 16-bit
        assert Image.open(out / key).size == (20, 12)


def test_bad_videos_and_sequences_fail_alone(ray_local, tmp_path):
    clips = tmp_path / "in"
    clips.mkdir()
    video_clips.moving_clip(clips, "good.mp4")
    video_clips.truncated_clip(clips, "truncated.mp4")
    video_clips.audio_only_file(clips, "audio_only.mp4")
    video_clips.zero_frame_clip(clips, "zero.mkv")
    corrupt, _ = video_clips.corrupt_packet_clip(clips, "corrupt.mkv")
    video_clips.unsupported_codec_clip(clips, "avs2.mkv")
    (clips / "notes.mp4").write_text("minutes of the restoration meeting\n" * 20)
    video_clips.write_clip(clips / "long.mp4", frames=75)  # 3 s, above the limit below
    video_clips.write_clip(clips / "huge.mp4", size=(160, 96))  # above the output pixel limit below
    write_catalog(clips, {**{f"gap/f_{i:03d}.png": image_bytes(8, 8, seed=i) for i in (1, 2, 4)},
                          **{f"mixed/f_{i:03d}.png": image_bytes(8 + (i == 3), 8, seed=i) for i in (1, 2, 3)}})
    config = video_config(tmp_path, video={"sequence_folders": ["gap", "mixed"]},
                          limits={"max_video_seconds": 2.0, "max_output_pixels": 64 * 36 * SCALE * SCALE})
    assert run_job(validate_config(config)) == EXIT_INPUTS_FAILED
    rows = manifests(tmp_path / "out")
    final = rows[rows.unit != "segment"].set_index("source_key")
    assert final.loc["good.mp4"].status == "ok"
    expected = {"truncated.mp4": "truncated", "audio_only.mp4": "no_video_stream", "zero.mkv": "zero_frames",
                "corrupt.mkv": "corrupt", "avs2.mkv": "unsupported_codec", "notes.mp4": "not_a_video",
                "long.mp4": "too_long", "huge.mp4": "output_too_large", "gap/f_%03d.png": "sequence_gap",
                "mixed/f_%03d.png": "sequence_mixed_sizes"}
    failed = final[final.status == "failed"]
    assert dict(zip(failed.index, failed.error_type)) == expected
    assert all(failed.error_message.str.len() > 10)
    assert "frames" in final.loc["corrupt.mkv"].error_message  # names where the damage is


@pytest.mark.slow  # the codec layer's conformance runs in the fast tier (test_video_conformance)
def test_archive_footage_comes_out_ok_through_the_job(ray_local, tmp_path):
    """What archives hold, through the whole job (read tasks, actors, staging, assembly): a start-trimmed MP4, a
    ProRes master, interlaced MPEG-2 in a TS starting at 3 h. Each is `ok`, keeps its frames, and the manifest says
    what was done besides upscaling."""
    folder = tmp_path / "in" / "archive"
    folder.mkdir(parents=True)
    made = {kind: getattr(video_corpus, kind)(folder)[0] for kind in ("mp4_edit_list", "prores_422_hq", "mpeg2_tff_ts")}
    assert run_job(validate_config(video_config(tmp_path))) == EXIT_OK
    rows = manifests(tmp_path / "out")
    clips = rows[rows.unit == "video"].set_index("source_key")
    assert set(clips.status) == {"ok"}, clips[["status", "error_type", "error_message"]]
    for kind, path in made.items():
        row = clips.loc[f"archive/{path.name}"]
        source = video.index_video(str(path), path.name)
        out = tmp_path / "out" / row.output_key
        result = video.index_video(str(out), out.name)
        assert result.frames == row.frames_out == source.frames, kind
        times = [float(t * result.time_base) for t in result.pts]
        expected = [float(t * source.time_base - source.clock_offset) for t in source.pts]
        assert max(abs(a - b) for a, b in zip(times, expected, strict=True)) <= 0.001, kind
    processing = clips.loc["archive/mpeg2_tff.ts"].processing
    assert processing.startswith("deinterlaced (bwdif, frame rate, tt field order); timestamps from the file's start "
                                 "(its clock starts at 10799.99"), processing  # the MP2 track starts 10 ms early
    assert clips.loc["archive/mpeg2_tff.ts"].output_key.endswith(".mkv")
    assert clips.loc["archive/prores_422_hq.mov"].output_key.endswith(".mov")


@pytest.mark.slow
def test_field_rate_deinterlacing_through_the_job(ray_local, tmp_path):
    """`video.deinterlace_rate: field` through the whole job, in segments of 4 frames: interlaced clips come out with
    a frame per field at its field's time (the TS's clock removed), the progressive clip as before, and the manifest
    says so."""
    folder = tmp_path / "in"
    folder.mkdir()
    made = {kind: getattr(video_corpus, kind)(folder)[0]
            for kind in ("mpeg2_tff_ts", "dv_pal_bff_avi", "mp4_edit_list")}
    config = video_config(tmp_path, video={"deinterlace_rate": "field", "segment_seconds": 0.16})
    assert run_job(validate_config(config)) == EXIT_OK
    rows = manifests(tmp_path / "out")
    clips = rows[rows.unit == "video"].set_index("source_key")
    assert set(clips.status) == {"ok"}, clips[["status", "error_type", "error_message"]]
    for kind, path in made.items():
        row = clips.loc[path.name]
        source = video.index_video(str(path), path.name)
        timeline = video.field_rate_index(source) if source.interlaced else source
        out = tmp_path / "out" / row.output_key
        result = video.index_video(str(out), out.name)
        assert result.frames == row.frames_out == timeline.frames == source.frames * (1 + source.interlaced), kind
        times = [float(t * result.time_base) for t in result.pts]
        expected = [float(t * timeline.time_base - timeline.clock_offset) for t in timeline.pts]
        assert max(abs(a - b) for a, b in zip(times, expected, strict=True)) <= 0.001, kind
        assert result.field_order == "progressive", kind
    assert clips.loc["mpeg2_tff.ts"].processing.startswith(
        "deinterlaced (bwdif, field rate: one frame per field, tt field order)")
    assert clips.loc["dv_pal_bff.avi"].processing.startswith("deinterlaced (bwdif, field rate: one frame per field")


@pytest.mark.slow
def test_one_noise_field_per_clip_hides_segment_boundaries(ray_local, tmp_path):
    """Bundled DiT4SR on a moving clip, lossless FFV1 output: consistent noise makes frame pairs that straddle a
    segment boundary differ no more than pairs inside a segment, and flickers less than a seed per frame."""
    (tmp_path / "in").mkdir()
    video_clips.write_clip(tmp_path / "in" / "pan.mkv", frames=12, size=(24, 16))
    results = {}
    for noise in ("consistent", "independent"):
        config = video_config(tmp_path, model={"path": "bundled"}, output={"uri": str(tmp_path / noise)},
                              video={"noise": noise, "codec": "ffv1", "segment_seconds": 0.16},  # 4 frames
                              compute={"torch_threads": 2})
        assert run_job(validate_config(config)) == EXIT_OK
        rows = manifests(tmp_path / noise)
        assert (rows.unit == "segment").sum() == 3
        frames = decoded(tmp_path / noise / "pan.mkv")
        pairs = np.array([np.abs(b - a).mean() for a, b in zip(frames, frames[1:])])
        results[noise] = (pairs, rows[rows.unit == "video"].iloc[0].flicker)
    pairs, flicker = results["consistent"]
    boundaries = [3, 7]  # pairs (3, 4) and (7, 8) straddle the segments [0, 4), [4, 8), [8, 12)
    inside = np.delete(pairs, boundaries)
    assert pairs[boundaries].max() <= inside.max()
    independent_pairs, independent_flicker = results["independent"]
    assert flicker < independent_flicker and pairs.mean() < independent_pairs.mean()


@pytest.mark.slow
def test_video_settings_redo_videos_only_and_segment_length_is_a_video_setting(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    video_clips.moving_clip(tmp_path / "in", "clip.mp4")
    write_catalog(tmp_path / "in", {"photo.png": image_bytes(9, 7)})
    assert run_job(validate_config(video_config(tmp_path))) == EXIT_OK
    first = (tmp_path / "out" / "clip.mp4").read_bytes()

    def latest_run(config: dict) -> dict[str, str]:
        """Status per input of a new run (skipped inputs have no rows: the run index counts them)."""
        assert run_job(validate_config(config)) == EXIT_OK
        run = run_index(tmp_path / "out").iloc[-1]
        rows = manifests(tmp_path / "out")
        rows = rows[(rows.run_id == run.run_id) & (rows.unit != "segment")]
        statuses = dict(zip(rows.source_key, rows.status))
        assert run.skipped == 2 - len(statuses)
        return {key: statuses.get(key, "skipped") for key in ("clip.mp4", "photo.png")}

    assert latest_run(video_config(tmp_path)) == {"clip.mp4": "skipped", "photo.png": "skipped"}
    assert latest_run(video_config(tmp_path, compute={"batch_size": 1, "actors": {"min": 1, "max": 1}},
                                   video={"frames_per_call": 2})) == \
        {"clip.mp4": "skipped", "photo.png": "skipped"}  # operational settings change nothing
    assert latest_run(video_config(tmp_path, video={"crf": 30})) == {"clip.mp4": "ok", "photo.png": "skipped"}
    assert (tmp_path / "out" / "clip.mp4").read_bytes() != first
    assert latest_run(video_config(tmp_path, video={"crf": 30, "segment_seconds": 0.5})) == \
        {"clip.mp4": "ok", "photo.png": "skipped"}
    assert latest_run(video_config(tmp_path)) == {"clip.mp4": "ok", "photo.png": "skipped"}
    assert (tmp_path / "out" / "clip.mp4").read_bytes() == first  # same settings, same bytes


@pytest.mark.slow
def test_staged_segments_of_videos_no_longer_listed_are_swept(ray_local, tmp_path):
    """A film deleted (or renamed) after some of its segments were staged: they would never be assembled."""
    (tmp_path / "in").mkdir()
    video_clips.moving_clip(tmp_path / "in", "kept.mp4")
    staging = tmp_path / "out" / "_staging"
    orphans = [staging / "deleted.mp4" / "000000000-000000005.nut", staging / "tapes" / "old.mp4" / "0-5.nut"]
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a staged segment")
    assert run_job(validate_config(video_config(tmp_path))) == EXIT_OK
    assert (tmp_path / "out" / "kept.mp4").exists()
    assert not any(path.exists() for path in orphans) and not list(staging.rglob("*.nut"))


@pytest.mark.slow
def test_videos_and_sequences_on_s3(ray_local, bucket, s3_options, tmp_path):
    """Segments read by ranged GETs, staged and assembled through a real S3 API (moto over HTTP)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    source = video_clips.audio_clip(tmp_path)
    fs.put_file(str(source), f"{bucket}/in/tapes/audio.mp4")
    for i in range(1, 4):
        fs.pipe_file(f"{bucket}/in/reel/f_{i}.png", image_bytes(8, 6, seed=i))
    config = job_config(f"s3://{bucket}/in", f"s3://{bucket}/out", upscale={"scale": SCALE},
                        video={"segment_seconds": 0.3, "sequence_folders": ["reel"]})
    config["input"]["storage_options"] = config["output"]["storage_options"] = s3_options
    assert run_job(validate_config(config)) == EXIT_OK
    output = tmp_path / "out.mp4"
    fs.get_file(f"{bucket}/out/tapes/audio.mp4", str(output))
    assert frame_times(output) == frame_times(source)
    assert packets(output, "audio") == packets(source, "audio")
    assert not fs.glob(f"{bucket}/out/_staging/**")
    assert sorted(fs.ls(f"{bucket}/out/reel")) == [f"{bucket}/out/reel/f_{i}.png" for i in range(1, 4)]
    assert run_job(validate_config(config)) == EXIT_OK  # re-run: everything skipped, nothing indexed
