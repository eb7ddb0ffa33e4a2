"""Tiny, deterministic video files made with PyAV, for the video tests (and the catalog's): each function writes one
file into `folder` and returns its path; the same call writes the same bytes.

Valid clips (64x36 to 213x121, about 1 s, 25 fps unless noted; x264 with B-frames and a keyframe every `gop`):
    moving_clip, static_clip, audio_clip (AAC), subtitle_clip (Matroska: AAC + ASS + SRT + font + chapters),
    mov_text_clip (MP4: AAC + mov_text), vfr_clip (variable frame rate + AAC), odd_size_clip (212x120),
    odd_dimensions_clip (213x121, FFV1), ten_bit_clip (yuv420p10le), rotated_clip (display matrix),
    full_range_clip (yuvj420p), tagged_clip (colour tags), open_gop_clip (HEVC, CRA keyframes), patch_clip (known
    colour patches coded losslessly from reference YUV, see `rgb_to_yuv`), mid_gop_clip (starts before its first
    keyframe: its first frames cannot be decoded).
Bad inputs:
    empty_file, not_a_video_file, audio_only_file, zero_frame_clip, truncated_clip (MP4 and Matroska),
    corrupt_packet_clip (one packet cut in half mid-stream), unsupported_codec_clip (AVS2 in Matroska: FFmpeg knows
    the codec, this build has no decoder).
`write_clip` is the general writer behind them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

RATE = 25
AUDIO_RATE = 48000
# Colour tags as FFmpeg numbers (AVCOL_*): matrix name -> (primaries, transfer, matrix)
COLOR_TAGS = {"bt709": (1, 1, 1), "bt601": (6, 6, 6)}
LUMA_WEIGHTS = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114)}  # (Kr, Kb)
PATCH_COLORS = np.array(
    [[235, 30, 40], [20, 200, 60], [30, 50, 220], [128, 128, 128], [224, 172, 140], [40, 220, 230], [250, 250, 250],
     [12, 10, 14]],
    dtype=np.uint8,
)
ASS_HEADER = """[Script Info]
ScriptType: v4.00+
PlayResX: 384
PlayResY: 288

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, Bold, Italic, \
Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, \
MarginV, Encoding
Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
"""
SUBTITLES = (("Hello", 100, 300), ("World", 500, 400))  # text, start ms, duration ms
FONT = ("caption.ttf", bytes(range(256)) * 4)  # (file name, bytes): an attachment only needs to come back unchanged
CHAPTERS = (("Opening", 0, 400), ("Ending", 400, 1000))  # title, start ms, end ms
AUDIO_LANGUAGE = "fra"


def frame_pixels(index: int, width: int, height: int, content: str = "moving") -> np.ndarray:
    """HxWx3 uint8 RGB. "moving"/"static": smooth asymmetric gradients with a bright square, shifted with `index`
    or not; "noise": seeded random pixels (incompressible: large packets)."""
    if content == "noise":
        return np.random.default_rng(index).integers(0, 256, (height, width, 3), dtype=np.uint8)
    shift = index if content == "moving" else 0
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(x * 255 // max(width - 1, 1) + 3 * shift) % 256, (y * 255 // max(height - 1, 1) + 5 * shift) % 256,
         ((x + 2 * y) * 2 + 40) % 256],
        axis=-1,
    ).astype(np.uint8)
    side = max(4, min(width, height) // 4)
    left = (2 * shift) % max(width - side, 1)
    pixels[height // 3 : height // 3 + side, left : left + side] = 240
    return pixels


def write_clip(
    path: pathlib.Path,
    *,
    frames: int = RATE,
    size: tuple[int, int] = (64, 36),
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    content: str = "moving",
    gop: int = 12,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    audio: bool = False,
    subtitles: Sequence[str] = (),
    rotation: int | None = None,
    color: str | None = None,
    color_range: int | None = None,
    attachment: bool = False,
    chapters: bool = False,
    container_options: dict[str, str] | None = None,
) -> pathlib.Path:
    """Write a clip (the container follows `path`'s extension): `frames` frames of `frame_pixels(i, *size,
    content)` at 25 fps, or at `pts` in `time_base` units (variable frame rate); optionally 1 s of stereo AAC, text
    subtitle streams ("ass", "subrip", "mov_text"), a display-matrix rotation (degrees counter-clockwise), colour
    tags (`color`: a COLOR_TAGS key; frames are converted with that matrix, else BT.601), a range tag, a font
    attachment (Matroska: FONT, as ASS subtitles carry theirs) and two chapters (CHAPTERS)."""
    width, height = size
    time_base = time_base or Fraction(1, RATE)
    pts = list(pts) if pts is not None else [round(i / (RATE * time_base)) for i in range(frames)]
    with av.open(str(path), "w", options=container_options) as container:
        video = container.add_stream(codec, rate=RATE, options=_codec_options(codec, gop))
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        video.time_base = time_base
        video.codec_context.time_base = time_base
        video.codec_context.thread_count = 1
        if color:
            primaries, transfer, matrix = COLOR_TAGS[color]
            video.codec_context.color_primaries = primaries
            video.codec_context.color_trc = transfer
            video.codec_context.colorspace = matrix
        if color_range:
            video.codec_context.color_range = color_range
        if rotation is not None:
            video.set_display_rotation(rotation)
        audio_stream = _add_audio(container) if audio else None
        subtitle_streams = [add_subtitle_stream(container, kind) for kind in subtitles]
        if attachment:
            container.add_attachment(FONT[0], "font/ttf", FONT[1])
        if chapters:
            container.set_chapters([
                {"id": number + 1, "start": start, "end": end, "time_base": Fraction(1, 1000),
                 "metadata": {"title": title}}
                for number, (title, start, end) in enumerate(CHAPTERS)
            ])
        for i, timestamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i, width, height, content), format="rgb24")
            frame = frame.reformat(format=pix_fmt, dst_colorspace="itu709" if color == "bt709" else "itu601",
                                   dst_color_range=color_range or (2 if pix_fmt.startswith("yuvj") else 1))
            frame.pts, frame.time_base = timestamp, time_base
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio_stream is not None:
            _write_audio(container, audio_stream)
        for kind, stream in zip(subtitles, subtitle_streams):
            _write_subtitles(container, kind, stream)
    return path


def moving_clip(folder: pathlib.Path, name: str = "moving.mp4", **options) -> pathlib.Path:
    return write_clip(folder / name, **options)


def static_clip(folder: pathlib.Path, name: str = "static.mp4", **options) -> pathlib.Path:
    return write_clip(folder / name, content="static", **options)


def audio_clip(folder: pathlib.Path, name: str = "audio.mp4", **options) -> pathlib.Path:
    return write_clip(folder / name, audio=True, **options)


def subtitle_clip(folder: pathlib.Path, name: str = "subtitles.mkv", **options) -> pathlib.Path:
    """Matroska with AAC, ASS and SRT subtitles, a font attachment and chapters."""
    return write_clip(folder / name, audio=True, subtitles=("ass", "subrip"), attachment=True, chapters=True,
                      **options)


def mov_text_clip(folder: pathlib.Path, name: str = "mov_text.mp4", **options) -> pathlib.Path:
    return write_clip(folder / name, audio=True, subtitles=("mov_text",), **options)


def vfr_pts(frames: int = 30) -> list[int]:
    """Variable frame rate timestamps in 1/90000 s: frame durations cycle through 40, 40, 80, 20 and 120 ms."""
    durations = [3600, 3600, 7200, 1800, 10800]
    return [sum(durations[k % len(durations)] for k in range(i)) for i in range(frames)]


def vfr_clip(folder: pathlib.Path, name: str = "vfr.mp4", **options) -> pathlib.Path:
    return write_clip(folder / name, pts=vfr_pts(), time_base=Fraction(1, 90000), audio=True, **options)


def open_gop_clip(folder: pathlib.Path, name: str = "open_gop.mkv", **options) -> pathlib.Path:
    """HEVC with open GOPs (x265 CRA keyframes every 12 frames, each followed in decode order by leading pictures
    that belong before it), 40 frames."""
    return write_clip(folder / name, codec="libx265", frames=40, **options)


def odd_size_clip(folder: pathlib.Path, name: str = "odd_size.mp4", **options) -> pathlib.Path:
    """212x120: not a multiple of 16 (x4 gives 848x480)."""
    return write_clip(folder / name, size=(212, 120), frames=12, **options)


def odd_dimensions_clip(folder: pathlib.Path, name: str = "odd_dimensions.mkv", **options) -> pathlib.Path:
    """213x121 yuv420p: H.264 cannot code odd sizes in 4:2:0, FFV1 can."""
    return write_clip(folder / name, size=(213, 121), frames=6, codec="ffv1", **options)


def ten_bit_clip(folder: pathlib.Path, name: str = "ten_bit.mkv", **options) -> pathlib.Path:
    return write_clip(folder / name, pix_fmt="yuv420p10le", **options)


def rotated_clip(folder: pathlib.Path, name: str = "rotated.mp4", rotation: int = 90, **options) -> pathlib.Path:
    return write_clip(folder / name, rotation=rotation, **options)


def full_range_clip(folder: pathlib.Path, name: str = "full_range.mp4", **options) -> pathlib.Path:
    return write_clip(folder / name, pix_fmt="yuvj420p", color_range=2, **options)


def tagged_clip(folder: pathlib.Path, color: str = "bt709", name: str | None = None, **options) -> pathlib.Path:
    return write_clip(folder / (name or f"tagged_{color}.mp4"), color=color, color_range=1, **options)


def rgb_to_yuv(rgb: np.ndarray, matrix: str, full_range: bool, bits: int = 8) -> np.ndarray:
    """Reference RGB -> Y'CbCr (no chroma subsampling), HxWx3 float, in code values of `bits` bits:
    ITU-R BT.601/BT.709 with limited (16-235/240 scaled) or full (0-255, JPEG) range."""
    kr, kb = LUMA_WEIGHTS[matrix]
    values = rgb.astype(np.float64) / 255.0
    luma = kr * values[..., 0] + (1 - kr - kb) * values[..., 1] + kb * values[..., 2]
    pb = (values[..., 2] - luma) / (2 * (1 - kb))
    pr = (values[..., 0] - luma) / (2 * (1 - kr))
    scale = 2 ** (bits - 8)
    if full_range:
        top = 2**bits - 1
        return np.stack([luma * top, pb * top + 128 * scale, pr * top + 128 * scale], axis=-1)
    return np.stack([(16 + 219 * luma) * scale, (128 + 224 * pb) * scale, (128 + 224 * pr) * scale], axis=-1)


def patch_image(width: int = 64, height: int = 32) -> np.ndarray:
    """PATCH_COLORS as a 4x2 grid of flat patches, HxWx3 uint8 RGB."""
    columns, rows = 4, 2
    image = np.zeros((height, width, 3), np.uint8)
    for k, color in enumerate(PATCH_COLORS):
        row, column = divmod(k, columns)
        image[row * height // rows : (row + 1) * height // rows, column * width // columns :
              (column + 1) * width // columns] = color
    return image


def patch_clip(folder: pathlib.Path, matrix: str, full_range: bool, frames: int = 2) -> pathlib.Path:
    """`patch_image` converted to yuv420p by `rgb_to_yuv` (rounded; chroma from 2x2 block means) and coded losslessly
    (FFV1 in Matroska), tagged with `matrix` and the range: a decoder's RGB can be checked against PATCH_COLORS."""
    rgb = patch_image()
    height, width = rgb.shape[:2]
    yuv = rgb_to_yuv(rgb, matrix, full_range)
    luma = np.clip(np.rint(yuv[..., 0]), 0, 255).astype(np.uint8)
    chroma = [np.clip(np.rint(yuv[..., c].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))), 0, 255)
              .astype(np.uint8) for c in (1, 2)]
    planar = np.concatenate([luma, chroma[0].reshape(height // 4, width), chroma[1].reshape(height // 4, width)])
    primaries, transfer, space = COLOR_TAGS[matrix]
    path = folder / f"patches_{matrix}_{'full' if full_range else 'limited'}.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("ffv1", rate=RATE)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        context = video.codec_context
        context.color_primaries, context.color_trc, context.colorspace = primaries, transfer, space
        context.color_range = 2 if full_range else 1
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(planar, format="yuv420p")
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
    return path


# --- bad inputs -------------------------------------------------------------------------------------------------


def empty_file(folder: pathlib.Path, name: str = "empty.mp4") -> pathlib.Path:
    path = folder / name
    path.write_bytes(b"")
    return path


def not_a_video_file(folder: pathlib.Path, name: str = "notes.mp4") -> pathlib.Path:
    path = folder / name
    path.write_bytes(b"These are meeting notes, saved with the wrong extension.\n" * 20)
    return path


def audio_only_file(folder: pathlib.Path, name: str = "audio_only.mp4") -> pathlib.Path:
    path = folder / name
    with av.open(str(path), "w") as container:
        _write_audio(container, _add_audio(container))
    return path


def zero_frame_clip(folder: pathlib.Path, name: str = "zero_frames.mkv") -> pathlib.Path:
    """A video stream (and an audio stream) without a single video packet."""
    path = folder / name
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=RATE)
        video.width, video.height, video.pix_fmt = 64, 36, "yuv420p"
        _write_audio(container, _add_audio(container))
    return path


def truncated_clip(folder: pathlib.Path, name: str = "truncated.mp4", keep: float = 0.6,
                   faststart: bool = False) -> pathlib.Path:
    """A moving clip cut after `keep` of its bytes (MP4: the index at the end is lost, or with `faststart` the
    index is at the front and the frames it lists are cut; Matroska: the tail)."""
    options = {"movflags": "+faststart"} if faststart else None
    path = write_clip(folder / name, frames=50, container_options=options)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupt_packet_clip(folder: pathlib.Path, name: str = "corrupt.mkv", frames: int = 36,
                        damaged: int = 17) -> tuple[pathlib.Path, int]:
    """A Matroska clip whose `damaged`-th packet (decode order, a P/B frame mid-stream) is cut to half its length,
    as a damaged download would leave it. Returns the path and the damaged packet's pts (frame index: pts is the
    frame number at this clip's 1/25 s time base)."""
    path = folder / name
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=RATE, options=_codec_options("libx264", 12))
        video.width, video.height, video.pix_fmt = 64, 36, "yuv420p"
        video.codec_context.thread_count = 1
        packets = []
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(i, 64, 36), format="rgb24")
            frame.pts = i
            packets += video.encode(frame)
        packets += video.encode()
        for position, packet in enumerate(packets):
            if position == damaged:
                cut = av.Packet(bytes(packet)[: packet.size // 2])
                cut.pts, cut.dts, cut.time_base, cut.stream = packet.pts, packet.dts, packet.time_base, video
                damaged_pts, packet = packet.pts, cut
            container.mux(packet)
    return path, damaged_pts


def mid_gop_clip(folder: pathlib.Path, name: str = "mid_gop.mkv", skip: int = 3) -> pathlib.Path:
    """A 30-frame clip (keyframes at frames 0, 12, 24) whose first `skip` packets (decode order) are cut away, as a
    stream recorded from the middle of a GOP: the frames before the keyframe at frame 12 cannot be decoded."""
    source = write_clip(folder / f"{pathlib.Path(name).stem}_source.mkv", frames=30)
    path = folder / name
    with av.open(str(source)) as original, av.open(str(path), "w") as container:
        stream = container.add_stream_from_template(original.streams.video[0])
        for position, packet in enumerate(p for p in original.demux(original.streams.video[0]) if p.size):
            if position >= skip:
                packet.stream = stream
                container.mux(packet)
    return path


def unsupported_codec_clip(folder: pathlib.Path, name: str = "avs2.mkv") -> pathlib.Path:
    """Matroska with an AVS2 video stream: muxable, but this FFmpeg build has no AVS2 decoder."""
    path = folder / name
    with av.open(str(path), "w") as container:
        stream = container.add_mux_stream("avs2", rate=RATE, width=64, height=36)
        stream.time_base = Fraction(1, RATE)
        for i in range(5):
            packet = av.Packet(b"\x00\x00\x01\xb0" + bytes(range(i, i + 28)))
            packet.pts = packet.dts = i
            packet.stream, packet.time_base, packet.is_keyframe = stream, Fraction(1, RATE), i == 0
            container.mux(packet)
    return path


# --- helpers ----------------------------------------------------------------------------------------------------


def _codec_options(codec: str, gop: int) -> dict[str, str]:
    if codec == "libx264":
        return {"preset": "fast", "crf": "20", "g": str(gop), "bf": "3", "x264-params": "scenecut=0"}
    if codec == "libx265":  # open GOP: keyframes are CRAs whose leading B-frames reference the previous GOP
        return {"x265-params": f"keyint={gop}:min-keyint={gop}:open-gop=1:bframes=3:scenecut=0:pools=1:"
                               "frame-threads=1:log-level=error"}
    if codec == "ffv1":
        return {"g": "1"}
    return {}


def _add_audio(container):
    stream = container.add_stream("aac", rate=AUDIO_RATE)
    stream.layout = "stereo"
    stream.metadata["language"] = AUDIO_LANGUAGE
    return stream


def _write_audio(container, stream, seconds: float = 1.0) -> None:
    count = int(AUDIO_RATE * seconds)
    t = np.arange(count) / AUDIO_RATE
    samples = (0.3 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)])).astype(np.float32)
    for start in range(0, count, 960):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start : start + 960]), format="fltp",
                                           layout="stereo")
        frame.sample_rate, frame.pts = AUDIO_RATE, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def add_subtitle_stream(container, kind: str):
    if kind == "ass":
        stream = container.add_stream("ass")
        stream.codec_context.extradata = ASS_HEADER.encode()
    else:
        stream = container.add_mux_stream(kind)
    stream.time_base = Fraction(1, 1000)
    return stream


def _write_subtitles(container, kind: str, stream) -> None:
    for number, (text, start, duration) in enumerate(SUBTITLES):
        if kind == "ass":
            payload = f"{number},0,Default,,0,0,0,,{text}".encode()
        elif kind == "mov_text":
            payload = len(text).to_bytes(2, "big") + text.encode()
        else:
            payload = text.encode()
        packet = av.Packet(payload)
        packet.stream, packet.time_base = stream, Fraction(1, 1000)
        packet.pts = packet.dts = start
        packet.duration = duration
        container.mux(packet)
