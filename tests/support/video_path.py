"""The whole video path in-process (index, plan, extract, decode, upscale by pixel repetition, encode, assemble),
as the catalog's read stage, actor and clip finisher run it, for tests that check what comes out."""

from __future__ import annotations

import pathlib

import numpy as np

from media import MediaError
from media.video import (
    SegmentEncoder,
    VideoEncoding,
    assemble,
    decode_segment,
    extract_segment,
    field_rate_index,
    index_video,
    output_container,
    plan_segments,
)

FAST = VideoEncoding(preset="ultrafast", threads=2)


def stage(name: str, call, *args, **kwargs):
    """Run one pipeline step; an error fails the test, naming the step and the error type."""
    try:
        return call(*args, **kwargs)
    except MediaError as error:
        raise AssertionError(f"{name} raised {type(error).__name__} (error_type {error.error_type}): {error}"
                             ) from error
    except Exception as error:  # anything else is a pipeline bug too, reported the same way
        raise AssertionError(f"{name} raised {type(error).__name__}: {error}") from error


def run_video_path(path: pathlib.Path, out_folder: pathlib.Path, *, scale: int = 4, segments: int = 3,
                   encoding: VideoEncoding = FAST, deinterlace: str = "auto",
                   deinterlace_rate: str = "frame") -> tuple[pathlib.Path, int]:
    """Upscale `path` x`scale` in about `segments` segments; returns the output and the number of segments.
    `deinterlace_rate` field: one output frame per field where the clip is deinterlaced (the output's timeline is
    `field_rate_index`'s)."""
    name = path.name
    index = stage("index_video", index_video, str(path), name)
    segment_frames = max(1, index.frames // segments)
    planned = stage("plan_segments", plan_segments, index, segment_frames, deinterlace=deinterlace,
                    rate=deinterlace_rate)
    source_index = index
    if planned[0].field_rate:
        index = field_rate_index(index)
    assert len(planned) >= segments, f"{index.frames} frames planned as {len(planned)} segments"
    width, height = index.width * scale, index.height * scale
    progressive = planned[0].deinterlace or not index.interlaced
    per_frame = 2 if planned[0].field_rate else 1
    staged = []
    for segment in planned:
        where = f"segment {segment.start}-{segment.stop - 1}"
        data = stage(f"extract_segment ({where})", extract_segment, str(path), segment, name)
        frames = stage(f"decode_segment ({where})", lambda: list(decode_segment(data, segment, name)))
        pts = index.pts[per_frame * segment.start : per_frame * segment.stop]
        assert len(frames) == len(pts), f"decode_segment ({where}) returned {len(frames)} of {len(pts)} frames"
        encoder = stage("SegmentEncoder", SegmentEncoder, index, encoding, width, height, progressive=progressive)
        top = np.float32(np.iinfo(frames[0].dtype).max)
        for pixels, timestamp in zip(frames, pts):
            upscaled = (pixels.astype(np.float32) / top).repeat(scale, axis=0).repeat(scale, axis=1)
            stage(f"SegmentEncoder.add ({where})", encoder.add, upscaled, timestamp)
        staged.append(stage(f"SegmentEncoder.finish ({where})", encoder.finish))
    extension = stage("output_container", output_container, name, index,
                      encoding.for_clip(index, width, height).codec)
    out = out_folder / f"{path.stem}.x{scale}{extension}"
    assert source_index.time_base == index.time_base * per_frame
    stage("assemble", assemble, str(path), staged, str(out), index, name, container=extension,
          progressive=progressive)
    return out, len(planned)


def combing(frame: np.ndarray) -> float:
    """Row-alternation energy: how far each row is from the mean of its neighbours (a weave of moving fields
    alternates row by row), in the lower half of the frame, where the corpus's bar moves over smooth gradients (a
    progressive frame there measures ~0.1 of 255, its weave ~5.7; the frame-number grid above has edges of its
    own)."""
    luma = frame.mean(axis=2)[frame.shape[0] // 2 :]
    return float(np.abs(luma[1:-1] - 0.5 * (luma[:-2] + luma[2:])).mean())
