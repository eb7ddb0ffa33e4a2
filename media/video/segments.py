"""Segments: consecutive frame ranges of a clip, each a unit of work of its own, and the copying of the source
packets that decode one (no decoding: the reader stays cheap) into the staging format of `packets`."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from fractions import Fraction

import av

from ..errors import CorruptVideoError
from . import colour, packets
from .index import VideoIndex
from .source import Source, damaged, opened, video_stream

DEINTERLACE_MODES = ("auto", "on", "off")
DEINTERLACE_RATES = ("frame", "field")  # one output frame per source frame, or per field (double rate)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Frames [start, stop) of a clip and what decoding them needs; self-contained for extract/decode.

    Deinterlacing looks one frame back and one ahead, so a deinterlaced segment also decodes its neighbours (`read_*`):
    each frame then comes out exactly as if the whole clip had been deinterlaced in one pass (no seam)."""

    start: int
    stop: int
    seek_pts: int  # pts of the keyframe packet decoding starts at
    first_pts: int  # pts of frame `start`
    last_pts: int  # pts of frame `stop - 1`
    time_base: Fraction
    colour: colour.ColourTags  # what frames are converted to RGB with (the source's tags or the players' guesses)
    deinterlace: bool = False
    read_first_pts: int | None = None  # the frames decoded, context included (None: first_pts/last_pts)
    read_last_pts: int | None = None
    field_rate: bool = False  # deinterlaced to one frame per field: two output frames per frame of the segment

    @property
    def output_frames(self) -> int:
        return self.frames * (2 if self.field_rate else 1)

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def read_range(self) -> tuple[int, int]:
        return (self.first_pts if self.read_first_pts is None else self.read_first_pts,
                self.last_pts if self.read_last_pts is None else self.read_last_pts)


def deinterlaces(index: VideoIndex, mode: str) -> bool:
    if mode not in DEINTERLACE_MODES:
        raise ValueError(f"deinterlace {mode!r}: one of {', '.join(DEINTERLACE_MODES)}")
    return mode == "on" or (mode == "auto" and index.interlaced)


def plan_segments(index: VideoIndex, segment_frames: int, *, deinterlace: str = "auto",
                  rate: str = "frame") -> list[Segment]:
    """Cut the clip into consecutive, balanced frame ranges of at most `segment_frames` frames (see the package notes
    for why boundaries are not moved to keyframes). `deinterlace`: auto (what is coded interlaced), on, off; `rate`:
    frame (one output frame per source frame) or field (one per field, where the clip is deinterlaced)."""
    if segment_frames < 1:
        raise ValueError(f"segment_frames {segment_frames!r}: a positive number of frames")
    if rate not in DEINTERLACE_RATES:
        raise ValueError(f"deinterlace rate {rate!r}: one of {', '.join(DEINTERLACE_RATES)}")
    fields = deinterlaces(index, deinterlace)
    count = -(-index.frames // segment_frames)
    bounds = [index.frames * i // count for i in range(count + 1)]
    segments = []
    for start, stop in zip(bounds, bounds[1:]):
        read_start, read_stop = (max(0, start - 1), min(index.frames, stop + 1)) if fields else (start, stop)
        position = bisect.bisect_right(index.keyframes, read_start)
        seek_pts = index.pts[index.keyframes[position - 1]] if position else index.start_seek_pts
        segments.append(Segment(start, stop, seek_pts, index.pts[start], index.pts[stop - 1], index.time_base,
                                index.colour, fields,
                                index.pts[read_start] if fields else None, index.pts[read_stop - 1] if fields else None,
                                fields and rate == "field"))
    return segments


def extract_segment(file: Source, segment: Segment, name: str) -> bytes:
    """Copy (no decode) the packets that decode the segment's frames: from the keyframe at `seek_pts` until every
    frame of its read range has been seen, in decode order, with the decoder's parameters (`packets.pack`). Reads the
    container header and that byte range of the source."""
    for from_start in (False, True):
        with opened(file, name) as container:
            stream = video_stream(container, name)
            if not from_start:
                with contextlib.suppress(av.FFmpegError):  # then it is read from the start
                    container.seek(segment.seek_pts, stream=stream, backward=True)
            try:
                copied = _segment_packets(container, stream, segment, name)
            except av.FFmpegError as error:
                detail = f"reading frames {segment.start}-{segment.stop - 1} failed: {error}"
                raise damaged(file, name, detail) from error
            if copied is not None:
                return packets.pack(packets.CodecParameters.of(stream), copied)
    raise CorruptVideoError(f"{name}: the keyframe at pts {segment.seek_pts} is gone: has the file changed?")


def _segment_packets(container, stream, segment: Segment, name: str) -> list[av.Packet] | None:
    """The packets from the segment's keyframe on, or None when the demuxer is past the keyframe (imprecise seek)."""
    first, last = segment.read_range
    needed = None
    copied = []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if not copied:
            if packet.pts != segment.seek_pts or not packet.is_keyframe:
                if packet.pts is not None and packet.pts > segment.seek_pts:
                    return None
                continue
            needed = _frames_in(segment, first, last)
        copied.append(packet)
        if first <= packet.pts <= last and not packet.is_discard:
            needed -= 1
            if needed == 0:
                break
    if not copied:
        return None
    if needed:
        raise CorruptVideoError(
            f"{name}: frames {segment.start}-{segment.stop - 1}: {needed} of them are missing from the file: has it "
            "changed since it was indexed?"
        )
    return copied


def _frames_in(segment: Segment, first: int, last: int) -> int:
    """Frames in the read range: the segment's, plus one context frame on each side that has one."""
    return segment.frames + (first != segment.first_pts) + (last != segment.last_pts)
