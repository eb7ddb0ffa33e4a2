"""Decoding a staged segment into RGB frames: a decoder configured from the staged parameters, FFmpeg's error
detection on (damage fails the segment instead of being upscaled), and FFmpeg's bwdif deinterlacer for interlaced
sources."""

from __future__ import annotations

from collections.abc import Iterator

import av
import numpy as np

from ..errors import CorruptVideoError
from . import colour, packets
from .segments import Segment

ERR_DETECT = "crccheck+bitstream+buffer+careful"
_DECODE_THREADS = 4  # bounds memory on many-core workers; decoded pixels do not depend on it
# One frame per frame (the source's rate); parity from each frame's own flags; every frame, flagged or not (a clip
# detected as interlaced is woven throughout, and per-frame flags are unreliable in broadcast and DV streams).
_BWDIF = "mode=send_frame:parity=auto:deint=all"
_BWDIF_FIELDS = "mode=send_field:parity=auto:deint=all"  # the same, one frame per field (double rate)


def decode_segment(data: bytes, segment: Segment, name: str) -> Iterator[np.ndarray]:
    """Decode `extract_segment`'s packets and yield exactly frames [start, stop), in presentation order, as HxWx3
    RGB: uint8, or uint16 for sources above 8 bits; for a field-rate segment, two frames per frame (its fields, in
    display order). Raises `CorruptVideoError` during iteration when the data is damaged (see the package notes)."""
    parameters, staged = packets.unpack(data)
    decoder = parameters.decoder(_DECODE_THREADS, {"err_detect": ERR_DETECT})
    frames = _decoded(decoder, staged, parameters, segment, name)
    if segment.deinterlace:
        frames = _deinterlaced(frames, parameters, segment.field_rate)
    wanted = _wanted_fields(segment) if segment.field_rate \
        else (lambda pts: segment.first_pts <= pts <= segment.last_pts)
    yielded = 0
    last = None
    for frame in frames:
        if not wanted(frame.pts):
            continue  # context frames of the deinterlacer
        last = frame.pts
        yield colour.to_rgb(frame, segment.colour)
        yielded += 1
    if yielded != segment.output_frames:
        raise CorruptVideoError(
            f"{name}: frames {segment.start}-{segment.stop - 1}: the decoder returned {yielded} of "
            f"{segment.output_frames} frames (last pts {last})"
        )


def _wanted_fields(segment: Segment):
    """Which of bwdif's field-rate outputs (pts in half the source's time base) belong to the segment: from its first
    frame's first field up to, not including, the first field of the context frame after it (when there is one)."""
    first = 2 * segment.first_pts
    _, read_last = segment.read_range
    stop = 2 * read_last if read_last != segment.last_pts else None
    return lambda pts: first <= pts and (stop is None or pts < stop)


def _decoded(decoder, staged: list[packets.StagedPacket], parameters: packets.CodecParameters, segment: Segment,
             name: str) -> Iterator[av.VideoFrame]:
    """The frames of the read range, in presentation order, checked for damage."""
    first, last_wanted = segment.read_range
    previous = None
    packet_pts = None
    in_segment = 0  # frames of the segment itself so far, for error messages
    try:
        for packet in [*(p.to_packet(parameters.time_base) for p in staged), None]:
            packet_pts = None if packet is None else packet.pts
            for frame in decoder.decode(packet):
                pts = frame.pts
                if pts is None or pts < segment.seek_pts:
                    continue  # open-GOP leading pictures of the keyframe: they belong to the previous segment
                if frame.is_corrupt:
                    raise CorruptVideoError(
                        f"{name}: {_describe_frame(segment, pts, in_segment)} is damaged (the decoder concealed "
                        "errors in it)"
                    )
                if not first <= pts <= last_wanted:
                    continue
                if previous is not None and pts <= previous:
                    raise CorruptVideoError(f"{name}: the decoder returned pts {pts} after {previous}")
                previous = pts
                in_segment += segment.first_pts <= pts <= segment.last_pts
                yield frame
    except av.FFmpegError as error:
        where = f"the packet at pts {packet_pts}" if packet_pts is not None else "flushing"
        raise CorruptVideoError(
            f"{name}: decoding frames {segment.start}-{segment.stop - 1} failed at {where}: {error}"
        ) from error


def _deinterlaced(frames: Iterator[av.VideoFrame], parameters: packets.CodecParameters,
                  field_rate: bool = False) -> Iterator[av.VideoFrame]:
    """bwdif over the frames (it holds one back: each output needs its successor), pts in the source's time base
    (bwdif counts in half frames), or in half of it at field rate (each field's time exact)."""
    time_base = parameters.time_base / 2 if field_rate else parameters.time_base
    graph = None
    for frame in frames:
        if graph is None:
            graph = av.filter.Graph()
            source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                                      time_base=parameters.time_base)
            bwdif = graph.add("bwdif", _BWDIF_FIELDS if field_rate else _BWDIF)
            sink = graph.add("buffersink")
            source.link_to(bwdif)
            bwdif.link_to(sink)
            graph.configure()
        graph.vpush(frame)
        yield from _pulled(graph, time_base)
    if graph is not None:
        graph.vpush(None)
        yield from _pulled(graph, time_base)


def _pulled(graph, time_base) -> Iterator[av.VideoFrame]:
    while True:
        try:
            frame = graph.vpull()
        except (av.BlockingIOError, av.EOFError):
            return
        frame.pts = round(frame.pts * frame.time_base / time_base)
        frame.time_base = time_base
        yield frame


def _describe_frame(segment: Segment, pts: int, in_segment: int) -> str:
    seconds = float(pts * segment.time_base)
    if segment.first_pts <= pts <= segment.last_pts:
        return f"frame {segment.start + in_segment} (pts {pts}, {seconds:.3f} s)"
    return f"the reference frame at pts {pts} ({seconds:.3f} s)"
