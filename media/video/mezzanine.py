"""Decoded-once staging for clips whose GOP structure makes per-segment decoding quadratic.

A segment normally carries the source packets from the clean keyframe at or before its first frame (`segments`), so
decoding it costs its own frames plus the keyframe distance. On a single-keyframe (intra-refresh, `keyint=infinite`)
recording every segment would decode from frame 0: the whole clip costs about segments x frames / 2. Such clips are
decoded once, sequentially, and each segment's frames (with the deinterlacer's context frames) are stored losslessly
as intra-only FFV1 in the same staging format as source packets (`packets.pack`): codec parameters of the FFV1 stream,
the source's time base, and each frame's source pts. `decode_segment` reads them unchanged and returns the same
pixels (FFV1 is lossless, and the frames keep their pixel format and field flags).

    decode_cost(index, segments)               -> DecodeCost    source frames decoded on either path
    uses_decoded_once(index, segments)         -> bool          the packet-copy cost exceeds THRESHOLD x frames
    stage_decoded(source, index, segments, n)  -> (segment, bytes), ...  one sequential decode, each segment's FFV1
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import av
import numpy as np

from ..errors import CorruptVideoError, UnsupportedVideoError
from . import packets
from .colour import to_rgb
from .decode import ERR_DETECT
from .index import VideoIndex
from .segments import Segment
from .source import Source, damaged, opened, video_stream

# Decode once when the packet-copy path would decode more than this many source frames per clip frame. Long
# broadcast GOPs (10 s against 4 s segments: about 2.3x) stay on packet copy: decoding twice is cheap next to the
# model, while the FFV1 copy is about a fifth of raw video, staged before any GPU starts. A single-keyframe or
# intra-refresh stream cut into n segments costs about n/2 x and is decoded once from 6 segments on, so decode cost
# stays within 3x the clip whatever its GOP structure.
THRESHOLD = 3.0
VERSION = 1  # bump when the staged bytes' meaning changes: staged sources carry it in their keys
_DECODE_THREADS = 4  # decoded pixels do not depend on it
_ENCODE_SLICES = 4  # FFV1 slices (each a thread); lossless whatever the count
# FFV1 lacks the deprecated full-range aliases: their planes travel as the plain format (the clip's colour tags, not
# the frame's format, choose the range when converting to RGB).
_CHROMA_LOCATIONS = ("left", "center", "topleft", "top", "bottomleft", "bottom")  # unspecified converts as center
_ALIASES = {"yuvj420p": "yuv420p", "yuvj422p": "yuv422p", "yuvj444p": "yuv444p", "yuvj440p": "yuv440p",
            "yuvj411p": "yuv411p"}


@dataclasses.dataclass(frozen=True)
class DecodeCost:
    """Source frames decoded for a clip and segment plan, on either path (frames of the source's codec; a decoded-once
    segment then decodes its own intra-only FFV1 frames, `staged_frames` in all)."""

    frames: int  # frames in the clip
    packet_copy: int  # each segment decodes from the keyframe at or before its first read frame to its last
    decoded_once: int  # one sequential pass from the first segment's keyframe to the last segment's last read frame
    staged_frames: int  # FFV1 frames the segments decode on the decoded-once path (their read ranges)

    @property
    def packet_copy_ratio(self) -> float:
        return self.packet_copy / self.frames

    @property
    def decoded_once_ratio(self) -> float:
        return self.decoded_once / self.frames


def _frame_at_or_after(index: VideoIndex, pts: int) -> int:
    return bisect.bisect_left(index.pts, pts)


def _read_frames(index: VideoIndex, segment: Segment) -> tuple[int, int]:
    """[first, stop) frame positions of the segment's read range (its frames and any deinterlacing context)."""
    first, last = segment.read_range
    return _frame_at_or_after(index, first), bisect.bisect_right(index.pts, last)


def decode_cost(index: VideoIndex, segments: Sequence[Segment]) -> DecodeCost:
    """Frames decoded in all, for the clip cut into `segments`, on the packet-copy and on the decoded-once path."""
    copy = staged = 0
    for segment in segments:
        first, stop = _read_frames(index, segment)
        copy += stop - _frame_at_or_after(index, segment.seek_pts)
        staged += stop - first
    once = _read_frames(index, segments[-1])[1] - _frame_at_or_after(index, segments[0].seek_pts) if segments else 0
    return DecodeCost(frames=index.frames, packet_copy=copy, decoded_once=once, staged_frames=staged)


def carrier_format(pix_fmt: str, deinterlace: bool = False) -> str | None:
    """The FFV1 pixel format that stores frames of `pix_fmt` losslessly, None when there is none (then the clip keeps
    the packet-copy path). Frames under an alias lose their field flags, which the deinterlacer reads."""
    if pix_fmt in _ALIASES and not deinterlace:
        pix_fmt = _ALIASES[pix_fmt]
    return pix_fmt if pix_fmt in _ffv1_formats() else None


def uses_decoded_once(index: VideoIndex, segments: Sequence[Segment]) -> bool:
    """Whether the clip's segments should be staged decoded once: the packet-copy path would decode more than
    THRESHOLD x its frames, and FFV1 can carry its pixel format."""
    if len(segments) < 2 or carrier_format(index.pix_fmt, segments[0].deinterlace) is None:
        return False
    return decode_cost(index, segments).packet_copy > THRESHOLD * index.frames


def stage_decoded(file: Source, index: VideoIndex, segments: Sequence[Segment], name: str
                  ) -> Iterator[tuple[Segment, bytes]]:
    """Decode the clip once, from the keyframe of the first of `segments` (in order) to the last one's last read
    frame, and yield each segment with its frames as FFV1 packets in the staging format (`packets.pack`), as soon as
    its last frame is decoded. Damage fails as `decode_segment` would (`CorruptVideoError`)."""
    segments = sorted(segments, key=lambda segment: segment.start)
    if not segments:
        return
    carrier = carrier_format(index.pix_fmt, segments[0].deinterlace)
    if carrier is None:
        raise UnsupportedVideoError(f"{name}: FFV1 cannot carry pixel format {index.pix_fmt} losslessly")
    ranges = [segment.read_range for segment in segments]
    wanted = [_read_frames(index, segment) for segment in segments]
    collected: list[list[av.Packet]] = [[] for _ in segments]
    encoder = siting = None
    done = 0  # segments yielded so far
    frames = _decoded_frames(file, segments[0].seek_pts, ranges[-1][1], name)
    while True:
        try:
            frame = next(frames, None)
        except CorruptVideoError as error:  # name the frames that cannot be made
            segment = segments[done]
            raise CorruptVideoError(f"{name}: frames {segment.start}-{segment.stop - 1}: "
                                    f"{str(error).removeprefix(f'{name}: ')}") from error
        if frame is None:
            break
        pts = frame.pts
        owners, k = [], done  # the segments whose read range holds this frame (two where they overlap)
        while k < len(segments) and ranges[k][0] <= pts:
            if pts <= ranges[k][1]:
                owners.append(k)
            k += 1
        if owners:
            if encoder is None:
                encoder = _encoder(frame, carrier, index)
            encoded = _encode(encoder, frame, carrier, pts)
            if siting is None:
                siting = _ChromaSiting(encoder, carrier, index, segments[0].colour)
            siting.check(frame, encoded, first_of_segment=not collected[owners[-1]], name=name)
            for k in owners:
                collected[k] += encoded
        while done < len(segments) and pts >= ranges[done][1]:
            yield segments[done], _packed(encoder, carrier, index, siting, collected[done], wanted[done],
                                          segments[done], name)
            collected[done] = []
            done += 1
        if done == len(segments):
            return
    segment = segments[done]
    raise CorruptVideoError(f"{name}: frames {segment.start}-{segment.stop - 1}: the decoder stopped before frame pts "
                            f"{ranges[done][1]}: has the file changed since it was indexed?")


class NotLosslessError(UnsupportedVideoError):
    """FFV1 frames that would not convert to the same RGB as the source's: the clip keeps the packet-copy path."""


class _ChromaSiting:
    """Where the source decoder sites chroma samples (swscale reads it when converting to RGB; FFV1 does not store it,
    and PyAV cannot read it from a frame): the candidates whose FFV1 frames convert to the same RGB as the source
    frames, checked on every frame until one is left, then on the first frame of each segment. Formats without
    subsampled chroma need none."""

    def __init__(self, encoder, carrier: str, index: VideoIndex, colour):
        self.colour = colour
        self.extradata = bytes(encoder.extradata or b"")
        self.parameters = {"codec": "ffv1", "extradata": self.extradata, "width": encoder.width,
                           "height": encoder.height, "pix_fmt": carrier, "bits_per_coded_sample": 0, "codec_tag": "",
                           "time_base": index.time_base}
        fmt = av.VideoFormat(carrier)
        subsampled = not fmt.is_rgb and len(fmt.components) >= 3 \
            and (fmt.chroma_width(64), fmt.chroma_height(64)) != (64, 64)
        self.candidates = list(_CHROMA_LOCATIONS) if subsampled else [None]
        self.decoders = {}

    @property
    def location(self) -> str | None:
        return self.candidates[0]

    def check(self, frame: av.VideoFrame, encoded: list[av.Packet], *, first_of_segment: bool, name: str) -> None:
        if self.candidates == [None] or (len(self.candidates) == 1 and not first_of_segment):
            return
        expected = to_rgb(frame, self.colour)
        self.candidates = [c for c in self.candidates if np.array_equal(self._rgb(c, encoded), expected)]
        if not self.candidates:
            raise NotLosslessError(f"{name}: the frame at pts {frame.pts} does not convert to the same RGB from FFV1")

    def _rgb(self, location: str, encoded: list[av.Packet]) -> np.ndarray:
        decoder = self.decoders.get(location)
        if decoder is None:
            parameters = packets.CodecParameters(**self.parameters, chroma_location=location)
            decoder = self.decoders[location] = parameters.decoder(1)
        frames = [frame for packet in encoded for frame in decoder.decode(packet)]
        if len(frames) != 1:
            raise NotLosslessError(f"FFV1 returned {len(frames)} frames for one")
        return to_rgb(frames[0], self.colour)


def _packed(encoder, carrier: str, index: VideoIndex, siting: _ChromaSiting | None, collected: list[av.Packet],
            wanted: tuple[int, int], segment: Segment, name: str) -> bytes:
    if encoder is None or len(collected) != wanted[1] - wanted[0]:
        raise CorruptVideoError(f"{name}: frames {segment.start}-{segment.stop - 1}: the decoder returned "
                                f"{len(collected)} of {wanted[1] - wanted[0]} frames")
    parameters = packets.CodecParameters(
        codec="ffv1", extradata=bytes(encoder.extradata or b""), width=encoder.width, height=encoder.height,
        pix_fmt=carrier, bits_per_coded_sample=0, codec_tag="", time_base=index.time_base,
        chroma_location=siting.location)
    return packets.pack(parameters, collected)


def _decoded_frames(file: Source, seek_pts: int, last_pts: int, name: str) -> Iterator[av.VideoFrame]:
    """Frames decoded from the keyframe packet at `seek_pts` on, in presentation order, until `last_pts`: the packets
    travel exactly as `extract_segment` stages them (payload, timestamps, key flag) into the same decoder set-up as
    `decode_segment`'s, so every frame is the one the packet-copy path gives."""
    for from_start in (False, True):
        with opened(file, name) as container:
            stream = video_stream(container, name)
            if not from_start:
                with contextlib.suppress(av.FFmpegError):
                    container.seek(seek_pts, stream=stream, backward=True)
            parameters = packets.CodecParameters.of(stream)
            decoder = parameters.decoder(_DECODE_THREADS, {"err_detect": ERR_DETECT})
            started = False
            previous = None
            try:
                for packet in itertools.chain(_from_keyframe(container, stream, seek_pts), [None]):
                    if packet is not None and not started:
                        if packet is _PAST_KEYFRAME:
                            break  # imprecise seek: read from the start
                        started = True
                    staged = None if packet is None else packets.StagedPacket(
                        packet.pts, packet.dts, packet.is_keyframe, packet.is_discard, bytes(packet)
                    ).to_packet(parameters.time_base)
                    for frame in decoder.decode(staged):
                        if frame.pts is None or frame.pts < seek_pts:
                            continue  # open-GOP leading pictures of the keyframe, as decode_segment skips them
                        if frame.is_corrupt:
                            seconds = float(frame.pts * parameters.time_base)
                            raise CorruptVideoError(f"{name}: the frame at pts {frame.pts} ({seconds:.3f} s) is "
                                                    "damaged (the decoder concealed errors in it)")
                        if previous is not None and frame.pts <= previous:
                            raise CorruptVideoError(f"{name}: the decoder returned pts {frame.pts} after {previous}")
                        previous = frame.pts
                        yield frame
                        if frame.pts >= last_pts:
                            return
            except av.FFmpegError as error:
                raise damaged(file, name, f"decoding from pts {seek_pts} failed: {error}") from error
            if started:
                return
    raise CorruptVideoError(f"{name}: the keyframe at pts {seek_pts} is gone: has the file changed?")


_PAST_KEYFRAME = object()


def _from_keyframe(container, stream, seek_pts: int) -> Iterator:
    """The stream's packets from the keyframe packet at `seek_pts` on; `_PAST_KEYFRAME` when the demuxer is already
    past it (then nothing else)."""
    started = False
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if not started:
            if packet.pts != seek_pts or not packet.is_keyframe:
                if packet.pts is not None and packet.pts > seek_pts:
                    yield _PAST_KEYFRAME
                    return
                continue
            started = True
        yield packet


def _encoder(frame: av.VideoFrame, carrier: str, index: VideoIndex):
    encoder = av.CodecContext.create("ffv1", "w")
    encoder.width, encoder.height, encoder.pix_fmt = frame.width, frame.height, carrier
    encoder.time_base = index.time_base
    # Version 3 stores each frame's field order (bwdif reads it); intra-only: every packet decodes alone.
    slices = _ENCODE_SLICES if frame.width * frame.height >= 320 * 240 else 1
    encoder.options = {"level": "3", "g": "1", "slices": str(slices), "slicecrc": "1"}
    encoder.thread_type, encoder.thread_count = "SLICE", slices
    return encoder


def _encode(encoder, frame: av.VideoFrame, carrier: str, pts: int) -> list[av.Packet]:
    if frame.format.name != carrier:  # a full-range alias: the same planes under the plain format's name
        frame = _as_format(frame, carrier)
    if (frame.width, frame.height) != (encoder.width, encoder.height):
        raise UnsupportedVideoError(f"the frame size changes mid-stream ({encoder.width}x{encoder.height} to "
                                    f"{frame.width}x{frame.height})")
    encoded = encoder.encode(frame)
    if len(encoded) != 1:  # FFV1 without frame threads has no delay
        raise NotLosslessError(f"FFV1 returned {len(encoded)} packets for one frame")
    for packet in encoded:
        packet.pts = packet.dts = pts
        packet.is_keyframe = True
    return encoded


def _as_format(frame: av.VideoFrame, pix_fmt: str) -> av.VideoFrame:
    copy = av.VideoFrame(frame.width, frame.height, pix_fmt)
    for source, target in zip(frame.planes, copy.planes):
        rows = min(source.height, target.height)
        width = min(source.line_size, target.line_size)
        data = memoryview(source).cast("B")
        buffer = memoryview(target).cast("B")
        for row in range(rows):
            buffer[row * target.line_size : row * target.line_size + width] = \
                data[row * source.line_size : row * source.line_size + width]
    copy.pts = frame.pts
    return copy  # without the field flags: clips that deinterlace do not take this way (`carrier_format`)


_FORMATS: frozenset[str] | None = None


def _ffv1_formats() -> frozenset[str]:
    global _FORMATS
    if _FORMATS is None:
        _FORMATS = frozenset(f.name for f in av.codec.Codec("ffv1", "w").video_formats)
    return _FORMATS
