"""Video indexing in Ray tasks (pipeline/video_index.py) and decoded-once clips through the catalog job: an indexed,
unchanged source is not read again, a changed one is, the tasks' indexes and errors are the driver's, too-long films
stop at their headers, and a single-keyframe film comes out exactly as on the packet-copy path."""

from __future__ import annotations

import os
import pathlib

import av
import pytest
from support import video_clips, video_corpus
from support.catalog import job_config, manifests

from media import video
from media.video import mezzanine
from pipeline import video_index
from pipeline.config import validate_config
from pipeline.plan import make_plan
from pipeline.planner import STAGING_DIR
from pipeline.run import EXIT_INPUTS_FAILED, EXIT_OK, run_job
from pipeline.spec import RunSpec


def plan_of(cfg, **options):
    return make_plan(RunSpec.resolve(cfg, "r"), **options)


def config(tmp_path: pathlib.Path, output: str = "out", **sections):
    return validate_config(job_config(str(tmp_path / "in"), str(tmp_path / output), upscale={"scale": 2},
                                      video={"segment_seconds": 0.4, **sections.pop("video", {})}, **sections))


def kept_indexes(output: pathlib.Path) -> list[str]:
    return sorted(p.name for p in (output / video_index.INDEX_DIR).glob("*.json.gz"))


@pytest.mark.slow  # three jobs; the tasks' indexes themselves are checked in the fast tier below
def test_unchanged_videos_are_indexed_once_and_changed_ones_again(ray_local, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    moving = video_clips.moving_clip(source)
    vfr = video_clips.vfr_clip(source)
    video_clips.ten_bit_clip(source)
    (source / "notes.mp4").write_text("minutes of the restoration meeting\n" * 20)
    cfg = config(tmp_path)

    first = plan_of(cfg)
    stats = first.video_indexing
    assert stats.tasks >= 1  # Ray is up: indexed in tasks, not on the driver
    assert (stats.videos, stats.indexed, stats.cached, stats.failed) == (4, 3, 0, 1)
    assert len(kept_indexes(tmp_path / "out")) == 3  # failures are not kept: the next run tries again

    # Not committed yet (no run executed): the next plan reads the kept indexes, not the videos.
    second = plan_of(cfg)
    assert (second.video_indexing.indexed, second.video_indexing.cached) == (0, 3)
    assert [r["error_type"] for r in second.rejected] == ["not_a_video"]

    # Proof that the file is not opened: other bytes under the same size and mtime (what identifies a version)
    # still plan from the kept index; reading them would fail as not_a_video.
    stat = moving.stat()
    moving.write_bytes(bytes(stat.st_size))
    os.utime(moving, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    third = plan_of(cfg)
    assert third.clips["moving.mp4"].row["seed"] == first.clips["moving.mp4"].row["seed"]
    assert third.video_indexing.cached == 3

    # A changed file (new mtime) is indexed again, and its old index is swept when the run starts.
    video_clips.write_clip(vfr, frames=40)
    os.utime(vfr, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fourth = plan_of(cfg)
    assert (fourth.video_indexing.indexed, fourth.video_indexing.cached) == (1, 2)
    assert fourth.clips["vfr.mp4"].index.frames == 40 and first.clips["vfr.mp4"].index.frames == 30
    stale = [key for key in fourth.stale_staging if key.startswith(video_index.INDEX_DIR)]
    assert len(stale) == 1 and len(kept_indexes(tmp_path / "out")) == 4
    vfr.unlink()  # a video that disappears: its index goes too
    fifth = plan_of(cfg)
    assert len([key for key in fifth.stale_staging if key.startswith(video_index.INDEX_DIR)]) == 2


def test_indexes_from_tasks_equal_the_drivers(ray_local, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for write in (video_clips.moving_clip, video_clips.vfr_clip, video_clips.ten_bit_clip, video_clips.rotated_clip,
                  video_clips.open_gop_clip, video_clips.subtitle_clip, video_clips.mid_gop_clip,
                  video_clips.empty_file, video_clips.not_a_video_file, video_clips.audio_only_file,
                  video_clips.zero_frame_clip, video_clips.unsupported_codec_clip):
        write(source)
    video_clips.truncated_clip(source, "truncated.mkv")
    video_clips.write_clip(source / "long.mp4", frames=75)  # 3 s: too long at the limit below, after indexing
    # 8 s declared in the MP4 header (faststart), but cut after 40 % of its bytes: it is refused from the header
    # (too_long) before a packet is read; read, it would be truncated.
    video_clips.write_clip(source / "declared_long.mp4", frames=200, container_options={"movflags": "+faststart"})
    data = (source / "declared_long.mp4").read_bytes()
    (source / "declared_long.mp4").write_bytes(data[: int(len(data) * 0.4)])
    limits = {"max_video_seconds": 2.5}

    in_tasks = plan_of(config(tmp_path, "tasks", limits=limits), in_tasks=True)
    on_driver = plan_of(config(tmp_path, "driver", limits=limits), in_tasks=False)
    assert in_tasks.video_indexing.tasks >= 1 and on_driver.video_indexing.tasks == 0

    assert sorted(in_tasks.clips) == sorted(on_driver.clips) == [
        "mid_gop.mkv", "mid_gop_source.mkv", "moving.mp4", "open_gop.mkv", "rotated.mp4", "subtitles.mkv",
        "ten_bit.mkv", "vfr.mp4"]
    for key, clip in in_tasks.clips.items():
        assert clip.index == on_driver.clips[key].index == video.index_video(str(source / key), key), key
    errors = {r["source_key"]: (r["error_type"], r["error_message"]) for r in in_tasks.rejected}
    assert errors == {r["source_key"]: (r["error_type"], r["error_message"]) for r in on_driver.rejected}
    assert {key: error_type for key, (error_type, _) in errors.items()} == {
        "empty.mp4": "empty_file", "notes.mp4": "not_a_video", "audio_only.mp4": "no_video_stream",
        "zero_frames.mkv": "zero_frames", "avs2.mkv": "unsupported_codec", "truncated.mkv": "truncated",
        "long.mp4": "too_long", "declared_long.mp4": "too_long"}
    assert "8.0 s, longer than the limit" in errors["declared_long.mp4"][1]


@pytest.mark.slow  # two jobs; the decoded-once path itself runs in the fast tier (tests/test_video_mezzanine.py)
def test_a_single_keyframe_film_is_decoded_once_and_comes_out_as_on_the_packet_copy_path(ray_local, tmp_path,
                                                                                          monkeypatch):
    """The corpus's intra-refresh H.264 (300 frames, one keyframe, AAC), 10 segments: staged decoded once at planning
    (FFV1), read by the segments instead of source packets, removed once the film is assembled; the film's bytes are
    those of the packet-copy path."""
    source = tmp_path / "in"
    source.mkdir()
    video_corpus.h264_single_keyframe(source)
    video_clips.moving_clip(source, "gop.mp4", frames=50)  # a normal GOP beside it: packet copy
    cfg = config(tmp_path, video={"segment_seconds": 1.2})  # 30 frames: 10 segments

    plan = plan_of(cfg)
    clip = plan.clips["single_keyframe.mp4"]
    assert len(clip.segment_keys) == 10 and len(clip.staged_sources) == 10
    assert not plan.clips["gop.mp4"].staged_sources
    staging = tmp_path / "out" / STAGING_DIR / "single_keyframe.mp4"
    assert sorted(p.name for p in staging.iterdir()) == sorted(pathlib.PurePosixPath(k).name
                                                                for k in clip.staged_sources)
    cost = mezzanine.decode_cost(clip.index, video.plan_segments(clip.index, 30))
    assert cost.packet_copy_ratio > mezzanine.THRESHOLD and cost.decoded_once_ratio <= 1.5

    assert run_job(cfg) == EXIT_OK
    rows = manifests(tmp_path / "out")
    film = rows[(rows.unit == "video") & (rows.source_key == "single_keyframe.mp4")].iloc[0]
    assert film.status == "ok" and film.frames_out == 300 and "decoded once" in film.processing
    assert not staging.exists()  # staged frames and staged segments removed with the clip

    monkeypatch.setattr(mezzanine, "THRESHOLD", float("inf"))  # the packet-copy path, for comparison
    reference = config(tmp_path, "reference", video={"segment_seconds": 1.2})
    assert not plan_of(reference).clips["single_keyframe.mp4"].staged_sources
    assert run_job(reference) == EXIT_OK
    assert (tmp_path / "out" / "single_keyframe.mp4").read_bytes() == \
        (tmp_path / "reference" / "single_keyframe.mp4").read_bytes()
    with av.open(str(tmp_path / "out" / "single_keyframe.mp4")) as container:
        assert container.streams.video[0].frames == 300


def test_staged_frames_of_a_video_that_disappears_are_swept(ray_local, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    video_clips.write_clip(source / "gone.mp4", frames=60, gop=1000)  # one keyframe
    video_clips.corrupt_packet_clip(source, "damaged.mkv")  # fails while decoding once: corrupt, at planning
    cfg = config(tmp_path, video={"segment_seconds": 0.08})  # 2 frames: past 3x even for damaged.mkv's 12-frame GOP
    plan = plan_of(cfg)  # stages gone.mp4's frames, as a run killed after planning would leave them
    assert len(plan.clips["gone.mp4"].staged_sources) == 30
    assert [(r["source_key"], r["error_type"]) for r in plan.rejected] == [("damaged.mkv", "corrupt")]
    assert "frames" in plan.rejected[0]["error_message"]
    (source / "gone.mp4").unlink()
    assert run_job(cfg) == EXIT_INPUTS_FAILED
    assert not (tmp_path / "out" / STAGING_DIR / "gone.mp4").exists()
    assert len(kept_indexes(tmp_path / "out")) == 1  # the damaged clip's (its index is fine); gone.mp4's is swept


@pytest.mark.parametrize("limit", [None])
def test_index_entries_round_trip(tmp_path, limit):
    """The kept index is the index (JSON: fractions, tuples and None come back as they were)."""
    path = video_clips.subtitle_clip(tmp_path)
    index = video.index_video(str(path), path.name, max_seconds=limit)
    source = video_index.VideoSource("subtitles.mkv", path.stat().st_size, "1")
    assert video_index.decode_entry(video_index.encode_entry(source, index), source) == index
    other = video_index.VideoSource("subtitles.mkv", path.stat().st_size, "2")
    assert video_index.decode_entry(video_index.encode_entry(source, index), other) is None
    assert video_index.cache_key(source) != video_index.cache_key(other)
