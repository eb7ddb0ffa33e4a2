"""The video conformance corpus (issue 15): one tiny clip per kind of file that archives hold and FFmpeg decodes,
each written by a function `make(folder) -> (path, Facts)`. `Facts` is what the clip is and what a faithful output
keeps (field order, timecode, tags, audio/subtitle streams, whether it must come out deinterlaced ...);
`tests/test_video_conformance.py` runs every clip through `media.video` and checks them.

Made with PyAV (this wheel's FFmpeg encodes all but one class); HAP has no encoder in the wheel and is made with the
`ffmpeg` command line (Debian: `apt-get install ffmpeg`), or raises `CorpusSkip` saying why when there is none.

Content: every frame is identifiable on its own. A grid of 10 cells in the top third holds the frame number in
binary (white = 1), the background's blue shifts with the frame number, and a yellow vertical bar below the grid
moves by an eighth of the width per frame. Interlaced clips sample the bar at the time of each field (the second
field half a frame later), so a weave shows combing at the bar's edges; the grid and background are the same in both
fields. Deterministic: the same call writes the same bytes (encoders pinned to one thread, muxers bitexact; the
`ffmpeg` CLI's output is stable for one FFmpeg build).

Sizes: <= 96x64 and <= 16 frames, except where the class needs more: DV is 720x576 by its standard (6 frames),
DNxHR has a 256x120 minimum (256x128), true DNxHD exists only at 1280x720/1920x1080 (1280x720, 3 frames), and the
single-keyframe clip has 300 frames of 32x32.

Classes (CLASSES, in order):
    mp4_edit_list       H.264 + AAC, MP4; the first 3 frames (and 0.12 s of audio) cut by an edit list, as
                        `ffmpeg -ss ... -c copy` leaves it: the first packets have negative pts and are discarded
    mov_edit_rotation   H.264 + AAC, MOV, the same trim, and a 90 degree display matrix
    prores_422_hq       ProRes 422 HQ (prores_ks), 10-bit 4:2:2, BT.709 tags + 24-bit PCM, MOV
    prores_4444_alpha   ProRes 4444 with a 16-bit alpha channel (decodes as yuva444p12le) + PCM, MOV
    dnxhr_mov           DNxHR HQ 256x128 4:2:2 + PCM, MOV
    dnxhd_mxf           DNxHD 1280x720 (60 Mb/s) + PCM, MXF OP1a, start timecode 01:00:00:00
    qtrle_mov           QuickTime Animation (RLE, RGB) + big-endian PCM, MOV
    hap_mov             HAP (snappy-compressed DXT1) + PCM, MOV: `ffmpeg` CLI
    ffv1_10bit_mkv      FFV1 level 3, yuv420p10le + FLAC, Matroska
    mjpeg_avi           Motion JPEG, full range 4:2:2 (yuvj422p) + PCM, AVI
    mpeg2_tff_ts        MPEG-2, interlaced top field first (frame flags via setfield) + MP2, MPEG-TS, starting
                        at 3 h (output_ts_offset 10800 s), GOP timecode 03:00:00:00
    h264_mbaff_m2ts     H.264 MBAFF interlaced top field first (x264 has no PAFF) + AC-3, M2TS at 11.4 s
    dv_pal_bff_avi      DV25 PAL 720x576, bottom field first, SAR 16:15 + PCM, AVI
    vp9_webm            VP9 + Opus, WebM
    av1_mkv             AV1 (SVT-AV1) + Opus, Matroska
    hevc_hdr10_mkv      H.265 Main 10, BT.2020 / PQ, mastering display + content light SEI + AAC, Matroska
    hevc_hlg_mov        H.265 Main 10, BT.2020 / HLG + AAC, MOV
    h264_single_keyframe  H.264 32x32, 300 frames, one IDR then periodic intra refresh (no other keyframe) + AAC, MP4
    h264_open_gop_pyramid H.264 open GOPs (non-IDR I frames with leading B frames) and a B-pyramid + AAC, MP4
    vfr_mp4             H.264 at a variable frame rate (40/40/80/20/120 ms) + AAC, MP4
    audio_longer_mp4    H.264 0.64 s + AAC 2 s, MP4
    two_audio_subs_mkv  H.264 + AAC (eng) + AC-3 (fra) + SubRip + ASS, Matroska
    timecode_mov        H.264 + AAC, MOV with a tmcd track at 10:00:00:00
    custom_tags_mp4     H.264 + AAC, MP4 with title/comment and a custom key (movflags use_metadata_tags)
    h264_422_10bit_mov  H.264 High 4:2:2 10-bit + PCM, MOV
    h264_444_mkv        H.264 High 4:4:4 + FLAC, Matroska
    odd_size_mkv        FFV1 95x63 4:2:0 + FLAC, Matroska
    anamorphic_mp4      H.264 72x64 with SAR 32:27 (16:9 from a 4:3-ish raster) + AAC, MP4
DPX/EXR frame sequences are not here (handled with the frame-sequence tests).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction

import av
import numpy as np

from .video_clips import add_subtitle_stream

RATE = 25
AUDIO_RATE = 48000
CELLS = 10  # bits of the frame number drawn in each frame: up to 1024 frames
SUBTITLES = (("Hello", 100, 200), ("World", 400, 150))  # text, start ms, duration ms
# AVCOL_* numbers
BT709 = (1, 1, 1)  # primaries, transfer, matrix
BT2020_PQ = (9, 16, 9)
BT2020_HLG = (9, 18, 9)
HDR10_PARAMS = ("master-display=G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1):"
                "max-cll=1000,400:hdr10=1")
MUX = {"fflags": "+bitexact"}


class CorpusSkip(Exception):
    """This class cannot be made here (the reason says what is missing)."""


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a clip is, and what a faithful output of it keeps. The test reads everything it can from the file itself
    (decoded with plain PyAV); these are the facts a reader cannot tell apart from a mistake: the intent."""

    kind: str  # the class name
    codec: str  # FFmpeg's decoder name for the video stream
    container: str  # the file's extension
    frames: int  # frames a player shows (after an edit list's trim)
    width: int
    height: int
    field_order: str = "progressive"  # "tt" (top field first) or "bb": coded interlaced
    deinterlaced: bool = False  # the output must be progressive (interlaced sources are deinterlaced by default)
    audio: tuple[str, ...] = ()  # audio codecs, in stream order
    subtitles: tuple[str, ...] = ()
    timecode: str | None = None  # the start timecode the output must keep
    tags: tuple[tuple[str, str], ...] = ()  # container tags the output must keep
    colour: tuple[int, int, int] | None = None  # primaries, transfer, matrix as written
    hdr_side_data: bool = False  # mastering display + content light metadata in the bitstream
    rotation: int = 0  # display matrix, degrees counter-clockwise
    sample_aspect_ratio: Fraction | None = None
    start_seconds: float = 0.0  # roughly where the first frame's timestamp lies (TS offsets)
    trimmed_frames: int = 0  # frames before the edit list's start (decoded, not shown)
    keyframes: int | None = None  # keyframe packets, where the class is about them
    made_with: str = "pyav"  # or "ffmpeg" (the CLI)
    note: str = ""

    @property
    def interlaced(self) -> bool:
        return self.field_order in ("tt", "bb")


# --- content -------------------------------------------------------------------------------------------------------


def bar_speed(width: int) -> int:
    return max(2, width // 8)


def pattern(index: int, width: int, height: int, time: float | None = None) -> np.ndarray:
    """Frame `index` as HxWx3 uint8 RGB, its bar where it is at `time` (in frames; default: `index`)."""
    time = index if time is None else time
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = 60 + 100 * x // max(width - 1, 1)
    pixels[..., 1] = 50 + 120 * y // max(height - 1, 1)
    pixels[..., 2] = 70 + (index * 29) % 64 + 40 * (x + y) // max(width + height - 2, 1)
    band = max(8, height // 3)
    columns, rows = CELLS // 2, 2
    for bit in range(CELLS):
        row, column = divmod(bit, columns)
        top, bottom = row * band // rows, (row + 1) * band // rows
        left, right = column * width // columns, (column + 1) * width // columns
        pixels[top:bottom, left:right] = 235 if (index >> bit) & 1 else 16
    bar = max(2, width // 12)
    position = round(time * bar_speed(width)) % width
    columns_of_bar = (np.arange(bar) + position) % width
    pixels[band:, columns_of_bar] = (250, 220, 40)
    return pixels


def interlaced_pattern(index: int, width: int, height: int, top_first: bool) -> np.ndarray:
    """Frame `index` woven from two fields: the first (top rows for top-field-first) at time `index`, the second
    half a frame later."""
    first = pattern(index, width, height, index)
    second = pattern(index, width, height, index + 0.5)
    pixels = first.copy()
    second_rows = slice(1, None, 2) if top_first else slice(0, None, 2)
    pixels[second_rows] = second[second_rows]
    return pixels


def tone(seconds: float, channels: int = 2, frequency: float = 440.0) -> np.ndarray:
    """channels x samples float32: a tone whose pitch steps every 0.1 s (each audio packet differs)."""
    count = round(AUDIO_RATE * seconds)
    t = np.arange(count) / AUDIO_RATE
    step = 1 + (np.floor(t * 10) % 7) / 7
    return np.stack([0.25 * np.sin(2 * np.pi * frequency * (c + 1) * step * t) for c in range(channels)]
                    ).astype(np.float32)


# --- writing ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Video:
    codec: str
    width: int = 96
    height: int = 64
    pix_fmt: str = "yuv420p"
    frames: int = 16
    options: dict[str, str] = dataclasses.field(default_factory=dict)
    time_base: Fraction = Fraction(1, RATE)
    pts: list[int] | None = None  # default: one frame per 1/RATE s
    field_order: str = "progressive"
    colour: tuple[int, int, int] | None = None
    color_range: int | None = None  # 1 limited, 2 full
    sample_aspect_ratio: Fraction | None = None
    rotation: int | None = None
    alpha: bool = False
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Audio:
    codec: str
    seconds: float | None = None  # default: the video's duration
    channels: int = 2
    language: str | None = None
    frequency: float = 440.0


def _video_frames(spec: Video) -> Iterator[av.VideoFrame]:
    pts = spec.pts if spec.pts is not None else [round(i / (RATE * spec.time_base)) for i in range(spec.frames)]
    matrix = {1: "itu709", 9: "bt2020"}.get(spec.colour[2] if spec.colour else 0, "itu601")
    full = spec.color_range == 2 or spec.pix_fmt.startswith("yuvj")
    for i, timestamp in enumerate(pts):
        if spec.field_order in ("tt", "bb"):
            rgb = interlaced_pattern(i, spec.width, spec.height, spec.field_order == "tt")
        else:
            rgb = pattern(i, spec.width, spec.height)
        if spec.alpha:
            y, x = np.mgrid[0 : spec.height, 0 : spec.width]
            alpha = ((x + y + 3 * i) * 997 % 65536).astype(np.uint16)  # a changing alpha ramp
            frame = av.VideoFrame.from_ndarray(np.dstack([rgb.astype(np.uint16) * 257, alpha]), format="rgba64le")
        else:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        if not spec.pix_fmt.startswith(("rgb", "bgr", "argb")):
            frame = frame.reformat(format=spec.pix_fmt, dst_colorspace=matrix, dst_color_range=2 if full else 1)
        elif frame.format.name != spec.pix_fmt:
            frame = frame.reformat(format=spec.pix_fmt)
        if spec.colour:  # some encoders (prores_ks) write the frame's tags, not the context's
            frame.color_primaries, frame.color_trc = spec.colour[:2]
        frame.pts, frame.time_base = timestamp, spec.time_base
        yield frame


def _with_field_order(frames: Iterable[av.VideoFrame], spec: Video) -> Iterator[av.VideoFrame]:
    """Flag frames interlaced with the field order (PyAV cannot set frame flags; FFmpeg's setfield filter does)."""
    if spec.field_order not in ("tt", "bb"):
        yield from frames
        return
    graph = av.filter.Graph()
    source = graph.add_buffer(width=spec.width, height=spec.height, format=spec.pix_fmt, time_base=spec.time_base)
    setfield = graph.add("setfield", "tff" if spec.field_order == "tt" else "bff")
    sink = graph.add("buffersink")
    source.link_to(setfield)
    setfield.link_to(sink)
    graph.configure()
    for frame in frames:
        graph.push(frame)
        yield graph.pull()


def _add_video(container, spec: Video):
    stream = container.add_stream(spec.codec, rate=RATE, options=spec.options)
    stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
    stream.time_base = spec.time_base
    context = stream.codec_context
    context.time_base = spec.time_base
    context.thread_count = 1
    if spec.colour:
        context.color_primaries, context.color_trc, context.colorspace = spec.colour
    if spec.color_range:
        context.color_range = spec.color_range
    if spec.sample_aspect_ratio:
        context.sample_aspect_ratio = spec.sample_aspect_ratio
    if spec.field_order in ("tt", "bb"):
        context.field_order = 2 if spec.field_order == "tt" else 3  # AV_FIELD_TT / AV_FIELD_BB
    if spec.rotation is not None:
        stream.set_display_rotation(spec.rotation)
    stream.metadata.update(spec.metadata)
    return stream


def _add_audio(container, spec: Audio):
    stream = container.add_stream(spec.codec, rate=AUDIO_RATE)
    stream.layout = "stereo" if spec.channels == 2 else "mono"
    stream.codec_context.thread_count = 1
    if spec.language:
        stream.metadata["language"] = spec.language
    return stream


def _audio_frames(spec: Audio, seconds: float) -> Iterator[av.AudioFrame]:
    samples = tone(spec.seconds or seconds, spec.channels, spec.frequency)
    layout = "stereo" if spec.channels == 2 else "mono"
    for start in range(0, samples.shape[1], 960):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start : start + 960]), format="fltp",
                                           layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, start, Fraction(1, AUDIO_RATE)
        yield frame


def _subtitle_packets(kind: str, stream) -> Iterator[av.Packet]:
    for number, (text, start, duration) in enumerate(SUBTITLES):
        payload = f"{number},0,Default,,0,0,0,,{text}" if kind == "ass" else text
        packet = av.Packet(payload.encode())
        packet.stream, packet.time_base = stream, Fraction(1, 1000)
        packet.pts = packet.dts = start
        packet.duration = duration
        yield packet


def write(
    path: pathlib.Path,
    video: Video,
    audio: Iterable[Audio] = (),
    subtitles: Iterable[str] = (),
    *,
    format: str | None = None,
    options: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    trim_frames: int = 0,
) -> pathlib.Path:
    """Encode `video` (and `audio`, `subtitles`) into `path`. `trim_frames`: every packet is moved that many frames
    earlier, so the first ones have negative timestamps (MP4/MOV write an edit list that starts at 0, as a
    `-ss ... -c copy` cut does)."""
    audio = list(audio)
    subtitles = list(subtitles)
    seconds = (video.frames if video.pts is None else len(video.pts)) / RATE
    with av.open(str(path), "w", format=format, options=MUX | (options or {})) as container:
        if metadata:
            container.metadata.update(metadata)
        video_stream = _add_video(container, video)
        audio_streams = [_add_audio(container, spec) for spec in audio]
        subtitle_streams = [add_subtitle_stream(container, kind) for kind in subtitles]
        shift = round(trim_frames / (RATE * video.time_base))
        packets = []
        for frame in _with_field_order(_video_frames(video), video):
            packets += video_stream.encode(frame)
        packets += video_stream.encode()
        for packet in packets:
            packet.pts -= shift
            packet.dts -= shift
            container.mux(packet)
        for spec, stream in zip(audio, audio_streams):
            audio_shift = round(trim_frames / RATE * AUDIO_RATE)
            encoded = []
            for frame in _audio_frames(spec, seconds):
                encoded += stream.encode(frame)
            encoded += stream.encode()
            for packet in encoded:
                if audio_shift:
                    packet.pts -= round(audio_shift / (packet.time_base * AUDIO_RATE))
                    packet.dts -= round(audio_shift / (packet.time_base * AUDIO_RATE))
                container.mux(packet)
        for kind, stream in zip(subtitles, subtitle_streams):
            for packet in _subtitle_packets(kind, stream):
                container.mux(packet)
    return path


def _facts(kind: str, path: pathlib.Path, video: Video, audio: Iterable[Audio] = (), **facts) -> Facts:
    decoder = av.Codec(video.codec, "w").name
    decoder = {"libx264": "h264", "libx265": "hevc", "libsvtav1": "av1", "libvpx-vp9": "vp9",
               "prores_ks": "prores"}.get(decoder, decoder)
    frames = (video.frames if video.pts is None else len(video.pts)) - facts.get("trimmed_frames", 0)
    return Facts(kind=kind, codec=decoder, container=path.suffix, frames=frames, width=video.width,
                 height=video.height, field_order=video.field_order,
                 deinterlaced=video.field_order in ("tt", "bb"), audio=tuple(_codec_name(a.codec) for a in audio),
                 colour=video.colour, rotation=video.rotation or 0, sample_aspect_ratio=video.sample_aspect_ratio,
                 **facts)


def _codec_name(encoder: str) -> str:
    return {"libopus": "opus"}.get(encoder, encoder)


def x264(extra: str = "", **options: str) -> dict[str, str]:
    """x264 settings; macroblock-tree rate control off: with it, this x264's output changed from call to call (open
    GOPs, intra refresh) or after other encoders had run in the process."""
    params = "scenecut=0:mbtree=0" + (":" + extra if extra else "")
    return {"preset": "fast", "crf": "20", "g": "8", "bf": "2", "x264-params": params} | options


def x265(extra: str) -> dict[str, str]:
    return {"preset": "fast", "crf": "24",
            "x265-params": f"keyint=8:min-keyint=8:scenecut=0:bframes=2:pools=1:frame-threads=1:log-level=error:"
                           f"{extra}"}


# --- the classes ---------------------------------------------------------------------------------------------------


def mp4_edit_list(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "edit_list.mp4"
    video = Video("libx264", options=x264())
    audio = [Audio("aac")]
    write(path, video, audio, trim_frames=3)
    return path, _facts("mp4_edit_list", path, video, audio, trimmed_frames=3,
                        note="edit list trims 3 frames: first packets have negative pts (discard)")


def mov_edit_rotation(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "edit_rotation.mov"
    video = Video("libx264", options=x264(), rotation=90)
    audio = [Audio("aac")]
    write(path, video, audio, trim_frames=3)
    return path, _facts("mov_edit_rotation", path, video, audio, trimmed_frames=3)


def prores_422_hq(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "prores_422_hq.mov"
    video = Video("prores_ks", pix_fmt="yuv422p10le", options={"profile": "hq"}, colour=BT709, color_range=1)
    audio = [Audio("pcm_s24le")]
    write(path, video, audio)
    return path, _facts("prores_422_hq", path, video, audio)


def prores_4444_alpha(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "prores_4444_alpha.mov"
    video = Video("prores_ks", pix_fmt="yuva444p10le", options={"profile": "4444", "alpha_bits": "16"}, alpha=True,
                  colour=BT709, color_range=1)
    audio = [Audio("pcm_s16le")]
    write(path, video, audio)
    return path, _facts("prores_4444_alpha", path, video, audio, note="alpha is dropped: H.264 has none")


def dnxhr_mov(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "dnxhr_hq.mov"
    video = Video("dnxhd", width=256, height=128, pix_fmt="yuv422p", frames=6, options={"profile": "dnxhr_hq"},
                  colour=BT709, color_range=1)
    audio = [Audio("pcm_s16le")]
    write(path, video, audio)
    return path, _facts("dnxhr_mov", path, video, audio, note="DNxHR's minimum size is 256x120")


def dnxhd_mxf(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "dnxhd.mxf"
    video = Video("dnxhd", width=1280, height=720, pix_fmt="yuv422p", frames=3, options={"b": "60M"},
                  colour=BT709, color_range=1)
    audio = [Audio("pcm_s16le")]
    write(path, video, audio, metadata={"timecode": "01:00:00:00"})
    return path, _facts("dnxhd_mxf", path, video, audio, timecode="01:00:00:00",
                        note="DNxHD exists only at 1280x720 and 1920x1080; MXF's start timecode 01:00:00:00")


def qtrle_mov(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "qtrle.mov"
    video = Video("qtrle", pix_fmt="rgb24")
    audio = [Audio("pcm_s16be")]
    write(path, video, audio)
    return path, _facts("qtrle_mov", path, video, audio)


def hap_mov(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    """HAP: this PyAV wheel decodes it but has no encoder (it needs libsnappy), so the `ffmpeg` CLI transcodes a
    lossless FFV1 intermediate (the same frames and PCM audio) to HAP in MOV."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise CorpusSkip("HAP needs the ffmpeg command line (PyAV's FFmpeg has no HAP encoder): apt-get install ffmpeg")
    encoders = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], check=True, capture_output=True, text=True).stdout
    if not any(line.split()[1:2] == ["hap"] for line in encoders.splitlines() if line.strip()):
        raise CorpusSkip("this ffmpeg has no HAP encoder (built without libsnappy)")
    intermediate = folder / "hap_source.mkv"
    video = Video("ffv1", pix_fmt="yuv444p", options={"g": "1"})
    audio = [Audio("pcm_s16le")]
    write(intermediate, video, audio)
    path = folder / "hap.mov"
    subprocess.run(
        [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y", "-i", str(intermediate), "-map", "0",
         "-c:v", "hap", "-format", "hap", "-c:a", "copy", "-map_metadata", "-1", "-fflags", "+bitexact",
         "-flags:v", "+bitexact", "-flags:a", "+bitexact", str(path)],
        check=True, capture_output=True,
    )
    intermediate.unlink()
    return path, dataclasses.replace(_facts("hap_mov", path, video, audio), codec="hap", made_with="ffmpeg")


def ffv1_10bit_mkv(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "ffv1_10bit.mkv"
    video = Video("ffv1", pix_fmt="yuv420p10le", options={"level": "3", "g": "1", "slices": "4"})
    audio = [Audio("flac")]
    write(path, video, audio)
    return path, _facts("ffv1_10bit_mkv", path, video, audio)


def mjpeg_avi(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "mjpeg.avi"
    video = Video("mjpeg", pix_fmt="yuvj422p", color_range=2, options={"b": "3M"})
    audio = [Audio("pcm_s16le")]
    write(path, video, audio)
    return path, _facts("mjpeg_avi", path, video, audio)


def mpeg2_tff_ts(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "mpeg2_tff.ts"
    video = Video("mpeg2video", field_order="tt", options={"flags": "+ilme+ildct", "g": "6", "bf": "2",
                                                             "b": "3M", "gop_timecode": "03:00:00:00"})
    audio = [Audio("mp2")]
    write(path, video, audio, options={"output_ts_offset": "10800"})
    return path, _facts("mpeg2_tff_ts", path, video, audio, start_seconds=10800.0, timecode="03:00:00:00",
                        note="field/frame DCT interlaced coding, tff flag from setfield; GOP timecode 03:00:00:00")


def h264_mbaff_m2ts(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "h264_mbaff.m2ts"
    video = Video("libx264", field_order="tt", options=x264(flags="+ilme+ildct"))
    audio = [Audio("ac3")]
    write(path, video, audio, format="mpegts", options={"mpegts_m2ts_mode": "1", "output_ts_offset": "11.4"})
    return path, _facts("h264_mbaff_m2ts", path, video, audio, start_seconds=11.4,
                        note="x264 codes interlaced as MBAFF (it has no PAFF)")


def dv_pal_bff_avi(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "dv_pal_bff.avi"
    video = Video("dvvideo", width=720, height=576, frames=6, field_order="bb",
                  sample_aspect_ratio=Fraction(16, 15))
    audio = [Audio("pcm_s16le")]
    write(path, video, audio)
    return path, _facts("dv_pal_bff_avi", path, video, audio, note="DV25 PAL is 720x576 by its standard")


def vp9_webm(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "vp9.webm"
    video = Video("libvpx-vp9", options={"deadline": "good", "cpu-used": "8", "crf": "30", "b": "0", "g": "8",
                                         "row-mt": "0", "lag-in-frames": "8"})
    audio = [Audio("libopus")]
    write(path, video, audio)
    return path, _facts("vp9_webm", path, video, audio, note="alt-ref (hidden) frames allowed: lag-in-frames 8")


def av1_mkv(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "av1.mkv"
    video = Video("libsvtav1", options={"preset": "12", "crf": "35", "g": "8", "svtav1-params": "lp=1"})
    audio = [Audio("libopus")]
    write(path, video, audio)
    return path, _facts("av1_mkv", path, video, audio)


def hevc_hdr10_mkv(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "hevc_hdr10.mkv"
    video = Video("libx265", pix_fmt="yuv420p10le", colour=BT2020_PQ, color_range=1,
                  options=x265("colorprim=bt2020:transfer=smpte2084:colormatrix=bt2020nc:" + HDR10_PARAMS))
    audio = [Audio("aac")]
    write(path, video, audio)
    return path, _facts("hevc_hdr10_mkv", path, video, audio, hdr_side_data=True)


def hevc_hlg_mov(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "hevc_hlg.mov"
    video = Video("libx265", pix_fmt="yuv420p10le", colour=BT2020_HLG, color_range=1,
                  options=x265("colorprim=bt2020:transfer=arib-std-b67:colormatrix=bt2020nc"))
    audio = [Audio("aac")]
    write(path, video, audio)
    return path, _facts("hevc_hlg_mov", path, video, audio)


def h264_single_keyframe(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "single_keyframe.mp4"
    video = Video("libx264", width=32, height=32, frames=300,
                  options=x264("keyint=infinite:intra-refresh=1:bframes=0", g="-1", bf="0"))
    audio = [Audio("aac")]
    write(path, video, audio)
    return path, _facts("h264_single_keyframe", path, video, audio, keyframes=1,
                        note="one IDR, then intra refresh waves (recovery point SEI) and no keyframe")


def h264_open_gop_pyramid(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "open_gop_pyramid.mp4"
    video = Video("libx264", options=x264("open-gop=1:b-pyramid=normal:bframes=3:b-adapt=0:keyint=8:min-keyint=8",
                                          g="8", bf="3"))
    audio = [Audio("aac")]
    write(path, video, audio)
    return path, _facts("h264_open_gop_pyramid", path, video, audio)


def vfr_pts(frames: int = 16) -> list[int]:
    """In 1/90000 s: frame durations cycle through 40, 40, 80, 20 and 120 ms."""
    durations = [3600, 3600, 7200, 1800, 10800]
    return [sum(durations[k % len(durations)] for k in range(i)) for i in range(frames)]


def vfr_mp4(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "vfr.mp4"
    video = Video("libx264", pts=vfr_pts(), time_base=Fraction(1, 90000), options=x264())
    audio = [Audio("aac", seconds=float(Fraction(vfr_pts(17)[-1], 90000)))]
    write(path, video, audio)
    return path, _facts("vfr_mp4", path, video, audio)


def audio_longer_mp4(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "audio_longer.mp4"
    video = Video("libx264", options=x264())
    audio = [Audio("aac", seconds=2.0)]
    write(path, video, audio)
    return path, _facts("audio_longer_mp4", path, video, audio, note="0.64 s of video, 2 s of audio")


def two_audio_subs_mkv(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "two_audio_subs.mkv"
    video = Video("libx264", options=x264())
    audio = [Audio("aac", language="eng"), Audio("ac3", language="fra", frequency=330.0)]
    write(path, video, audio, subtitles=["subrip", "ass"])
    return path, _facts("two_audio_subs_mkv", path, video, audio, subtitles=("subrip", "ass"))


def timecode_mov(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "timecode.mov"
    video = Video("libx264", options=x264())
    audio = [Audio("aac")]
    write(path, video, audio, metadata={"timecode": "10:00:00:00"})
    return path, _facts("timecode_mov", path, video, audio, timecode="10:00:00:00",
                        note="the mov muxer writes a tmcd track from the timecode tag")


CUSTOM_TAGS = (("title", "Reel 7, take 2"), ("comment", "scanned 2021"), ("archive_id", "ARC-0042"))


def custom_tags_mp4(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "custom_tags.mp4"
    video = Video("libx264", options=x264())
    audio = [Audio("aac")]
    write(path, video, audio, options={"movflags": "+use_metadata_tags"}, metadata=dict(CUSTOM_TAGS))
    return path, _facts("custom_tags_mp4", path, video, audio, tags=CUSTOM_TAGS)


def h264_422_10bit_mov(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "h264_422_10bit.mov"
    video = Video("libx264", pix_fmt="yuv422p10le", options=x264(), colour=BT709, color_range=1)
    audio = [Audio("pcm_s24le")]
    write(path, video, audio)
    return path, _facts("h264_422_10bit_mov", path, video, audio)


def h264_444_mkv(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "h264_444.mkv"
    video = Video("libx264", pix_fmt="yuv444p", options=x264())
    audio = [Audio("flac")]
    write(path, video, audio)
    return path, _facts("h264_444_mkv", path, video, audio)


def odd_size_mkv(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "odd_size.mkv"
    video = Video("ffv1", width=95, height=63, options={"g": "1"})
    audio = [Audio("flac")]
    write(path, video, audio)
    return path, _facts("odd_size_mkv", path, video, audio)


def anamorphic_mp4(folder: pathlib.Path) -> tuple[pathlib.Path, Facts]:
    path = folder / "anamorphic.mp4"
    video = Video("libx264", width=72, height=64, options=x264(), sample_aspect_ratio=Fraction(32, 27))
    audio = [Audio("aac")]
    write(path, video, audio)
    return path, _facts("anamorphic_mp4", path, video, audio)


CLASSES: dict[str, Callable[[pathlib.Path], tuple[pathlib.Path, Facts]]] = {
    make.__name__: make
    for make in (
        mp4_edit_list, mov_edit_rotation, prores_422_hq, prores_4444_alpha, dnxhr_mov, dnxhd_mxf, qtrle_mov,
        hap_mov, ffv1_10bit_mkv, mjpeg_avi, mpeg2_tff_ts, h264_mbaff_m2ts, dv_pal_bff_avi, vp9_webm, av1_mkv,
        hevc_hdr10_mkv, hevc_hlg_mov, h264_single_keyframe, h264_open_gop_pyramid, vfr_mp4, audio_longer_mp4,
        two_audio_subs_mkv, timecode_mov, custom_tags_mp4, h264_422_10bit_mov, h264_444_mkv, odd_size_mkv,
        anamorphic_mp4,
    )
}


def build(folder: pathlib.Path, names: Iterable[str] | None = None
          ) -> dict[str, tuple[pathlib.Path, Facts] | CorpusSkip]:
    """Every class (or `names`) written into `folder`: name -> (path, facts), or the CorpusSkip saying why not."""
    built: dict[str, tuple[pathlib.Path, Facts] | CorpusSkip] = {}
    for name in names or CLASSES:
        try:
            built[name] = CLASSES[name](folder)
        except CorpusSkip as skip:
            built[name] = skip
    return built
