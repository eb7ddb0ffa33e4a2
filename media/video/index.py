"""Indexing a clip from its packets: every frame's timestamp, where decoding can start, and the facts decoding,
encoding and assembly need (colour, interlacing, rotation, timecode, HDR metadata, the streams to copy). One frame is
decoded; the rest is demuxing. Limits that the headers already decide (too long, no decoder) fail before any packet
is read."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct
from fractions import Fraction

import av

from ..errors import CorruptVideoError, TruncatedError, UnsupportedVideoError, VideoTooLongError, ZeroFramesError
from . import colour
from .source import Source, copied_streams, damaged, opened, truncation, video_stream

# Demuxers whose timestamps are a clock running before the recording (MPEG-TS/PS: often hours): players show time
# from the file's start, and so do our outputs.
_CLOCK_CONTAINERS = {"mpegts", "mpeg", "mpegtsraw"}
_FIELD_ORDERS = {1: "progressive", 2: "tt", 3: "bb", 4: "tb", 5: "bt"}  # AVFieldOrder; 0 is unknown


@dataclasses.dataclass(frozen=True)
class VideoIndex:
    """What planning, decoding, encoding and assembly need to know about a clip; built from packets alone.

    Timestamps are in `time_base` units of the source's video stream, as the demuxer gives them. Colour tags are
    FFmpeg's AVCOL_* numbers, None when the source leaves them unspecified."""

    frames: int
    time_base: Fraction
    pts: tuple[int, ...]  # every frame's presentation timestamp, in presentation order
    keyframes: tuple[int, ...]  # indices into `pts` of frames decoding can start at (clean keyframes)
    start_seek_pts: int  # pts of the keyframe packet decoding must start at to reach frame 0 (<= pts[0])
    end_pts: int  # where the last frame ends (its pts + its duration)
    width: int  # coded size, before rotation
    height: int
    codec: str  # FFmpeg's codec name (h264, hevc, prores, ...)
    pix_fmt: str  # as decoded
    bit_depth: int
    color_range: int | None  # 1 limited, 2 full (yuvj* sources are full)
    color_primaries: int | None
    color_trc: int | None
    colorspace: int | None  # the YUV matrix; 0 is RGB
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
    first_pts: int = 0  # pts of frame 0 (kept when a slim copy drops `pts`): staged segments count from it
    field_order: str = "progressive"  # progressive, tt, bb, tb, bt (top/bottom coded/displayed first), unknown
    interlaced: bool = False  # coded as interlaced (fields), by the stream or its first frame
    clock_offset: Fraction = Fraction(0)  # seconds subtracted from every timestamp at assembly (MPEG-TS clocks)
    timecode: str | None = None  # SMPTE timecode of the first frame (tmcd track, container or stream tag)
    mastering_display: str | None = None  # HDR10 metadata in x265's notation (`colour.hdr_metadata`)
    content_light: str | None = None

    @property
    def audio_streams(self) -> int:
        return len(self.audio_codecs)

    @property
    def subtitle_streams(self) -> int:
        return len(self.subtitle_codecs)

    @property
    def colour(self) -> colour.ColourTags:
        """The source as players read it (its tags, and their guesses for missing ones)."""
        return colour.source_colour(self.height, self.color_primaries, self.color_trc, self.colorspace,
                                    self.color_range)


def index_video(file: Source, name: str, *, max_frames: int | None = None,
                max_seconds: float | None = None) -> VideoIndex:
    """Index a clip from its packets (one frame is decoded, for the display matrix, interlacing, HDR metadata and the
    decoder's view of the colour tags). `name` is only used in error messages; `max_frames` rejects longer clips
    (`VideoTooLongError`), from the headers where they tell; `max_seconds` likewise, with a margin (clips near the
    limit are indexed whole: the caller decides them from `duration`)."""
    with opened(file, name) as container:
        stream = video_stream(container, name)
        copied = copied_streams(container, name)
        if max_frames is not None:
            _check_declared_length(container, stream, name, max_frames)
        if max_seconds is not None:
            _check_declared_duration(container, stream, name, max_seconds)
        if truncated := truncation(file, name, boxes=False):
            raise truncated
        packets, digest, probe = _demux_index(file, container, stream, name, max_frames, max_seconds)
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
        field_order = _FIELD_ORDERS.get(stream.codec_context.field_order, "unknown")
        clock_offset = _clock_offset(container) if container_name in _CLOCK_CONTAINERS else Fraction(0)
        timecode = _timecode(container, stream)
    fmt = first.format
    color_range = colour.FULL_RANGE if fmt.name.startswith("yuvj") else first.color_range or None  # 0: unspecified
    matrix = _side_data_matrix(first)
    mastering_display, content_light = colour.hdr_metadata(first)
    return VideoIndex(
        frames=len(pts),
        time_base=time_base,
        pts=pts,
        keyframes=layout.keyframes,
        start_seek_pts=layout.start_seek_pts,
        first_pts=pts[0],
        end_pts=end_pts,
        width=first.width,
        height=first.height,
        codec=codec,
        pix_fmt=fmt.name,
        bit_depth=fmt.components[0].bits,
        color_range=color_range,
        color_primaries=colour.tag(first.color_primaries),
        color_trc=colour.tag(first.color_trc),
        colorspace=None if first.colorspace == colour.UNSPECIFIED else int(first.colorspace),  # 0 is RGB
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
        field_order=field_order,
        interlaced=field_order in ("tt", "bb", "tb", "bt") or bool(first.interlaced_frame),
        clock_offset=clock_offset,
        timecode=timecode or _gop_timecode(first),
        mastering_display=mastering_display,
        content_light=content_light,
    )


def field_rate_index(index: VideoIndex) -> VideoIndex:
    """The timeline of a clip deinterlaced at field rate (one output frame per field): the time base halved, so that
    every field's time is exact, and two frames per source frame, at the frame's time and halfway to the next (the
    last one's halfway to `end_pts`), as bwdif's `send_field` places them. Keyframes mean nothing on it (the output
    is encoded, never seeked in the source); the rest (colour, size, streams to copy, clock offset in seconds) is the
    source's."""
    ends = index.pts[1:] + (index.end_pts,)
    pts = tuple(value for start, end in zip(index.pts, ends) for value in (2 * start, start + end))
    return dataclasses.replace(
        index, frames=2 * index.frames, time_base=index.time_base / 2, pts=pts, keyframes=(),
        start_seek_pts=2 * index.start_seek_pts, end_pts=2 * index.end_pts, first_pts=2 * index.first_pts,
        average_rate=2 * index.average_rate if index.average_rate else None)


def _check_declared_length(container, stream, name: str, max_frames: int) -> None:
    """Reject from the headers what is certainly too long: an MP4/MOV sample count, else duration x frame rate with
    a margin for rounding (demuxing the file would say the same, hours later for a film)."""
    if "mov" in container.format.name.split(",") and stream.frames > max_frames:
        raise VideoTooLongError(f"{name}: {stream.frames} frames, more than the limit of {max_frames}")
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and rate:
        estimate = stream.duration * Fraction(stream.time_base) * Fraction(rate)
        if estimate > max_frames * 1.05 + 2:
            raise VideoTooLongError(f"{name}: about {round(estimate)} frames, more than the limit of {max_frames}")


def _seconds_limit(max_seconds: float) -> float:
    return max_seconds * 1.05 + 1  # what is certainly longer, whatever the rounding of declared durations


def _check_declared_duration(container, stream, name: str, max_seconds: float) -> None:
    """Reject from the headers what certainly lasts longer: the stream's duration, else Matroska's per-track DURATION
    tag, else the container's duration when the video is its only stream."""
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif tag := stream.metadata.get("DURATION"):
        with contextlib.suppress(ValueError):
            hours, minutes, rest = tag.split(":")
            seconds = int(hours) * 3600 + int(minutes) * 60 + float(rest)
    elif container.duration and len(container.streams) == 1:
        seconds = container.duration / av.time_base
    if seconds is not None and seconds > _seconds_limit(max_seconds):
        raise VideoTooLongError(f"{name}: {seconds:.1f} s, longer than the limit of {max_seconds} s")


def _clock_offset(container) -> Fraction:
    """Where the file starts on its clock, in seconds: the earliest first timestamp of any stream."""
    starts = [Fraction(s.start_time) * Fraction(s.time_base) for s in container.streams
              if s.start_time is not None and s.time_base]
    return min(starts, default=Fraction(0))


def _gop_timecode(frame: av.VideoFrame) -> str | None:
    """An MPEG-2 GOP header's timecode (25 bits: drop flag, hours, minutes, marker, seconds, frames), as FFmpeg's
    decoder exports it; players and ffprobe show it as the stream's timecode."""
    for side_data in frame.side_data:
        if side_data.type == av.sidedata.sidedata.Type.GOP_TIMECODE:
            (value,) = struct.unpack("<q", bytes(side_data)[:8])
            drop, hours = (value >> 24) & 1, (value >> 19) & 0x1F
            minutes, seconds, frames = (value >> 13) & 0x3F, (value >> 6) & 0x3F, value & 0x3F
            return f"{hours:02d}:{minutes:02d}:{seconds:02d}{';' if drop else ':'}{frames:02d}"
    return None


def _timecode(container, stream) -> str | None:
    """The first frame's timecode: the video stream's tag (MOV/MP4 tmcd tracks are read into it), a data track's,
    or the container's (MXF, Matroska)."""
    for streamish in (stream, *container.streams.data, container):
        value = streamish.metadata.get("timecode")
        if value:
            return value
    return None


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
    file: Source, container, stream, name: str, max_frames: int | None, max_seconds: float | None = None
) -> tuple[list[_Packet], str, _FirstFrame]:
    time_base = Fraction(stream.time_base)
    span = None if max_seconds is None else Fraction(_seconds_limit(max_seconds)) / time_base  # in pts units
    earliest = None
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
            if span is not None and not packet.is_discard:
                earliest = packet.pts if earliest is None else min(earliest, packet.pts)
                if packet.pts - earliest > span:
                    raise VideoTooLongError(f"{name}: longer than the limit of {max_seconds} s")
    except av.FFmpegError as error:
        raise damaged(file, name, f"demuxing stopped after {len(packets)} video packets: {error}") from error
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


def _side_data_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    for side_data in frame.side_data:
        if side_data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            return struct.unpack("<9i", bytes(side_data))
    return None


