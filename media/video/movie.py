"""Movies from frame sequences: a sequence's frames encoded, one at a time, straight into a movie file with the
catalog's video settings (`VideoEncoding`), frame i at i / fps.

A frame sequence has no timing, colour tags or container of its own, so it gets a synthetic `VideoIndex`
(`sequence_index`): time base 1/fps, pts 0..n-1, RGB pixels at the frames' bit depth, and the colour of RGB images as
video describes it — BT.709 primaries (sRGB's) and transfer, an RGB source, so the output gets the matrix players
assume for its size (`colour.output_colour`: BT.709 from 720 lines, BT.601 below), limited range. The encoder is
`SegmentEncoder` (same pixel formats, pinned threads, colour conversion and explicit tags) writing into the output
container instead of a staged segment: no staging, no remux, no second encode.
"""

from __future__ import annotations

import contextlib
import dataclasses
from fractions import Fraction

import av

from . import colour
from .assemble import _CONTAINERS, _MUXER_OPTIONS
from .encode import SegmentEncoder, VideoEncoding, canonical_codec
from .index import VideoIndex

# The movie's container by codec: MP4 for the delivery codecs (`auto` resolves to H.264 or H.265), MOV for the
# intra-only mezzanines, Matroska for FFV1.
_MOVIE_CONTAINERS = {"prores": ".mov", "dnxhr": ".mov", "ffv1": ".mkv"}
# Deeper frames (16-bit PNG/TIFF, 12-bit DPX, EXR) give 10-bit H.264/H.265 (Main 10: what players decode), unless
# `pix_fmt` says otherwise; FFV1 keeps up to 16 bits, ProRes and DNxHR are 10-bit anyway.
DELIVERY_DEPTH = 10


def movie_container(codec: str) -> str:
    """The movie's extension for a `video.codec` setting: .mp4 (auto, h264, h265), .mov (prores, dnxhr), .mkv
    (ffv1). Known before any frame is read: `auto` only ever resolves to H.264 or H.265."""
    return _MOVIE_CONTAINERS.get(canonical_codec(codec), ".mp4")


def sequence_index(frames: int, width: int, height: int, rate: Fraction, bit_depth: int) -> VideoIndex:
    """A synthetic index for `frames` RGB frames of `width` x `height` (the frames as encoded) at `rate` frames per
    second: time base 1/rate, frame i at pts i."""
    rate = Fraction(rate)
    if frames < 1 or rate <= 0:
        raise ValueError(f"a movie needs at least one frame and a positive rate (got {frames} frames at {rate})")
    pts = tuple(range(frames))
    return VideoIndex(
        frames=frames, time_base=1 / rate, pts=pts, keyframes=pts, start_seek_pts=0, end_pts=frames, width=width,
        height=height, codec="sequence", pix_fmt="rgb48le" if bit_depth > 8 else "rgb24", bit_depth=bit_depth,
        color_range=None, color_primaries=colour.BT709, color_trc=colour.BT709, colorspace=colour.RGB, rotation=0,
        display_matrix=None, sample_aspect_ratio=None, average_rate=rate, duration=float(frames / rate),
        container="image2", audio_codecs=(), subtitle_codecs=(), leading_frames_dropped=0, content_sha256="",
        first_pts=0)


def movie_settings(encoding: VideoEncoding, frames: int, width: int, height: int, rate: Fraction,
                   bit_depth: int) -> tuple[VideoEncoding, VideoIndex]:
    """The concrete encoding (`auto` resolved by size and depth, as for videos) and the index to encode with: the
    frames' bit depth, at most `DELIVERY_DEPTH` for H.264/H.265 without an explicit `pix_fmt`."""
    index = sequence_index(frames, width, height, rate, bit_depth)
    concrete = encoding.for_clip(index, width, height)
    if concrete.codec in ("h264", "h265") and concrete.pix_fmt is None and bit_depth > DELIVERY_DEPTH:
        index = dataclasses.replace(index, bit_depth=DELIVERY_DEPTH)
    return concrete, index


class MovieEncoder(SegmentEncoder):
    """`SegmentEncoder` writing into the movie file at `path` (a local path; the caller commits it), in the container
    `movie_container` names for the codec. `add(frame, i)` takes frame i as float HxWx3 RGB in [0, 1]; `finish()`
    returns what was written."""

    def __init__(self, path: str, index: VideoIndex, settings: VideoEncoding, width: int, height: int):
        self.path = path
        super().__init__(index, settings, width, height, progressive=True)

    @property
    def container(self) -> str:
        return movie_container(self.settings.codec)

    def _open(self):
        fmt = _CONTAINERS[self.container]
        return av.open(self.path, "w", format=fmt, options=_MUXER_OPTIONS[fmt])

    def _add_stream(self, progressive: bool):
        stream = super()._add_stream(progressive)
        if self.settings.codec == "h265" and self.container in (".mp4", ".mov"):
            stream.codec_context.codec_tag = "hvc1"  # Apple players only play hvc1-tagged HEVC
        return stream

    def abort(self) -> None:
        """Close the file after a failure (the caller removes it)."""
        with contextlib.suppress(Exception):
            self._container.close()

    def finish(self) -> dict:
        codec = self._stream.codec_context.codec.canonical_name
        super().finish()  # flushes the encoder and closes the file (the in-memory buffer stays empty)
        return {"frames": self.frames, "codec": codec, "pix_fmt": self.pix_fmt, "container": self.container,
                "duration_s": float(self.index.end_pts * self.index.time_base)}
