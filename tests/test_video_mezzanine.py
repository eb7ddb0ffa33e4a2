"""Decoded-once staging (media/video/mezzanine.py): decode cost linear in the clip whatever its GOP structure,
and frames bit-identical to the packet-copy path's."""

from __future__ import annotations

import av
import numpy as np
import pytest
from support import video_clips

from media import video
from media.errors import CorruptVideoError
from media.video import mezzanine, packets

SEGMENT_FRAMES = 30


def single_keyframe_clip(path, frames: int = 300, size=(32, 32)):
    """H.264 with one keyframe for the whole clip (intra-refresh style recordings: `keyint=infinite`)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=video_clips.RATE, options={
            "preset": "fast", "crf": "20", "bf": "2", "x264-params": "keyint=infinite:scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(video_clips.frame_pixels(i, *size), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame.reformat(format="yuv420p")))
        container.mux(stream.encode())
    return path


def interlaced_clip(path, frames: int = 40, bottom_first: bool = True, size=(64, 48)):
    """Interlaced H.264 (PAFF/MBAFF as x264 codes it), one keyframe, bottom or top field first."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=video_clips.RATE, options={
            "preset": "fast", "crf": "20", "bf": "2",
            "x264-params": f"keyint=infinite:scenecut=0:interlaced=1:{'bff' if bottom_first else 'tff'}=1"})
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(video_clips.frame_pixels(i, *size), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame.reformat(format="yuv420p")))
        container.mux(stream.encode())
    return path


def staged_decoded_once(path, index, segments) -> dict[int, bytes]:
    with open(path, "rb") as handle:
        return {segment.start: data for segment, data in mezzanine.stage_decoded(handle, index, segments, path.name)}


def assert_identical_frames(path, segments, staged: dict[int, bytes]) -> None:
    """Every segment decodes to the same pixels from its decoded-once FFV1 frames as from its source packets."""
    for segment in segments:
        copied = list(video.decode_segment(video.extract_segment(str(path), segment, path.name), segment, path.name))
        once = list(video.decode_segment(staged[segment.start], segment, path.name))
        assert len(copied) == len(once) == segment.output_frames
        for number, (expected, got) in enumerate(zip(copied, once)):
            assert got.dtype == expected.dtype and np.array_equal(got, expected), (segment.start + number)


def test_a_single_keyframe_clip_decodes_once_in_linear_time(tmp_path, capsys):
    path = single_keyframe_clip(tmp_path / "single_keyframe.mp4")
    index = video.index_video(str(path), path.name)
    segments = video.plan_segments(index, SEGMENT_FRAMES)
    assert index.frames == 300 and len(index.keyframes) == 1 and len(segments) == 10

    cost = mezzanine.decode_cost(index, segments)
    with capsys.disabled():
        print(f"\nsingle keyframe, {index.frames} frames in {len(segments)} segments: frames decoded / frames = "
              f"{cost.packet_copy_ratio:.2f} (packet copy), {cost.decoded_once_ratio:.2f} (decoded once; then "
              f"{cost.staged_frames} staged FFV1 frames)")
    assert cost.packet_copy_ratio > mezzanine.THRESHOLD  # every segment decodes from frame 0: 5.5 here
    assert cost.decoded_once_ratio <= 1.5  # the target; 1.00: each source frame decoded once
    assert cost.staged_frames == index.frames  # each frame staged once (no deinterlacing context)
    assert mezzanine.uses_decoded_once(index, segments)

    staged = staged_decoded_once(path, index, segments)
    assert sorted(staged) == [segment.start for segment in segments]
    assert_identical_frames(path, segments, staged)
    parameters, frames = packets.unpack(staged[SEGMENT_FRAMES])
    assert parameters.codec == "ffv1" and parameters.time_base == index.time_base
    assert [p.pts for p in frames] == list(index.pts[SEGMENT_FRAMES:2 * SEGMENT_FRAMES])  # source pts kept
    assert all(p.key for p in frames)  # intra only


def test_normal_gops_keep_the_packet_copy_path(tmp_path):
    path = video_clips.write_clip(tmp_path / "gop12.mp4", frames=100, gop=12)  # a keyframe every 0.48 s
    index = video.index_video(str(path), path.name)
    segments = video.plan_segments(index, 25)  # 1 s segments
    cost = mezzanine.decode_cost(index, segments)
    assert cost.packet_copy_ratio < 1.5 and not mezzanine.uses_decoded_once(index, segments)
    one = video.plan_segments(index, 100)
    assert not mezzanine.uses_decoded_once(index, one)  # one segment: nothing to decode twice


@pytest.mark.parametrize("clip", ["ten_bit", "yuv422p10le", "yuv444p", "full_range", "bottom_field_first",
                                  "deinterlace_on", "field_rate"])
def test_decoded_once_frames_equal_the_packet_copy_paths(tmp_path, clip):
    """Pixel formats (10-bit, 4:2:2, 4:4:4, full range under FFmpeg's yuvj alias) and deinterlacing (bwdif reads each
    frame's field order, and one context frame on each side of a segment), at frame and at field rate."""
    deinterlace, rate = "auto", "frame"
    if clip == "ten_bit":
        path = video_clips.ten_bit_clip(tmp_path, gop=100)
    elif clip in ("yuv422p10le", "yuv444p"):
        path = video_clips.write_clip(tmp_path / f"{clip}.mkv", frames=30, pix_fmt=clip, gop=100, size=(34, 18))
    elif clip == "full_range":
        path = video_clips.full_range_clip(tmp_path, gop=100)
    elif clip == "bottom_field_first":
        path = interlaced_clip(tmp_path / "bff.mkv")
    elif clip == "field_rate":
        path, rate = interlaced_clip(tmp_path / "bff.mkv"), "field"
    else:
        path, deinterlace = interlaced_clip(tmp_path / "tff.mkv", bottom_first=False), "on"
    index = video.index_video(str(path), path.name)
    segments = video.plan_segments(index, 3, deinterlace=deinterlace, rate=rate)  # 8-14 segments: past THRESHOLD
    if clip in ("bottom_field_first", "deinterlace_on", "field_rate"):
        assert all(segment.deinterlace and segment.field_rate == (clip == "field_rate") for segment in segments)
        assert index.interlaced and (index.field_order in ("bb", "bt")) == (clip != "deinterlace_on")
    assert mezzanine.uses_decoded_once(index, segments)
    assert_identical_frames(path, segments, staged_decoded_once(path, index, segments))


def test_decoded_once_stages_only_the_segments_asked_for(tmp_path):
    """A re-run stages only what is still to do (from the keyframe before the first of them)."""
    path = single_keyframe_clip(tmp_path / "single_keyframe.mp4", frames=60)
    index = video.index_video(str(path), path.name)
    segments = video.plan_segments(index, 10)
    wanted = [segments[2], segments[4]]
    staged = staged_decoded_once(path, index, wanted)
    assert sorted(staged) == [20, 40]
    assert_identical_frames(path, wanted, staged)


def test_a_damaged_clip_fails_as_corrupt_naming_its_frames(tmp_path):
    path, _ = video_clips.corrupt_packet_clip(tmp_path)
    index = video.index_video(str(path), path.name)
    segments = video.plan_segments(index, 2)
    with pytest.raises(CorruptVideoError, match=r"frames \d+-\d+: the frame at pts \d+ .* is damaged"):
        staged_decoded_once(path, index, segments)
