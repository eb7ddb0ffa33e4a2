"""Videos: index a clip from its packets, cut it into segments of frames that are units of work of their own, decode
one segment, encode its upscaled frames into a staged segment file, and join the staged segments with the source's
audio and subtitle packets into the output. Only encoded bytes travel between these stages.

    index_video(source, name)                   -> VideoIndex   plan time: demux only, plus one decoded frame
    plan_segments(index, segment_frames)        -> [Segment]    frame ranges [start, stop)
    extract_segment(source, segment, name)      -> bytes        the packets that decode frames [start, stop) (NUT)
    decode_segment(data, segment, name)         -> frames       exactly frames [start, stop): HxWx3 uint8/uint16 RGB
    SegmentEncoder(index, encoding, w, h)       .add(float RGB frame, source pts) ... .finish() -> bytes (NUT)
    assemble(source, staged, out, index, name)  -> stats        remux, no re-encode, + audio/subtitle packets copied
    output_container(source_key, index, codec)  -> ".mp4" | ".mov" | ".mkv"

Any `source` may be a local path or a binary file object with random access (an fsspec file). `extract_segment`
reads the container header and that segment's byte range only; `index_video` reads every video packet (they are
hashed into the clip's identity); `assemble` reads the audio and subtitle packets (in an interleaved container, most
of the file). Errors are `MediaError`s with an `error_type`; invalid settings are `ValueError`s.

Decisions (each is a trade-off an operator may ask about):

- Frames are packets: one video packet is one frame (true of MP4/MOV/Matroska/WebM/AVI/MPEG-TS as muxed by
  FFmpeg; field-per-packet streams are not supported, their segments fail with missing frames). Discard-flagged
  packets (MP4 edit lists) are decoded but are not frames. Frames that precede the first keyframe (a stream cut
  mid-GOP) cannot be decoded from anywhere: they are left out of the index and counted in
  `VideoIndex.leading_frames_dropped`, as every player drops them.
- Seek points are "clean" keyframes: keyframe packets that no earlier packet (in decode order) is presented after.
  Decoding starts at the clean keyframe at or before a segment's first frame and copies packets, in decode order,
  until every frame of the segment has been seen; open-GOP leading pictures that belong to the previous segment are
  decoded there (they follow the keyframe in decode order) and ignored here.
- Segments are plain, balanced frame ranges (never more than `segment_frames`, sizes differ by at most one). They
  are not snapped to keyframes: long-GOP sources (one keyframe per 10 s, or one per clip) would make segments as
  uneven as their GOPs and wreck load balancing, while the price of plain ranges is decoding at most one GOP of
  extra frames per segment on a CPU, small next to the diffusion model's work per frame.
- Corrupt data: a segment fails (`CorruptVideoError`, naming the frame and its time) when the decoder rejects a
  packet, flags a decoded frame as damaged (error concealment; `err_detect` crccheck+bitstream+buffer+careful), or
  returns fewer frames than the segment has. Frames decoded before the segment's first frame count too, since
  later frames reference them; open-GOP leading pictures (before the keyframe) do not. Decoding around the damage
  would upscale concealment artefacts (which the model sharpens) into an output that claims to be faithful,
  silently; failing keeps the source untouched, reports exactly where it is damaged, and fails only this clip.
  Bit errors that still form a valid bitstream cannot be detected by any decoder (H.264 has no checksums).
- Colour: frames are converted to RGB with the clip's matrix (BT.601/BT.709/BT.2020/SMPTE 240M/FCC) and range
  (limited/full; `yuvj*` is full) as indexed from its first decoded frame (the bitstream's VUI, else the
  container's tags; segments travel in NUT files, which carry no colour tags). An untagged matrix is BT.709 from
  720 lines up and BT.601 below (the players' convention), an untagged range is limited. The encoder converts back
  with the same matrix and range, and the output is tagged with them: the matrix explicitly when the source left it
  untagged (at the upscaled size players would guess BT.709), the range as tagged (H.264/H.265 then read back as
  limited, which untagged means). Primaries and transfer are copied (untagged stays untagged); no transfer or gamut
  conversion happens anywhere (HDR PQ/HLG pass through as coded values). swscale: bicubic, ACCURATE_RND | BITEXACT,
  full chroma interpolation, one thread; against the reference equations, decoding is within 2 levels (8-bit) and
  encoding within 1, away from chroma edges.
- Frames stay in coded orientation; the source's display matrix (rotation, flips) is written to the output.
- Pixel format: `VideoEncoding.pix_fmt=None` keeps the source's chroma subsampling (4:2:0, 4:2:2, 4:4:4) and bit
  depth (8, 10, 12, 16) as far as the encoder supports them (this wheel's libx264 writes 8 and 10 bits, libx265 up
  to 12, FFV1 up to 16); RGB sources get 4:2:0 (4:4:4 with FFV1), gray ones 4:2:0. >8-bit sources decode to uint16 RGB and
  are encoded from 16-bit RGB. Note that 10-bit H.264 (High 10) has little hardware decoding support: choose h265
  for 10-bit sources that must play on devices.
- Odd sizes: FFV1 codes any size. H.264/H.265 cannot code an odd width (height) with horizontally (vertically)
  subsampled chroma, not even with cropping (crop units are 2 pixels), so the frame is padded by repeating its last
  column/row (+1 pixel) and the output is 1 pixel larger there. A x4 upscale is always even; the rule only applies
  at odd scales or 1x re-encodes of odd sources.
- Timestamps: every frame keeps its source pts (variable frame rate included) and its duration (the next frame's
  pts minus its own; the last frame ends at the source's end), in the source's time base wherever the output
  container stores it exactly (MP4/MOV scale it exactly; Matroska stores milliseconds). DTS is rewritten at
  assembly from the sorted pts and the deepest reorder delay of any segment (x264's own rule), so it increases
  monotonically across segment boundaries even when independently encoded segments differ in frame spacing.
- Determinism: the same frames and settings give the same segment and output bytes on any worker: x264 threads are
  pinned (`VideoEncoding.threads`, frame threads; the bitstream depends on the count) with cpu-independent
  analysis, x265 thread pool / frame threads / lookahead slices are pinned, FFV1 slices are pinned, and muxers run
  bitexact (no random Matroska UIDs, no library version strings in the container).
- Containers: a source keeps its container where that container holds the output codec (MP4->MP4, MOV->MOV,
  MKV->MKV, M4V->MP4); otherwise the first of Matroska, MOV, MP4 that holds the output codec and every copied
  audio/subtitle codec (AVI, MPEG-TS, WebM with H.264, FFV1 from MP4 -> Matroska). FFV1 is only written to
  Matroska (its standard container).
- Carried to the output: the video stream's language/title, every audio and subtitle stream (packets, codec
  parameters, metadata, disposition; packets are never re-encoded, but a change of container may re-frame them as
  FFmpeg's muxer requires, e.g. MPEG-TS's ADTS headers on AAC are dropped in Matroska), chapters, container metadata, Matroska attachments (fonts for ASS); empty
  mov_text samples are not copied: they only end the previous subtitle, and the MP4 muxer writes its own from the
  subtitles' durations (copies would double them). Not carried: other video streams (the "best" one is upscaled),
  data streams (timecode tracks), HDR mastering/content light side data.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import io
import os
import struct
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import PurePosixPath
from typing import BinaryIO

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation

from .errors import (
    AssemblyError,
    CorruptVideoError,
    EmptyFileError,
    EncodeError,
    NotAVideoError,
    NoVideoStreamError,
    TruncatedError,
    UnsupportedCodecError,
    UnsupportedVideoError,
    VideoTooLongError,
    ZeroFramesError,
)

Source = BinaryIO | str | os.PathLike

_SEGMENT_FORMAT = "nut"  # stores any time base exactly (Matroska rounds to milliseconds)
_SEGMENT_OPTIONS = {"fflags": "+bitexact", "avoid_negative_ts": "disabled"}  # keep the source's timestamps as they are
_ERR_DETECT = "crccheck+bitstream+buffer+careful"
_DECODE_THREADS = 4  # bounds memory on many-core workers; decoded pixels do not depend on it
_SWS_FLAGS = (
    Interpolation.BICUBIC
    | Interpolation.ACCURATE_RND
    | Interpolation.BITEXACT
    | Interpolation.FULL_CHR_H_INT
    | Interpolation.FULL_CHR_H_INP
)
_UNSPECIFIED = 2  # AVCOL_PRI/TRC/SPC_UNSPECIFIED
_FULL_RANGE = 2  # AVCOL_RANGE_JPEG
_BT709, _BT601 = 1, 6  # AVCOL_SPC_BT709, AVCOL_SPC_SMPTE170M
# AVCOL_SPC_* -> swscale's matrix constant
_SWS_MATRICES = {
    1: Colorspace.ITU709,
    4: Colorspace.FCC,
    5: Colorspace.ITU601,
    6: Colorspace.ITU601,
    7: Colorspace.SMPTE240M,
    9: Colorspace.BT2020,
    10: Colorspace.BT2020,
}

ENCODERS = {"h264": "libx264", "h265": "libx265", "ffv1": "ffv1"}
_CODEC_ALIASES = {"hevc": "h265", "avc": "h264"}
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
_FFV1_SLICES = 4
_DEPTH_SUFFIX = {8: "", 10: "10le", 12: "12le", 16: "16le"}

# Output containers by extension: the FFmpeg muxer, and which of our video codecs it holds by its standard.
_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
_VIDEO_CODECS = {".mp4": {"h264", "h265"}, ".mov": {"h264", "h265"}, ".mkv": {"h264", "h265", "ffv1"}}
_SAME_CONTAINER = {".mp4": ".mp4", ".m4v": ".mp4", ".mov": ".mov", ".mkv": ".mkv"}
_FALLBACK_CONTAINERS = (".mkv", ".mov", ".mp4")
_MUXER_OPTIONS = {
    "mp4": {"fflags": "+bitexact", "movflags": "+faststart"},
    "mov": {"fflags": "+bitexact", "movflags": "+faststart"},
    "matroska": {"fflags": "+bitexact"},
}
_VIDEO_METADATA = ("language", "title")  # the rest of the source video stream's tags describe its encoding
_MOV_TEXT_EMPTY = b"\x00\x00"  # a mov_text sample with no text


@dataclasses.dataclass(frozen=True)
class VideoIndex:
    """What planning, decoding, encoding and assembly need to know about a clip; built from packets alone.

    Timestamps are in `time_base` units of the source's video stream. Colour tags are FFmpeg's AVCOL_* numbers, None
    when the source leaves them unspecified."""

    frames: int
    time_base: Fraction
    pts: tuple[int, ...]  # every frame's presentation timestamp, in presentation order
    keyframes: tuple[int, ...]  # indices into `pts` of frames decoding can start at (clean keyframes)
    start_seek_pts: int  # pts of the keyframe packet decoding must start at to reach frame 0 (<= pts[0])
    end_pts: int  # where the last frame ends (its pts + its duration)
    width: int  # coded size, before rotation
    height: int
    codec: str  # FFmpeg's codec name (h264, hevc, vp9, ...)
    pix_fmt: str  # as decoded
    bit_depth: int
    color_range: int | None  # 1 limited, 2 full (yuvj* sources are full)
    color_primaries: int | None
    color_trc: int | None
    colorspace: int | None  # the YUV matrix
    rotation: int  # degrees counter-clockwise, as ffprobe reports the display matrix; 0 when absent
    display_matrix: tuple[int, ...] | None  # the 3x3 display matrix (rotation and flips), as stored
    sample_aspect_ratio: Fraction | None
    average_rate: Fraction | None
    duration: float  # seconds, first frame's pts to end_pts
    container: str  # FFmpeg's demuxer name
    audio_codecs: tuple[str, ...]  # the streams assemble copies, in source order
    subtitle_codecs: tuple[str, ...]
    leading_frames_dropped: int  # frames before the first keyframe, which cannot be decoded
    content_sha256: str  # codec, extradata, and every packet's pts (in seconds) and payload, in decode order

    @property
    def audio_streams(self) -> int:
        return len(self.audio_codecs)

    @property
    def subtitle_streams(self) -> int:
        return len(self.subtitle_codecs)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Frames [start, stop) of a clip and where decoding them starts; self-contained for extract/decode."""

    start: int
    stop: int
    seek_pts: int  # pts of the keyframe packet decoding starts at
    first_pts: int  # pts of frame `start`
    last_pts: int  # pts of frame `stop - 1`
    time_base: Fraction
    matrix: int  # the YUV matrix frames are converted with (AVCOL_SPC_*: the source's, or the assumed one)
    full_range: bool

    @property
    def frames(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class VideoEncoding:
    """How staged segments are encoded. `codec`: h264 (libx264), h265/hevc (libx265) or ffv1 (lossless archival
    masters; `crf` and `preset` do not apply). `pix_fmt`: None keeps the source's chroma subsampling and bit depth
    (see the module notes). `threads` is part of the output's identity: x264/x265 bitstreams depend on it."""

    codec: str = "h264"
    crf: int = 18
    preset: str = "medium"
    pix_fmt: str | None = None
    threads: int = 4

    def __post_init__(self) -> None:
        codec = _canonical_codec(self.codec)
        object.__setattr__(self, "codec", codec)
        if codec != "ffv1":
            if not (isinstance(self.crf, int) and 0 <= self.crf <= 51):
                raise ValueError(f"crf {self.crf!r}: an integer from 0 (best) to 51 for {codec}")
            if self.preset not in PRESETS:
                raise ValueError(f"preset {self.preset!r}: one of {', '.join(PRESETS)}")
        if not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"threads {self.threads!r}: a positive integer (pinned: it changes x264/x265 output)")
        if self.pix_fmt is not None and self.pix_fmt not in _writable_formats(codec):
            raise ValueError(
                f"pix_fmt {self.pix_fmt!r} cannot be written by {ENCODERS[codec]}; it writes "
                f"{', '.join(_writable_formats(codec))} (the range follows the source's tag, not yuvj* formats)"
            )


def index_video(file: Source, name: str, *, max_frames: int | None = None) -> VideoIndex:
    """Index a clip from its packets (one frame is decoded, for the display matrix and the decoder's view of the
    colour tags). `name` is only used in error messages; `max_frames` rejects longer clips (`VideoTooLongError`)."""
    with _opened(file, name) as container:
        stream = _video_stream(container, name)
        copied = _copied_streams(container, name)
        if truncated := _truncation(file, name, boxes=False):
            raise truncated
        packets, digest, probe = _demux_index(file, container, stream, name, max_frames)
        if not packets:
            raise ZeroFramesError(f"{name}: the video stream has no frames")
        first = probe.first_frame(name)
        time_base = Fraction(stream.time_base)
        layout = _frame_layout(packets, name)
        pts = layout.pts
        end_pts = _end_pts(packets, pts, stream.start_time, stream.duration, stream.average_rate, time_base)
        codec = stream.codec_context.codec.canonical_name
        sar, average_rate = stream.sample_aspect_ratio, stream.average_rate
        container_name = container.format.name
    fmt = first.format
    color_range = _FULL_RANGE if fmt.name.startswith("yuvj") else first.color_range or None  # 0: unspecified
    matrix = _side_data_matrix(first)
    return VideoIndex(
        frames=len(pts),
        time_base=time_base,
        pts=pts,
        keyframes=layout.keyframes,
        start_seek_pts=layout.start_seek_pts,
        end_pts=end_pts,
        width=first.width,
        height=first.height,
        codec=codec,
        pix_fmt=fmt.name,
        bit_depth=fmt.components[0].bits,
        color_range=color_range,
        color_primaries=_tag(first.color_primaries),
        color_trc=_tag(first.color_trc),
        colorspace=None if first.colorspace == _UNSPECIFIED else int(first.colorspace),  # 0 is RGB
        rotation=int(round(first.rotation)) if matrix else 0,
        display_matrix=matrix,
        sample_aspect_ratio=Fraction(sar) if sar else None,
        average_rate=Fraction(average_rate) if average_rate else None,
        duration=float((end_pts - pts[0]) * time_base),
        container=container_name,
        audio_codecs=tuple(codec for kind, codec in copied if kind == "audio"),
        subtitle_codecs=tuple(codec for kind, codec in copied if kind == "subtitle"),
        leading_frames_dropped=layout.dropped,
        content_sha256=digest,
    )


def plan_segments(index: VideoIndex, segment_frames: int) -> list[Segment]:
    """Cut the clip into consecutive, balanced frame ranges of at most `segment_frames` frames (see the module notes
    for why boundaries are not moved to keyframes)."""
    if segment_frames < 1:
        raise ValueError(f"segment_frames {segment_frames!r}: a positive number of frames")
    count = -(-index.frames // segment_frames)
    bounds = [index.frames * i // count for i in range(count + 1)]
    segments = []
    for start, stop in zip(bounds, bounds[1:]):
        position = bisect.bisect_right(index.keyframes, start)
        seek_pts = index.pts[index.keyframes[position - 1]] if position else index.start_seek_pts
        segments.append(Segment(start, stop, seek_pts, index.pts[start], index.pts[stop - 1], index.time_base,
                                _matrix_of(index), index.color_range == _FULL_RANGE))
    return segments


def extract_segment(file: Source, segment: Segment, name: str) -> bytes:
    """Copy (no decode) the packets that decode frames [start, stop): from the keyframe at `seek_pts` until every
    frame of the segment has been seen, in decode order, into a small NUT file. Reads the container header and
    that byte range of the source."""
    for from_start in (False, True):
        with _opened(file, name) as container:
            stream = _video_stream(container, name)
            if not from_start:
                with contextlib.suppress(av.FFmpegError):  # then it is read from the start
                    container.seek(segment.seek_pts, stream=stream, backward=True)
            try:
                data = _copy_segment_packets(container, stream, segment, name)
            except av.FFmpegError as error:
                detail = f"reading frames {segment.start}-{segment.stop - 1} failed: {error}"
                raise _damaged(file, name, detail) from error
        if data is not None:
            return data
    raise CorruptVideoError(f"{name}: the keyframe at pts {segment.seek_pts} is gone: has the file changed?")


def decode_segment(data: bytes, segment: Segment, name: str) -> Iterator[np.ndarray]:
    """Decode `extract_segment`'s packets and yield exactly frames [start, stop), in presentation order, as HxWx3
    RGB: uint8, or uint16 for sources above 8 bits. Raises `CorruptVideoError` during iteration when the data is
    damaged (see the module notes)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        context.options = {"err_detect": _ERR_DETECT}
        context.thread_type = "AUTO"  # decoding is bit-exact whatever the threading
        context.thread_count = _DECODE_THREADS
        to_source = Fraction(stream.time_base) / segment.time_base
        yielded = 0
        last = None
        packet_pts = None
        try:
            for packet in container.demux(stream):
                packet_pts = packet.pts
                for frame in stream.decode(packet):
                    pts = _rescaled(frame.pts, to_source)
                    if pts is None or pts < segment.seek_pts:
                        continue  # open-GOP leading pictures of the keyframe: they belong to the previous segment
                    if frame.is_corrupt:
                        raise CorruptVideoError(
                            f"{name}: {_describe_frame(segment, pts, yielded)} is damaged (the decoder concealed "
                            "errors in it)"
                        )
                    if not segment.first_pts <= pts <= segment.last_pts:
                        continue
                    if last is not None and pts <= last:
                        raise CorruptVideoError(f"{name}: the decoder returned pts {pts} after {last}")
                    last = pts
                    yield _to_rgb(frame, segment.matrix, segment.full_range)
                    yielded += 1
        except av.FFmpegError as error:
            where = f"the packet at pts {_rescaled(packet_pts, to_source)}" if packet_pts is not None else "flushing"
            raise CorruptVideoError(
                f"{name}: decoding frames {segment.start}-{segment.stop - 1} failed at {where}: {error}"
            ) from error
    if yielded != segment.frames:
        raise CorruptVideoError(
            f"{name}: frames {segment.start}-{segment.stop - 1}: the decoder returned {yielded} of {segment.frames} "
            f"frames (last pts {last})"
        )


class SegmentEncoder:
    """Encode one segment's upscaled frames, as they come, into the staged segment file (NUT): frames are converted
    and handed to the encoder one by one, so a segment's frames are never all in memory (only the encoder's
    lookahead). `width`/`height`: the frames' size; see the module notes for odd sizes."""

    def __init__(self, index: VideoIndex, settings: VideoEncoding, width: int, height: int):
        self.index = index
        self.settings = settings
        self.width, self.height = width, height
        self.pix_fmt = _output_pix_fmt(index, settings)
        fmt = av.VideoFormat(self.pix_fmt)
        self.coded_width, self.coded_height = _coded_size(settings.codec, fmt, width, height)
        self._deep = fmt.components[0].bits > 8
        self._matrix = _SWS_MATRICES[_matrix_of(index)]
        self._range = ColorRange.JPEG if index.color_range == _FULL_RANGE else ColorRange.MPEG
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, "w", format=_SEGMENT_FORMAT, options=_SEGMENT_OPTIONS)
        try:
            self._stream = _add_encoder_stream(self._container, index, settings, self.pix_fmt,
                                               self.coded_width, self.coded_height)
        except BaseException:
            self._container.close()
            raise
        self.frames = 0
        self._packets = 0
        self._last_pts: int | None = None

    def add(self, frame: np.ndarray, pts: int) -> None:
        """One frame, float HxWx3 RGB in [0, 1] (values outside are clipped), at the source frame's pts."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype.kind != "f":
            raise ValueError(f"expected a float {self.height}x{self.width}x3 frame, got {frame.dtype} {frame.shape}")
        if self._last_pts is not None and pts <= self._last_pts:
            raise ValueError(f"pts {pts} after {self._last_pts}: frames must come in presentation order")
        pixels = _quantized(frame, np.uint16 if self._deep else np.uint8)
        if (self.coded_height, self.coded_width) != (self.height, self.width):
            pixels = np.pad(pixels, ((0, self.coded_height - self.height), (0, self.coded_width - self.width), (0, 0)),
                            mode="edge")
        rgb = av.VideoFrame.from_ndarray(pixels, format="rgb48le" if self._deep else "rgb24")
        yuv = rgb.reformat(format=self.pix_fmt, dst_colorspace=self._matrix, dst_color_range=self._range,
                           interpolation=_SWS_FLAGS, threads=1)
        yuv.pts = pts
        yuv.time_base = self.index.time_base
        self._encode(yuv)
        self.frames += 1
        self._last_pts = pts

    def finish(self) -> bytes:
        """Flush the encoder and return the staged segment file's bytes."""
        try:
            self._encode(None)
        finally:
            self._container.close()
        if self.frames == 0:
            raise ValueError("a segment needs at least one frame")
        if self._packets != self.frames:
            raise EncodeError(f"the encoder wrote {self._packets} packets for {self.frames} frames")
        return self._buffer.getvalue()

    def _encode(self, frame: av.VideoFrame | None) -> None:
        try:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
                self._packets += 1
        except av.FFmpegError as error:
            self._container.close()
            raise EncodeError(f"{ENCODERS[self.settings.codec]} failed: {error}") from error


def output_container(source_key: str, index: VideoIndex, codec: str) -> str:
    """The output's extension: the source's container where it holds `codec` (by its standard), else the first of
    .mkv, .mov, .mp4 that holds `codec` and every audio/subtitle codec assemble copies."""
    codec = _canonical_codec(codec)
    own = _SAME_CONTAINER.get(PurePosixPath(source_key).suffix.lower())
    if own and codec in _VIDEO_CODECS[own]:
        return own  # the copied streams came from this kind of container
    for suffix in _FALLBACK_CONTAINERS:
        if codec in _VIDEO_CODECS[suffix] and all(
            _holds(_CONTAINERS[suffix], name) for name in index.audio_codecs + index.subtitle_codecs
        ):
            return suffix
    raise UnsupportedVideoError(
        f"{source_key}: no output container holds {codec} with {', '.join(index.audio_codecs + index.subtitle_codecs)}"
    )


def assemble(
    source: Source,
    segments: list[bytes | str | os.PathLike],
    out: str,
    index: VideoIndex,
    name: str,
    *,
    container: str | None = None,
) -> dict:
    """Join the staged segments (their packets, not re-encoded) and every audio and subtitle packet of the source,
    interleaved by time, into `out` (a local path; the caller commits it). The container follows `container` (an
    extension, e.g. from `output_container`), else the extension of `out`. Streams packet by packet: memory holds
    one packet per stream plus the muxer's interleaving window. On failure `out` is removed."""
    suffix = (container or PurePosixPath(out).suffix).lower()
    if suffix not in _CONTAINERS:
        raise ValueError(f"output container {suffix!r}: one of {', '.join(_CONTAINERS)}")
    depth = _check_segments(segments, index, name)
    try:
        stats = _mux_output(source, segments, depth, out, _CONTAINERS[suffix], index, name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(out)
        raise
    return stats | {"container": suffix}


# --- indexing ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Packet:
    pts: int
    key: bool
    discard: bool
    duration: int


@dataclasses.dataclass(frozen=True)
class _Layout:
    pts: tuple[int, ...]
    keyframes: tuple[int, ...]
    start_seek_pts: int
    dropped: int


class _FirstFrame:
    """Decodes packets from the first keyframe until one frame comes out."""

    def __init__(self, stream: av.video.stream.VideoStream):
        self.stream = stream
        self.frame: av.VideoFrame | None = None
        self.started = False
        stream.codec_context.thread_type = "NONE"  # no frame-threading delay: one frame is all we want

    def feed(self, packet: av.Packet, name: str) -> None:
        if self.frame is not None or not (self.started or packet.is_keyframe):
            return
        self.started = True
        self._take(packet, name)

    def first_frame(self, name: str) -> av.VideoFrame:
        if self.frame is None and self.started:
            self._take(None, name)
        if self.frame is None:
            raise CorruptVideoError(f"{name}: no frame of the video stream can be decoded")
        return self.frame

    def _take(self, packet: av.Packet | None, name: str) -> None:
        try:
            frames = self.stream.decode(packet)
        except av.FFmpegError as error:
            raise CorruptVideoError(f"{name}: the first keyframe cannot be decoded: {error}") from error
        if frames:
            self.frame = frames[0]


def _demux_index(
    file: Source, container, stream, name: str, max_frames: int | None
) -> tuple[list[_Packet], str, _FirstFrame]:
    time_base = Fraction(stream.time_base)
    digest = hashlib.sha256()
    context = stream.codec_context
    _hash_field(digest, context.codec.canonical_name.encode())
    _hash_field(digest, context.extradata or b"")
    probe = _FirstFrame(stream)
    packets: list[_Packet] = []
    frames = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's final flush packet
            if packet.pts is None:
                raise UnsupportedVideoError(
                    f"{name}: video packets without presentation timestamps (e.g. AVI with B-frames): remux the "
                    "file to MKV/MP4 first"
                )
            packets.append(_Packet(packet.pts, packet.is_keyframe, packet.is_discard, packet.duration or 0))
            seconds = packet.pts * time_base
            _hash_field(digest, f"{seconds.numerator}/{seconds.denominator}".encode())
            _hash_field(digest, bytes(packet))
            probe.feed(packet, name)
            frames += not packet.is_discard
            if max_frames is not None and frames > max_frames:
                raise VideoTooLongError(f"{name}: more than the limit of {max_frames} frames")
    except av.FFmpegError as error:
        raise _damaged(file, name, f"demuxing stopped after {len(packets)} video packets: {error}") from error
    # An MP4/MOV sample table lists every packet, so a cut mdat shows here (other containers' counts, e.g. AVI's,
    # include placeholders the demuxer never returns).
    if "mov" in container.format.name.split(",") and len(packets) < stream.frames:
        raise TruncatedError(
            f"{name}: the container lists {stream.frames} video frames but only {len(packets)} are present"
        )
    return packets, digest.hexdigest(), probe


def _hash_field(digest, data: bytes) -> None:
    digest.update(struct.pack("<Q", len(data)))
    digest.update(data)


def _frame_layout(packets: list[_Packet], name: str) -> _Layout:
    first_clean = None
    clean = []
    latest = None  # the largest pts of the frames so far, in decode order
    for position, packet in enumerate(packets):
        if packet.key and (latest is None or latest < packet.pts):
            clean.append(position)
            if first_clean is None:
                first_clean = position
        if not packet.discard:
            latest = packet.pts if latest is None else max(latest, packet.pts)
    if first_clean is None:
        raise CorruptVideoError(f"{name}: the video stream has no keyframe to start decoding at")
    start = packets[first_clean].pts
    frames = [p.pts for p in packets[first_clean:] if not p.discard and p.pts >= start]
    pts = tuple(sorted(frames))
    for earlier, later in zip(pts, pts[1:]):
        if earlier == later:
            raise CorruptVideoError(f"{name}: two video frames share the timestamp {earlier}")
    rank = {value: i for i, value in enumerate(pts)}
    keyframes = tuple(rank[packets[i].pts] for i in clean if not packets[i].discard and packets[i].pts in rank)
    dropped = sum(not p.discard for p in packets) - len(pts)
    return _Layout(pts, keyframes, start, dropped)


def _end_pts(packets, pts, start_time, stream_duration, average_rate, time_base: Fraction) -> int:
    """Where the last frame ends: the stream's own duration when the container stores one (MP4 edit lists, exact
    for variable frame rates), else the packets' durations, else one average frame after the last."""
    if start_time is not None and stream_duration and start_time + stream_duration > pts[-1]:
        return start_time + stream_duration
    ends = [p.pts + p.duration for p in packets if p.duration > 0 and not p.discard]
    if ends and max(ends) > pts[-1]:
        return max(ends)
    if average_rate:
        return pts[-1] + max(1, round(1 / (Fraction(average_rate) * time_base)))
    return pts[-1] + (pts[-1] - pts[-2] if len(pts) > 1 else 1)


def _tag(value: int) -> int | None:
    """Primaries/transfer: 0 is reserved, 2 unspecified."""
    return None if value in (0, _UNSPECIFIED) else int(value)


def _side_data_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    for side_data in frame.side_data:
        if side_data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            return struct.unpack("<9i", bytes(side_data))
    return None


# --- opening and classifying ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _opened(file: Source, name: str) -> Iterator[av.container.InputContainer]:
    if _file_size(file) == 0:
        raise EmptyFileError(f"{name}: file is empty (0 bytes)")
    if _is_path(file):
        file = os.fspath(file)
    else:
        file.seek(0)
    try:
        container = av.open(file, metadata_errors="replace")
    except av.FFmpegError as error:
        raise _unopenable(file, name, error) from error
    try:
        yield container
    finally:
        container.close()


def _is_path(file: Source) -> bool:
    return isinstance(file, (str, os.PathLike))


def _file_size(file: Source) -> int:
    if _is_path(file):
        return os.path.getsize(file)
    position = file.tell()
    size = file.seek(0, os.SEEK_END)
    file.seek(position)
    return size


def _video_stream(container, name: str):
    candidates = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not candidates:
        kinds = ", ".join(s.type for s in container.streams) or "nothing"
        raise NoVideoStreamError(f"{name}: no video stream ({container.format.name} with {kinds})")
    best = container.streams.best("video")
    stream = best if best in candidates else candidates[0]
    if stream.codec_context is None:
        raise UnsupportedCodecError(
            f"{name}: the video stream's codec has no decoder in this FFmpeg build (PyAV {av.__version__})"
        )
    return stream


def _copied_streams(container, name: str) -> list[tuple[str, str]]:
    copied = []
    for stream in container.streams:
        if stream.type not in ("audio", "subtitle"):
            continue
        if stream.codec_context is None:
            raise UnsupportedCodecError(
                f"{name}: {stream.type} stream #{stream.index} is of a codec this FFmpeg build does not know, so "
                "it cannot be copied"
            )
        copied.append((stream.type, stream.codec_context.codec.canonical_name))
    return copied


def _truncation(file: Source, name: str, detail: str = "", boxes: bool = True) -> TruncatedError | None:
    """A TruncatedError when the container's own structure claims more bytes than the file has. `boxes=False`
    skips walking MP4 boxes (a read per top-level box: only worth it once something already went wrong; an intact
    MP4's sample tables catch a cut mdat)."""
    declared, size = _declared_size(file, boxes)
    if declared is not None and declared > size:
        return TruncatedError(f"{name}: {detail}the file is {size} bytes but its container structure spans {declared}")
    return None


def _unopenable(file: Source, name: str, error: Exception) -> Exception:
    if truncated := _truncation(file, name):
        return truncated
    if _container_kind(file) is not None:
        return CorruptVideoError(f"{name}: the container cannot be opened: {error}")
    return NotAVideoError(f"{name}: not a video file FFmpeg recognises ({error})")


def _damaged(file: Source, name: str, detail: str) -> Exception:
    return _truncation(file, name, f"{detail}; ") or CorruptVideoError(f"{name}: {detail}")


def _read_at(file: Source, offset: int, length: int) -> bytes:
    if _is_path(file):
        with open(file, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)
    position = file.tell()
    try:
        file.seek(offset)
        return file.read(length)
    finally:
        file.seek(position)


_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"meta", b"moof", b"mfra",
              b"styp", b"sidx", b"pdin"}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"


def _container_kind(file: Source) -> str | None:
    head = _read_at(file, 0, 12)
    if head[4:8] in _ISO_BOXES:
        return "iso"
    if head.startswith(_EBML_MAGIC):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    return None


def _declared_size(file: Source, boxes: bool) -> tuple[int | None, int]:
    """(bytes the container's top-level structure claims, actual size): ISO-BMFF boxes, the Matroska segment and
    the AVI RIFF chunk state their sizes, so a cut file shows. None when the structure does not say."""
    size = _file_size(file)
    kind = _container_kind(file)
    if kind == "iso" and boxes:
        return _iso_extent(file, size), size
    if kind == "matroska":
        return _matroska_extent(file), size
    if kind == "avi":
        riff = struct.unpack("<I", _read_at(file, 4, 4))[0]
        return 8 + riff, size
    return None, size


def _iso_extent(file: Source, size: int) -> int | None:
    position = 0
    while position < size:
        header = _read_at(file, position, 16)
        if len(header) < 8:
            return position + 8
        box_size, kind = struct.unpack(">I4s", header[:8])
        if box_size == 1:
            if len(header) < 16:
                return position + 16
            box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:
            return None  # the last box runs to the end of the file
        if box_size < 8 or not kind.isascii():
            return None
        position += box_size
    return position


def _matroska_extent(file: Source) -> int | None:
    head = _read_at(file, 0, 64)
    header_size, offset = _ebml_vint(head, 4)
    position = offset + header_size
    segment = _read_at(file, position, 12)
    if segment[:4] != b"\x18\x53\x80\x67":
        return None
    segment_size, data_start = _ebml_vint(segment, 4)
    if segment_size is None:
        return None  # unknown size: a live recording
    return position + data_start + segment_size


def _ebml_vint(data: bytes, offset: int) -> tuple[int | None, int]:
    first = data[offset]
    length = 8 - first.bit_length() + 1
    value = first & (0xFF >> length)
    for byte in data[offset + 1 : offset + length]:
        value = (value << 8) | byte
    unknown = value == (1 << (7 * length)) - 1
    return (None if unknown else value), offset + length


# --- segments ---------------------------------------------------------------------------------------------------


def _copy_segment_packets(container, stream, segment: Segment, name: str) -> bytes | None:
    """The segment's packets as a NUT file, or None when the demuxer is past the keyframe (imprecise seek).

    DTS is rewritten (`_decode_timestamps`): demuxers without stored DTS (Matroska) estimate it, and their estimates
    around open-GOP leading pictures are not always increasing, which NUT refuses."""
    needed = segment.frames
    packets = []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if not packets:
            if packet.pts != segment.seek_pts or not packet.is_keyframe:
                if packet.pts is not None and packet.pts > segment.seek_pts:
                    return None
                continue
        packets.append(packet)
        if segment.first_pts <= packet.pts <= segment.last_pts and not packet.is_discard:
            needed -= 1
            if needed == 0:
                break
    if not packets:
        return None
    if needed:
        raise CorruptVideoError(
            f"{name}: frames {segment.start}-{segment.stop - 1}: {needed} of them are missing from the file: has it "
            "changed since it was indexed?"
        )
    decode_order = [p.pts for p in packets]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=_SEGMENT_FORMAT, options=_SEGMENT_OPTIONS) as out:
        target = out.add_stream_from_template(stream, opaque=True)
        dts = _decode_timestamps(sorted(decode_order), _reorder_depth(decode_order))
        for packet, timestamp in zip(packets, dts):
            packet.stream = target
            packet.dts = timestamp
            out.mux(packet)
    return buffer.getvalue()


def _rescaled(pts: int | None, factor: Fraction) -> int | None:
    return None if pts is None else round(pts * factor)


def _describe_frame(segment: Segment, pts: int, yielded: int) -> str:
    seconds = float(pts * segment.time_base)
    if segment.first_pts <= pts <= segment.last_pts:
        return f"frame {segment.start + yielded} (pts {pts}, {seconds:.3f} s)"
    return f"the reference frame at pts {pts} ({seconds:.3f} s)"


def _to_rgb(frame: av.VideoFrame, matrix: int, full_range: bool) -> np.ndarray:
    """With the index's matrix and range, not the frame's tags: containers (Matroska, MP4) carry the tags of
    codecs whose bitstream has none (FFV1, ProRes), and the NUT file a segment travels in does not."""
    deep = frame.format.components[0].bits > 8
    target = "rgb48le" if deep else "rgb24"
    if frame.format.is_rgb:
        return frame.reformat(format=target, interpolation=_SWS_FLAGS, threads=1).to_ndarray()
    rgb = frame.reformat(
        format=target,
        src_colorspace=_SWS_MATRICES[matrix],
        src_color_range=ColorRange.JPEG if full_range else ColorRange.MPEG,
        dst_color_range=ColorRange.JPEG,
        interpolation=_SWS_FLAGS,
        threads=1,
    )
    return rgb.to_ndarray()


def _assumed_matrix(height: int) -> int:
    return _BT709 if height >= 720 else _BT601


# --- encoding ---------------------------------------------------------------------------------------------------


def _canonical_codec(codec: str) -> str:
    canonical = _CODEC_ALIASES.get(codec.lower(), codec.lower())
    if canonical not in ENCODERS:
        raise ValueError(f"video codec {codec!r}: choose h264, h265 (hevc) or ffv1")
    return canonical


@functools.cache
def _writable_formats(codec: str) -> tuple[str, ...]:
    formats = av.Codec(ENCODERS[codec], "w").video_formats or ()
    return tuple(f.name for f in formats if f.name.startswith(("yuv", "gray")) and not f.name.startswith("yuvj"))


def _quantized(frame: np.ndarray, dtype: type, rows: int = 32) -> np.ndarray:
    """[0, 1] floats -> rounded integers of `dtype`'s full range, a band of rows at a time (the temporaries stay in
    cache: about twice as fast as whole-frame arithmetic on a 2560x1440 frame)."""
    top = float(np.iinfo(dtype).max)
    out = np.empty(frame.shape, dtype)
    band = np.empty((rows, *frame.shape[1:]), np.float32)
    for row in range(0, frame.shape[0], rows):
        values = band[: min(rows, frame.shape[0] - row)]
        np.multiply(frame[row : row + rows], top, out=values)
        values += 0.5
        np.clip(values, 0.0, top, out=values)
        out[row : row + rows] = values
    return out


def _output_pix_fmt(index: VideoIndex, settings: VideoEncoding) -> str:
    if settings.pix_fmt:
        return settings.pix_fmt
    writable = _writable_formats(settings.codec)
    source = av.VideoFormat(index.pix_fmt)
    if source.is_rgb or len(source.components) < 3:  # RGB: 4:4:4 only where it is no compatibility cost
        chroma = "444" if source.is_rgb and settings.codec == "ffv1" else "420"
    else:
        chroma_w = source.chroma_width(4) < 4
        chroma_h = source.chroma_height(4) < 4
        chroma = "420" if chroma_h else "422" if chroma_w else "444"
    depths = [d for d in _DEPTH_SUFFIX if d >= index.bit_depth] + sorted(
        (d for d in _DEPTH_SUFFIX if d < index.bit_depth), reverse=True
    )
    for layout in (chroma, "420"):
        for depth in depths:
            candidate = f"yuv{layout}p{_DEPTH_SUFFIX[depth]}"
            if candidate in writable:
                return candidate
    return "yuv420p"


def _coded_size(codec: str, fmt: av.VideoFormat, width: int, height: int) -> tuple[int, int]:
    if codec == "ffv1":
        return width, height
    step_w = 2 if fmt.chroma_width(2) < 2 else 1
    step_h = 2 if fmt.chroma_height(2) < 2 else 1
    return width + (-width % step_w), height + (-height % step_h)


def _matrix_of(index: VideoIndex) -> int:
    """The matrix the clip is converted with in both directions: its tag, or the players' guess for its height."""
    if index.colorspace in _SWS_MATRICES:
        return index.colorspace
    return _assumed_matrix(index.height)


def _frame_rate(index: VideoIndex) -> Fraction:
    if index.average_rate:
        return index.average_rate
    return Fraction(index.frames, 1) / Fraction(index.duration).limit_denominator(1_000_000)


def _encoder_options(settings: VideoEncoding) -> dict[str, str]:
    flags = {"flags": "+global_header+bitexact"}  # headers in extradata, as MP4/Matroska need them
    if settings.codec == "h264":
        return flags | {"preset": settings.preset, "crf": str(settings.crf), "x264-params": "cpu-independent=1"}
    if settings.codec == "h265":
        frame_threads = max(1, settings.threads // 2)
        return flags | {
            "preset": settings.preset,
            "crf": str(settings.crf),
            "x265-params": f"pools={settings.threads}:frame-threads={frame_threads}:lookahead-slices=0"
            ":log-level=error",
        }
    return flags | {"level": "3", "slices": str(_FFV1_SLICES), "slicecrc": "1", "g": "1"}


def _add_encoder_stream(container, index: VideoIndex, settings: VideoEncoding, pix_fmt: str, width: int,
                        height: int):
    stream = container.add_stream(ENCODERS[settings.codec], rate=_frame_rate(index),
                                  options=_encoder_options(settings))
    context = stream.codec_context
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    stream.time_base = index.time_base
    context.time_base = index.time_base
    context.thread_count = settings.threads
    context.thread_type = "SLICE" if settings.codec == "ffv1" else "FRAME"
    _describe_pictures(context, index)
    return stream


def _describe_pictures(context, index: VideoIndex) -> None:
    """Colour tags and pixel aspect: into the encoder (H.264/H.265 VUI) and the output container (FFV1 has no VUI,
    and the staged NUT files carry neither)."""
    if index.sample_aspect_ratio:
        context.sample_aspect_ratio = index.sample_aspect_ratio
    context.colorspace = _matrix_of(index)
    context.color_range = index.color_range or 0
    context.color_primaries = index.color_primaries or _UNSPECIFIED
    context.color_trc = index.color_trc or _UNSPECIFIED


# --- assembly ---------------------------------------------------------------------------------------------------


def _open_segment(segment: bytes | str | os.PathLike):
    return av.open(io.BytesIO(segment) if isinstance(segment, bytes) else os.fspath(segment))


def _segment_signature(stream) -> tuple:
    context = stream.codec_context
    return (context.codec.canonical_name, context.width, context.height, context.pix_fmt, context.extradata or b"")


def _check_segments(segments: list[bytes | str | os.PathLike], index: VideoIndex, name: str) -> int:
    """Before writing anything: every segment starts with a keyframe, has the first one's codec parameters
    (extradata included), and together they hold each of the index's frames exactly once. Returns the deepest
    reorder delay of any segment."""
    if not segments:
        raise AssemblyError(f"{name}: no staged segments")
    depth, reference, position = 0, None, 0
    for number, segment in enumerate(segments):
        try:
            with _open_segment(segment) as container:
                stream = container.streams.video[0]
                signature = _segment_signature(stream)
                to_index = Fraction(stream.time_base) / index.time_base
                decode_order = []
                first_key = None
                for packet in container.demux(stream):
                    if packet.size == 0:
                        continue
                    if first_key is None:
                        first_key = packet.is_keyframe
                    decode_order.append(_rescaled(packet.pts, to_index))
        except av.FFmpegError as error:
            raise AssemblyError(f"{name}: staged segment {number} cannot be read: {error}") from error
        if reference is None:
            reference = signature
        elif signature != reference:
            raise AssemblyError(
                f"{name}: staged segment {number} was encoded with different codec parameters than segment 0 "
                f"({_signature_difference(reference, signature)}): all segments must come from the same settings "
                "and encoder build"
            )
        if not first_key:
            raise AssemblyError(f"{name}: staged segment {number} does not start with a keyframe")
        presented = sorted(decode_order)
        expected = index.pts[position : position + len(presented)]
        if tuple(presented) != expected:
            raise AssemblyError(f"{name}: staged segment {number} {_frames_difference(expected, presented, position)}")
        depth = max(depth, _reorder_depth(decode_order))
        position += len(presented)
    if position != index.frames:
        raise AssemblyError(f"{name}: the staged segments hold {position} of {index.frames} frames")
    return depth


def _signature_difference(reference: tuple, signature: tuple) -> str:
    fields = ("codec", "width", "height", "pixel format", "extradata")
    return ", ".join(f"{field} {a!r} vs {b!r}" if field != "extradata" else "extradata differs"
                     for field, a, b in zip(fields, reference, signature) if a != b)


def _frames_difference(expected: tuple[int, ...], presented: list[int], position: int) -> str:
    for offset, (want, got) in enumerate(zip(expected, presented)):
        if want != got:
            return f"has pts {got} where frame {position + offset} (pts {want}) belongs"
    return f"holds {len(presented)} frames but only {len(expected)} remain from frame {position}"


def _reorder_depth(decode_order: list[int]) -> int:
    """How many places any packet is decoded ahead of its presentation position."""
    rank = {value: i for i, value in enumerate(sorted(decode_order))}
    return max(i - rank[value] for i, value in enumerate(decode_order))


def _decode_timestamps(pts: tuple[int, ...] | list[int], depth: int) -> Iterator[int]:
    """DTS for the i-th packet in decode order: the i-depth-th smallest pts, extrapolated below the first pts for
    the first `depth` packets (x264's own rule), so DTS increases and never exceeds the packet's pts."""
    for i in range(len(pts)):
        yield pts[i - depth] if i >= depth else pts[0] - (pts[depth] - pts[i])


def _mux_output(source: Source, segments, depth: int, out: str, fmt: str, index: VideoIndex, name: str) -> dict:
    dts = _decode_timestamps(index.pts, depth)
    ends = index.pts[1:] + (index.end_pts,)
    durations = {pts: end - pts for pts, end in zip(index.pts, ends)}
    with _opened(source, name) as src, _open_segment(segments[0]) as first:
        with av.open(out, "w", format=fmt, options=_MUXER_OPTIONS[fmt]) as dst:
            video_source = _video_stream(src, name)
            template = first.streams.video[0]
            codec = template.codec_context.codec.canonical_name
            video = dst.add_stream_from_template(template, opaque=True)
            video.time_base = index.time_base
            _describe_pictures(video.codec_context, index)
            video.metadata.update({k: v for k, v in video_source.metadata.items() if k.lower() in _VIDEO_METADATA})
            video.disposition = video_source.disposition
            if index.display_matrix:
                video.set_display_matrix(index.display_matrix)
            if fmt in ("mp4", "mov") and codec == "hevc":
                video.codec_tag = "hvc1"  # Apple players only play hvc1-tagged HEVC
            copies = {}
            copied_names = []
            for stream in src.streams:
                if stream.type in ("audio", "subtitle"):
                    copied = f"{stream.type}:{stream.codec_context.codec.canonical_name}"
                    try:
                        target = dst.add_stream_from_template(stream)
                    except ValueError as error:
                        raise AssemblyError(f"{name}: {fmt} cannot hold {copied} (see output_container)") from error
                    target.metadata.update(stream.metadata)
                    target.disposition = stream.disposition
                    copies[stream.index] = target
                    copied_names.append(copied)
                elif stream.type == "attachment" and fmt == "matroska":
                    dst.add_stream_from_template(stream)
            dst.metadata.update({k: v for k, v in src.metadata.items() if k.lower() != "encoder"})
            if src.chapters():
                dst.set_chapters(src.chapters())
            video_packets = _video_packets(segments, video, index.time_base, dts, durations)
            other_packets = _source_packets(src, copies)
            written = {"video": 0, "other": 0}
            try:
                for packet in heapq.merge(video_packets, other_packets, key=_packet_time):
                    written["video" if packet.stream_index == video.index else "other"] += 1
                    dst.mux(packet)
            except av.FFmpegError as error:
                raise AssemblyError(f"{name}: writing the output failed: {error}") from error
    return {
        "frames": written["video"],
        "duration_s": index.duration,
        "streams_copied": copied_names,
        "packets_copied": written["other"],
        "codec": codec,
        "bytes": os.path.getsize(out),
    }


def _video_packets(segments, video, time_base: Fraction, dts: Iterator[int], durations: dict[int, int]
                   ) -> Iterator[av.Packet]:
    for segment in segments:
        with _open_segment(segment) as container:
            stream = container.streams.video[0]
            to_index = Fraction(stream.time_base) / time_base
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                pts = _rescaled(packet.pts, to_index)
                packet.stream = video
                packet.time_base = time_base
                packet.pts = pts
                packet.dts = next(dts)
                packet.duration = durations[pts]
                yield packet


def _source_packets(src, copies: dict) -> Iterable[av.Packet]:
    if not copies:
        return
    streams = [s for s in src.streams if s.index in copies]
    mov_text = {s.index for s in streams if s.codec_context.codec.canonical_name == "mov_text"}
    for packet in src.demux(*streams):
        if packet.size == 0 and packet.pts is None and packet.dts is None:
            continue  # the demuxer's end-of-stream packets
        if packet.stream_index in mov_text and bytes(packet) == _MOV_TEXT_EMPTY:
            continue  # an MP4 muxer's end-of-subtitle sample: the output's muxer writes its own from the durations
        packet.stream = copies[packet.stream_index]
        yield packet


def _packet_time(packet: av.Packet) -> float:
    timestamp = packet.dts if packet.dts is not None else packet.pts
    return float((timestamp or 0) * packet.time_base)


@functools.cache
def _holds(fmt: str, codec: str) -> bool:
    """Whether FFmpeg's `fmt` muxer accepts `codec` (its own avformat_query_codec, as stream copying checks)."""
    with av.open(io.BytesIO(), "w", format=fmt) as probe:
        try:
            probe.add_mux_stream(codec)
        except ValueError:
            return False
    return True
