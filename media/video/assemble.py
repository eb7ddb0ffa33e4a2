"""Assembly: join a clip's staged segments (their packets, not re-encoded) with the source's audio and subtitle
packets, chapters, tags and timecode into the output file, on the timeline a player shows for the source."""

from __future__ import annotations

import contextlib
import functools
import heapq
import io
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import PurePosixPath

import av

from ..errors import AssemblyError, UnsupportedVideoError
from . import colour
from .encode import canonical_codec, frame_rate
from .index import VideoIndex
from .source import Source, opened, video_stream

# Output containers by extension: the FFmpeg muxer, and which of our video codecs it holds by its standard.
_CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
_VIDEO_CODECS = {".mp4": {"h264", "h265"}, ".mov": {"h264", "h265", "prores", "dnxhr"},
                 ".mkv": {"h264", "h265", "ffv1", "prores"}}
_SAME_CONTAINER = {".mp4": ".mp4", ".m4v": ".mp4", ".mov": ".mov", ".mkv": ".mkv"}
_FALLBACK_CONTAINERS = (".mkv", ".mov", ".mp4")
_INTRA_FALLBACK = (".mov", ".mkv")  # ProRes and DNxHR live in QuickTime first
# use_metadata_tags: MP4/MOV keep every container tag, not only the iTunes-style ones the muxer knows.
_MUXER_OPTIONS = {
    "mp4": {"fflags": "+bitexact", "movflags": "+faststart+use_metadata_tags"},
    "mov": {"fflags": "+bitexact", "movflags": "+faststart+use_metadata_tags"},
    "matroska": {"fflags": "+bitexact"},
}
_VIDEO_METADATA = ("language", "title")  # the rest of the source video stream's tags describe its encoding
_MOV_TEXT_EMPTY = b"\x00\x00"  # a mov_text sample with no text
_PROGRESSIVE = 1  # AV_FIELD_PROGRESSIVE


def output_container(source_key: str, index: VideoIndex, codec: str) -> str:
    """The output's extension for a concrete `codec` (`VideoEncoding.for_clip`): the source's container where it
    holds `codec` (by its standard), else the first of .mkv, .mov, .mp4 (.mov, .mkv for ProRes and DNxHR) that
    holds `codec` and every audio/subtitle codec assemble copies."""
    codec = canonical_codec(codec)
    own = _SAME_CONTAINER.get(PurePosixPath(source_key).suffix.lower())
    if own and codec in _VIDEO_CODECS[own]:
        return own  # the copied streams came from this kind of container
    for suffix in _INTRA_FALLBACK if codec in ("prores", "dnxhr") else _FALLBACK_CONTAINERS:
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
    progressive: bool = True,
) -> dict:
    """Join the staged segments (their packets, not re-encoded) and every audio and subtitle packet of the source,
    interleaved by time, into `out` (a local path; the caller commits it). The container follows `container` (an
    extension, e.g. from `output_container`), else the extension of `out`. Streams packet by packet: memory holds
    one packet per stream plus the muxer's interleaving window. `progressive`: tag the output so (False for interlaced
    sources kept woven). On failure `out` is removed."""
    suffix = (container or PurePosixPath(out).suffix).lower()
    if suffix not in _CONTAINERS:
        raise ValueError(f"output container {suffix!r}: one of {', '.join(_CONTAINERS)}")
    depth = _check_segments(segments, index, name)
    try:
        stats = _mux_output(source, segments, depth, out, _CONTAINERS[suffix], index, name, progressive)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(out)
        raise
    return stats | {"container": suffix}


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
                    decode_order.append(_rescaled(packet.pts, to_index) + index.first_pts)
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


def _rescaled(pts: int | None, factor: Fraction) -> int | None:
    return None if pts is None else round(pts * factor)


def _reorder_depth(decode_order: list[int]) -> int:
    """How many places any packet is decoded ahead of its presentation position."""
    rank = {value: i for i, value in enumerate(sorted(decode_order))}
    return max(i - rank[value] for i, value in enumerate(decode_order))


def _decode_timestamps(pts: tuple[int, ...] | list[int], depth: int) -> Iterator[int]:
    """DTS for the i-th packet in decode order: the i-depth-th smallest pts, extrapolated below the first pts for
    the first `depth` packets (x264's own rule), so DTS increases and never exceeds the packet's pts."""
    for i in range(len(pts)):
        yield pts[i - depth] if i >= depth else pts[0] - (pts[depth] - pts[i])


def _mux_output(source: Source, segments, depth: int, out: str, fmt: str, index: VideoIndex, name: str,
                progressive: bool) -> dict:
    dts = _decode_timestamps(index.pts, depth)
    ends = index.pts[1:] + (index.end_pts,)
    durations = {pts: end - pts for pts, end in zip(index.pts, ends)}
    with opened(source, name) as src, _open_segment(segments[0]) as first:
        with av.open(out, "w", format=fmt, options=_MUXER_OPTIONS[fmt]) as dst:
            video_source = video_stream(src, name)
            template = first.streams.video[0]
            codec = template.codec_context.codec.canonical_name
            video = dst.add_stream_from_template(template, opaque=True)
            video.time_base = index.time_base
            output_colour = colour.output_colour(index.colour, template.codec_context.height)
            colour.describe(video.codec_context, output_colour, index.sample_aspect_ratio)
            if progressive:
                video.codec_context.field_order = _PROGRESSIVE
            video.codec_context.framerate = frame_rate(index)  # muxers read timecodes at this rate
            if index.timecode:
                video.metadata["timecode"] = index.timecode  # MOV/MP4: a tmcd track; Matroska: a tag
            video.metadata.update({k: v for k, v in video_source.metadata.items() if k.lower() in _VIDEO_METADATA})
            video.disposition = video_source.disposition
            if index.display_matrix:
                video.set_display_matrix(index.display_matrix)
            if fmt in ("mp4", "mov") and codec == "hevc":
                video.codec_tag = "hvc1"  # Apple players only play hvc1-tagged HEVC
            elif fmt == "mov" and codec == "prores":
                video.codec_tag = template.codec_context.codec_tag  # the tag names the profile (apch, ap4h, ...)
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
            video_packets = _video_packets(segments, video, index, dts, durations)
            other_packets = _source_packets(src, copies, index.clock_offset)
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


def _video_packets(segments, video, index: VideoIndex, dts: Iterator[int], durations: dict[int, int]
                   ) -> Iterator[av.Packet]:
    """The staged packets on the source's timeline (they are stored relative to its first frame), less the clock
    offset."""
    shift = _clock_shift(index.clock_offset, index.time_base)
    for segment in segments:
        with _open_segment(segment) as container:
            stream = container.streams.video[0]
            to_index = Fraction(stream.time_base) / index.time_base
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                pts = _rescaled(packet.pts, to_index) + index.first_pts
                packet.stream = video
                packet.time_base = index.time_base
                packet.pts = pts - shift
                packet.dts = next(dts) - shift
                packet.duration = durations[pts]
                yield packet


def _clock_shift(offset: Fraction, time_base: Fraction) -> int:
    return round(offset / time_base)


def _source_packets(src, copies: dict, clock_offset: Fraction) -> Iterable[av.Packet]:
    if not copies:
        return
    shifts = {index: _clock_shift(clock_offset, Fraction(src.streams[index].time_base)) for index in copies}
    streams = [s for s in src.streams if s.index in copies]
    mov_text = {s.index for s in streams if s.codec_context.codec.canonical_name == "mov_text"}
    for packet in src.demux(*streams):
        if packet.size == 0 and packet.pts is None and packet.dts is None:
            continue  # the demuxer's end-of-stream packets
        if packet.stream_index in mov_text and bytes(packet) == _MOV_TEXT_EMPTY:
            continue  # an MP4 muxer's end-of-subtitle sample: the output's muxer writes its own from the durations
        shift = shifts[packet.stream_index]
        if shift:
            packet.pts = None if packet.pts is None else packet.pts - shift
            packet.dts = None if packet.dts is None else packet.dts - shift
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

