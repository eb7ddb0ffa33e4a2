"""Encoding a segment's upscaled frames into a staged segment file, with settings that make the bytes a function of
the frames alone (pinned threads, bit-exact muxing), the source's chroma layout and bit depth kept where the codec
allows, and explicit colour tags (see `colour.output_colour`)."""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Mapping
from fractions import Fraction

import av
import numpy as np

from ..errors import EncodeError
from . import colour
from .index import VideoIndex

ENCODERS = {"h264": "libx264", "h265": "libx265", "ffv1": "ffv1", "prores": "prores_ks", "dnxhr": "dnxhd"}
CODECS = ("auto", *ENCODERS)
_CODEC_ALIASES = {"hevc": "h265", "avc": "h264", "dnxhd": "dnxhr"}
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
_LOSSY_WITH_CRF = ("h264", "h265")
_FFV1_SLICES = 4
_DEPTH_SUFFIX = {8: "", 10: "10le", 12: "12le", 16: "16le"}
_UHD_PIXELS = 3840 * 2160
# Intra-only mezzanine codecs: (pix_fmt, profile) for 4:2:2 and for 4:4:4 sources.
_INTRA_PROFILES = {
    "prores": {"422": ("yuv422p10le", "3"), "444": ("yuv444p10le", "4")},  # 422 HQ, 4444
    "dnxhr": {"422": ("yuv422p10le", "dnxhr_hqx"), "444": ("yuv444p10le", "dnxhr_444")},
}
_PARAMS_OPTIONS = {"h264": "x264-params", "h265": "x265-params"}
# DNxHR's smallest frame: FFmpeg's encoder refuses smaller ones, and has been seen corrupting its heap doing so
_DNXHR_MIN_SIZE = (256, 120)
# Staged segments: NUT stores any time base exactly; MOV for the codecs NUT does not take.
_STAGING = {"prores": "mov", "dnxhr": "mov"}
# B-frames give the first packets a negative DTS; shifting them would move every timestamp.
_STAGING_OPTIONS = {"nut": {"fflags": "+bitexact", "avoid_negative_ts": "disabled"}, "mov": {"fflags": "+bitexact"}}


@dataclasses.dataclass(frozen=True)
class VideoEncoding:
    """How staged segments are encoded. `codec`: auto (H.264, or H.265 above 4K, above 8 bits or for HDR), h264
    (libx264), h265/hevc (libx265), ffv1 (lossless, Matroska), prores (422 HQ, or 4444 for 4:4:4/RGB sources; MOV)
    or dnxhr (HQX, or 444; MOV); `crf` and `preset` apply to h264/h265. `pix_fmt`: None keeps the source's chroma
    subsampling and bit depth (see the package notes). `encoder_options`: FFmpeg/x264/x265 options added to ours
    (e.g. `tune: grain`, `g: 48`, `x265-params: ...`, appended to the pinned ones). `threads` is part of the
    output's identity: x264/x265 bitstreams depend on it."""

    codec: str = "auto"
    crf: int = 18
    preset: str = "medium"
    pix_fmt: str | None = None
    threads: int = 4
    encoder_options: tuple[tuple[str, str], ...] | Mapping[str, str] = ()  # stored as sorted pairs (hashable)

    def __post_init__(self) -> None:
        codec = canonical_codec(self.codec)
        object.__setattr__(self, "codec", codec)
        object.__setattr__(self, "encoder_options",
                           tuple(sorted((str(k), str(v)) for k, v in dict(self.encoder_options).items())))
        if codec in ("auto", *_LOSSY_WITH_CRF):
            if not (isinstance(self.crf, int) and 0 <= self.crf <= 51):
                raise ValueError(f"crf {self.crf!r}: an integer from 0 (best) to 51 for {codec}")
            if self.preset not in PRESETS:
                raise ValueError(f"preset {self.preset!r}: one of {', '.join(PRESETS)}")
        if not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"threads {self.threads!r}: a positive integer (pinned: it changes x264/x265 output)")
        if self.pix_fmt is not None:
            codecs = ("h264", "h265") if codec == "auto" else (codec,)
            for concrete in codecs:
                if self.pix_fmt not in writable_formats(concrete):
                    raise ValueError(
                        f"pix_fmt {self.pix_fmt!r} cannot be written by {ENCODERS[concrete]}; it writes "
                        f"{', '.join(writable_formats(concrete))} (the range follows the source's tag, not yuvj*)"
                    )

    def for_clip(self, index: VideoIndex, width: int, height: int) -> VideoEncoding:
        """The concrete settings for one clip: `auto` resolved by its output size, bit depth and transfer."""
        if self.codec != "auto":
            return self
        large = width * height > _UHD_PIXELS
        deep = index.bit_depth > 8 or (self.pix_fmt is not None and av.VideoFormat(self.pix_fmt).components[0].bits > 8)
        return dataclasses.replace(self, codec="h265" if large or deep or index.colour.hdr else "h264")


def canonical_codec(codec: str) -> str:
    canonical = _CODEC_ALIASES.get(codec.lower(), codec.lower())
    if canonical not in CODECS:
        raise ValueError(f"video codec {codec!r}: choose {', '.join(CODECS)}")
    return canonical


@functools.cache
def writable_formats(codec: str) -> tuple[str, ...]:
    formats = av.Codec(ENCODERS[codec], "w").video_formats or ()
    return tuple(f.name for f in formats if f.name.startswith(("yuv", "gray")) and not f.name.startswith("yuvj"))


def quantized(frame: np.ndarray, dtype: type, rows: int = 32) -> np.ndarray:
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


def _chroma_layout(index: VideoIndex) -> str:
    source = av.VideoFormat(index.pix_fmt)
    if source.is_rgb:
        return "444"
    if len(source.components) < 3:
        return "420"
    return "420" if source.chroma_height(4) < 4 else "422" if source.chroma_width(4) < 4 else "444"


def output_pix_fmt(index: VideoIndex, settings: VideoEncoding) -> str:
    if settings.pix_fmt:
        return settings.pix_fmt
    layout = _chroma_layout(index)
    if settings.codec in _INTRA_PROFILES:
        return _INTRA_PROFILES[settings.codec]["444" if layout == "444" else "422"][0]
    if av.VideoFormat(index.pix_fmt).is_rgb and settings.codec != "ffv1":
        layout = "420"  # RGB: 4:4:4 only where it is no compatibility cost
    writable = writable_formats(settings.codec)
    depths = [d for d in _DEPTH_SUFFIX if d >= index.bit_depth] + sorted(
        (d for d in _DEPTH_SUFFIX if d < index.bit_depth), reverse=True
    )
    for candidate_layout in (layout, "420"):
        for depth in depths:
            candidate = f"yuv{candidate_layout}p{_DEPTH_SUFFIX[depth]}"
            if candidate in writable:
                return candidate
    return "yuv420p"


def _coded_size(codec: str, fmt: av.VideoFormat, width: int, height: int) -> tuple[int, int]:
    if codec == "ffv1":
        return width, height
    step_w = 2 if fmt.chroma_width(2) < 2 else 1
    step_h = 2 if fmt.chroma_height(2) < 2 else 1
    return width + (-width % step_w), height + (-height % step_h)


def frame_rate(index: VideoIndex) -> Fraction:
    if index.average_rate:
        return index.average_rate
    return Fraction(index.frames, 1) / Fraction(index.duration).limit_denominator(1_000_000)


def _encoder_options(settings: VideoEncoding, index: VideoIndex, pix_fmt: str) -> dict[str, str]:
    options = {"flags": "+global_header+bitexact"}  # headers in extradata, as MP4/Matroska need them
    if settings.codec == "h264":
        options |= {"preset": settings.preset, "crf": str(settings.crf), "x264-params": "cpu-independent=1"}
    elif settings.codec == "h265":
        frame_threads = max(1, settings.threads // 2)
        params = f"pools={settings.threads}:frame-threads={frame_threads}:lookahead-slices=0:log-level=error"
        if index.mastering_display:
            params += f":hdr10=1:master-display={index.mastering_display}"
        if index.content_light:
            params += f":max-cll={index.content_light}"
        options |= {"preset": settings.preset, "crf": str(settings.crf), "x265-params": params}
    elif settings.codec == "ffv1":
        options |= {"level": "3", "slices": str(_FFV1_SLICES), "slicecrc": "1", "g": "1"}
    else:
        layout = "444" if pix_fmt.startswith("yuv444") else "422"
        options["profile"] = _INTRA_PROFILES[settings.codec][layout][1]
    for key, value in settings.encoder_options:
        if key == _PARAMS_OPTIONS.get(settings.codec) and key in options:
            options[key] += ":" + value  # ours stay: they pin threads and keep HDR metadata
        else:
            options[key] = value
    return options


class SegmentEncoder:
    """Encode one segment's upscaled frames, as they come, into a staged segment file: frames are converted and
    handed to the encoder one by one, so a segment's frames are never all in memory (only the encoder's lookahead).
    `width`/`height`: the frames' size; see the package notes for odd sizes. Timestamps are stored relative to the
    clip's first frame (any source clock fits), `assemble` puts them back. `progressive`: False only for an
    interlaced source upscaled without deinterlacing."""

    def __init__(self, index: VideoIndex, settings: VideoEncoding, width: int, height: int, *,
                 progressive: bool = True):
        self.index = index
        self.settings = settings = settings.for_clip(index, width, height)
        self.width, self.height = width, height
        self.pix_fmt = output_pix_fmt(index, settings)
        fmt = av.VideoFormat(self.pix_fmt)
        self.coded_width, self.coded_height = _coded_size(settings.codec, fmt, width, height)
        if settings.codec == "dnxhr" and (width < _DNXHR_MIN_SIZE[0] or height < _DNXHR_MIN_SIZE[1]):
            raise EncodeError(f"DNxHR codes frames of at least {_DNXHR_MIN_SIZE[0]}x{_DNXHR_MIN_SIZE[1]}, these are "
                              f"{width}x{height}: choose another video.codec for such small outputs")
        self.colour = colour.output_colour(index.colour, self.coded_height)  # as `assemble` tags it
        self._deep = fmt.components[0].bits > 8
        self._buffer = io.BytesIO()
        self._container = self._open()
        try:
            self._stream = self._add_stream(progressive)
        except BaseException:
            self._container.close()
            raise
        self.frames = 0
        self._packets = 0
        self._last_pts: int | None = None

    def _open(self):
        """The container the packets go to: a staged segment in memory (`movie.MovieEncoder`: the output file)."""
        staging = _STAGING.get(self.settings.codec, "nut")
        options = _STAGING_OPTIONS[staging]
        if staging == "mov" and self.index.time_base.numerator == 1:
            options = options | {"video_track_timescale": str(self.index.time_base.denominator)}
        return av.open(self._buffer, "w", format=staging, options=options)

    def _add_stream(self, progressive: bool):
        settings, index = self.settings, self.index
        stream = self._container.add_stream(ENCODERS[settings.codec], rate=frame_rate(index),
                                            options=_encoder_options(settings, index, self.pix_fmt))
        context = stream.codec_context
        stream.width, stream.height, stream.pix_fmt = self.coded_width, self.coded_height, self.pix_fmt
        stream.time_base = index.time_base
        context.time_base = index.time_base
        context.thread_count = settings.threads
        context.thread_type = "SLICE" if settings.codec == "ffv1" else "FRAME"
        if progressive:
            context.field_order = 1  # AV_FIELD_PROGRESSIVE: deinterlaced or progressive source
        colour.describe(context, self.colour, index.sample_aspect_ratio)
        return stream

    def add(self, frame: np.ndarray, pts: int) -> None:
        """One frame, float HxWx3 RGB in [0, 1] (values outside are clipped), at the source frame's pts."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype.kind != "f":
            raise ValueError(f"expected a float {self.height}x{self.width}x3 frame, got {frame.dtype} {frame.shape}")
        if self._last_pts is not None and pts <= self._last_pts:
            raise ValueError(f"pts {pts} after {self._last_pts}: frames must come in presentation order")
        pixels = quantized(frame, np.uint16 if self._deep else np.uint8)
        if (self.coded_height, self.coded_width) != (self.height, self.width):
            pixels = np.pad(pixels, ((0, self.coded_height - self.height), (0, self.coded_width - self.width), (0, 0)),
                            mode="edge")
        coded = colour.from_rgb(pixels, self.pix_fmt, self.colour)
        coded.pts = pts - self.index.first_pts
        coded.time_base = self.index.time_base
        self._encode(coded)
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
