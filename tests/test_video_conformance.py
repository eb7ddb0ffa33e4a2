"""Video conformance (issue 15): every class of `support.video_corpus` goes through the whole video path in-process
(index, plan >= 3 segments, extract, decode, x4 nearest-neighbour upscale, encode H.264, assemble) and comes out
as a player sees the source:

- as many frames as FFmpeg decodes from the source (plain PyAV), each at its source frame's time (within 1 ms,
  relative to each stream's first frame);
- each output frame, shrunk x4, is closest to the source frame of the same index among all source frames (nothing
  dropped, duplicated or shifted at a segment boundary);
- audio and subtitle packets bit-exact at unchanged times relative to the first video frame (PCM compared as one
  sample stream per track: its packetisation is the muxer's, not content);
- colour tags the source sets, HDR mastering/content-light metadata, bit depth (as far as H.264 goes: 10 bits),
  chroma subsampling, SAR, rotation, timecode and container tags kept;
- interlaced sources come out deinterlaced: frames and stream progressive, and far less row-alternation energy
  (combing) than the source's woven frames;
- a codec this FFmpeg cannot decode fails at `index_video` as `unsupported_codec`, never as `corrupt`.

Every check of a class is evaluated and all failures are reported together; an error raised by the pipeline stops
the class at that stage and names it."""

from __future__ import annotations

import dataclasses
import pathlib
import struct
from fractions import Fraction

import av
import numpy as np
import pytest
from support import missing
from support import video_corpus as corpus
from support.video_path import combing, run_video_path

from media import MediaError
from media.video import (
    VideoEncoding,
    index_video,
)

SCALE = 4
ENCODING = VideoEncoding(preset="ultrafast", threads=2)
TIME_TOLERANCE = Fraction(1, 1000)
COMBING_RATIO = 0.5  # deinterlaced output: at most half the row-alternation energy of the woven source (see combing)
HDR_SIDE_DATA = ("MASTERING_DISPLAY_METADATA", "CONTENT_LIGHT_LEVEL")
PCM_PREFIX = "pcm_"
FIELD_PROGRESSIVE = 1  # AV_FIELD_PROGRESSIVE
TS_DISCONT = 0x200  # AVFMT_TS_DISCONT


@pytest.fixture(scope="session")
def video_corpus(tmp_path_factory):
    """The whole corpus, written once per session: name -> (path, Facts) or the CorpusSkip saying why not."""
    return corpus.build(tmp_path_factory.mktemp("video-corpus"))


# --- reading files as a player does (plain PyAV) ----------------------------------------------------------------


@dataclasses.dataclass
class Decoded:
    frames: list[np.ndarray]  # float32 RGB in [0, 1], at the decoded size (or shrunk, see `shrink`)
    times: list[Fraction]  # seconds
    pix_fmt: str
    bit_depth: int
    colour: tuple[int, int, int, int]  # range, primaries, transfer, matrix (AVCOL_*; 0/2 unspecified)
    side_data: dict[str, bytes]  # of the first frame
    rotation: int
    sample_aspect_ratio: Fraction
    field_order: int  # the stream's AVFieldOrder
    interlaced: list[bool]  # per frame
    size: tuple[int, int]  # width, height
    keyframes: int  # keyframe packets
    codec: str  # FFmpeg's codec name


def decode_plain(path: pathlib.Path, shrink: int = 1) -> Decoded:
    """Every frame FFmpeg decodes, as RGB (frames above 8 bits as 16-bit), `shrink`-times box-filtered."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keyframes = sum(1 for packet in container.demux(stream) if packet.size and packet.is_keyframe)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, times, interlaced = [], [], []
        first = None
        for frame in container.decode(stream):
            first = first or frame
            deep = frame.format.components[0].bits > 8
            pixels = frame.to_ndarray(format="rgb48le" if deep else "rgb24")
            top = np.float32(65535 if deep else 255)
            frames.append(box_shrink(pixels, shrink) / top if shrink > 1 else pixels.astype(np.float32) / top)
            times.append(frame.pts * stream.time_base)
            interlaced.append(frame.interlaced_frame)
        sar = stream.sample_aspect_ratio
        return Decoded(
            frames=frames,
            times=times,
            pix_fmt=first.format.name,
            bit_depth=first.format.components[0].bits,
            colour=(int(first.color_range), int(first.color_primaries), int(first.color_trc),
                    int(first.colorspace)),
            side_data={side.type.name: bytes(side) for side in first.side_data},
            rotation=round(first.rotation),
            sample_aspect_ratio=Fraction(sar) if sar else Fraction(1),
            field_order=int(stream.codec_context.field_order),
            interlaced=interlaced,
            size=(first.width, first.height),
            keyframes=keyframes,
            codec=stream.codec_context.codec.canonical_name,
        )


def box_shrink(pixels: np.ndarray, factor: int) -> np.ndarray:
    height, width = pixels.shape[0] // factor, pixels.shape[1] // factor
    blocks = pixels[: height * factor, : width * factor].reshape(height, factor, width, factor, 3)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def adts_payload(frame: bytes) -> bytes:
    """An AAC frame without its ADTS header (MPEG-TS frames AAC with one; other containers do not)."""
    if frame[:2] in (b"\xff\xf1", b"\xff\xf9"):
        return frame[7 if frame[1] & 1 else 9 :]
    return frame


def copied_packets(path: pathlib.Path, kind: str, origin: Fraction) -> list[tuple[int, str, Fraction, bytes]]:
    """(stream number within its kind, codec, pts in seconds relative to `origin`, payload) of every packet of a kind;
    a PCM track as one entry: its first packet's time and all its samples."""
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == kind]
        if not streams:
            return []
        numbers = {s.index: n for n, s in enumerate(streams)}
        codecs = {s.index: s.codec_context.codec.canonical_name for s in streams}
        entries = []
        pcm: dict[int, list] = {}
        for packet in container.demux(*streams):
            if not packet.size:
                continue
            index = packet.stream_index
            time = packet.pts * packet.time_base - origin
            if codecs[index].startswith(PCM_PREFIX):
                pcm.setdefault(index, [numbers[index], codecs[index], time, b""])[3] += bytes(packet)
            else:
                entries.append((numbers[index], codecs[index], time, adts_payload(bytes(packet))))
        entries += [tuple(entry) for entry in pcm.values()]
        return sorted(entries, key=lambda entry: (entry[0], entry[2]))


def container_facts(path: pathlib.Path) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """(container tags with lower-case keys, every timecode: tags and the first frame's timecode side data, audio
    codecs, subtitle codecs)."""
    with av.open(str(path)) as container:
        tags = {key.lower(): value for key, value in container.metadata.items()}
        timecodes = [m[key] for m in [container.metadata, *(s.metadata for s in container.streams)]
                     for key in m if key.lower() == "timecode"]
        timecodes += frame_timecodes(next(container.decode(video=0)))
        audio = [s.codec_context.codec.canonical_name for s in container.streams.audio]
        subtitles = [s.codec_context.codec.canonical_name for s in container.streams.subtitles]
    return tags, timecodes, audio, subtitles


def frame_timecodes(frame: av.VideoFrame) -> list[str]:
    """Timecodes a decoder attaches to a frame: an MPEG-2 GOP header's, SMPTE 12M (H.264/H.265 SEI)."""
    found = []
    for side in frame.side_data:
        data = bytes(side)
        if side.type.name == "GOP_TIMECODE":
            value = struct.unpack("<q", data[:8])[0]
            found.append(f"{value >> 19 & 0x1F:02d}:{value >> 13 & 0x3F:02d}:{value >> 6 & 0x3F:02d}:"
                         f"{value & 0x3F:02d}")
        elif side.type.name == "S12M_TIMECODE":
            count, *codes = struct.unpack(f"<{len(data) // 4}I", data)
            for code in codes[:count]:
                bcd = [(code >> shift & mask) for shift, mask in ((0, 0x3F), (8, 0x7F), (16, 0x7F), (24, 0x3F))]
                found.append(":".join(f"{(v >> 4) * 10 + (v & 0xF):02d}" for v in bcd))
    return found


def player_clock(path: pathlib.Path, first_frame: Fraction) -> tuple[Fraction, Fraction | None]:
    """(where the first frame is on a player's clock, the duration a player shows) in seconds. Formats with
    discontinuous broadcast timestamps (MPEG-TS/PS: AVFMT_TS_DISCONT) are shown from their start; others (MP4, MOV,
    Matroska, AVI, MXF) from 0."""
    with av.open(str(path)) as container:
        start = Fraction(container.start_time or 0, 1_000_000)
        broadcast = container.format.flags & TS_DISCONT
        duration = Fraction(container.duration, 1_000_000) if container.duration else None
    return (first_frame - start if broadcast else first_frame), duration


def chroma_layout(pix_fmt: str) -> str | None:
    fmt = av.VideoFormat(pix_fmt)
    if fmt.is_rgb or len(fmt.components) < 3:
        return None
    return "420" if fmt.chroma_height(4) < 4 else "422" if fmt.chroma_width(4) < 4 else "444"


ENCODER_OF = {"h264": "libx264", "hevc": "libx265", "ffv1": "ffv1", "prores": "prores_ks", "dnxhd": "dnxhd",
              "av1": "libsvtav1", "vp9": "libvpx-vp9"}


def expected_depth(source_bits: int, output_codec: str) -> int:
    """The source's bit depth where the output's encoder writes it (this wheel's libx264: 8 and 10 bits; libx265:
    up to 12), else the next deeper one it writes, else its deepest."""
    depths = sorted({f.components[0].bits for f in av.Codec(ENCODER_OF[output_codec], "w").video_formats or ()
                     if f.name.startswith("yuv") and not f.name.startswith("yuvj")})
    return next((d for d in depths if d >= source_bits), depths[-1])


class Checks:
    def __init__(self):
        self.failures: list[str] = []

    def expect(self, condition: bool, message: str) -> bool:
        if not condition:
            self.failures.append(message)
        return condition


# --- the test ----------------------------------------------------------------------------------------------------


def check_corpus(source: Decoded, facts: corpus.Facts, path: pathlib.Path) -> None:
    """The clip is what its class says (a failure here is a corpus bug, not the pipeline's)."""
    problems = []
    if source.codec != facts.codec:
        problems.append(f"codec {source.codec}")
    if len(source.frames) != facts.frames:
        problems.append(f"{len(source.frames)} frames decode, {facts.frames} written")
    if source.size != (facts.width, facts.height):
        problems.append(f"size {source.size}")
    if facts.interlaced and not all(source.interlaced):
        problems.append("frames not flagged interlaced")
    if facts.keyframes is not None and source.keyframes != facts.keyframes:
        problems.append(f"{source.keyframes} keyframes, {facts.keyframes} intended")
    if abs(float(source.times[0]) - facts.start_seconds) > 0.5:
        problems.append(f"starts at {float(source.times[0])} s, not about {facts.start_seconds} s")
    if facts.rotation != source.rotation:
        problems.append(f"rotation {source.rotation}")
    if facts.hdr_side_data and not all(kind in source.side_data for kind in HDR_SIDE_DATA):
        problems.append(f"HDR side data missing: {sorted(source.side_data)}")
    tags, timecodes, audio, subtitles = container_facts(path)
    if facts.timecode and facts.timecode not in timecodes:
        problems.append(f"timecodes {timecodes}")
    if any(tags.get(key) != value for key, value in facts.tags):
        problems.append(f"tags {tags}")
    if tuple(audio) != facts.audio or tuple(subtitles) != facts.subtitles:
        problems.append(f"streams {audio} {subtitles}")
    assert not problems, f"corpus clip {path.name} is not what {facts.kind} says: {'; '.join(problems)}"


@pytest.mark.parametrize("kind", list(corpus.CLASSES))
def test_video_conformance(video_corpus, kind, tmp_path):
    built = video_corpus[kind]
    if isinstance(built, corpus.CorpusSkip):
        missing(f"{kind} cannot be made here: {built}")  # under CI=true a failure: .ci/run installs ffmpeg
    path, facts = built

    with av.open(str(path)) as container:
        decodable = container.streams.video[0].codec_context is not None
    if not decodable:  # this build's FFmpeg has no decoder: planning must say so, and nothing else
        with pytest.raises(MediaError) as caught:
            index_video(str(path), path.name)
        assert caught.value.error_type == "unsupported_codec", f"{caught.value.error_type}: {caught.value}"
        return

    source = decode_plain(path)
    check_corpus(source, facts, path)
    out, _ = run_video_path(path, tmp_path, scale=SCALE, encoding=ENCODING)
    output = decode_plain(out, shrink=SCALE)
    checks = Checks()
    count = len(source.frames)

    # frames: count, times, identity
    checks.expect(len(output.frames) == count, f"frame count: output {len(output.frames)}, source decodes {count}")
    checks.expect(output.size == (facts.width * SCALE, facts.height * SCALE),
                  f"output size {output.size}, expected {(facts.width * SCALE, facts.height * SCALE)}")
    shifted = [(i, float(o - output.times[0]), float(s - source.times[0]))
               for i, (o, s) in enumerate(zip(output.times, source.times))
               if abs((o - output.times[0]) - (s - source.times[0])) > TIME_TOLERANCE]
    checks.expect(not shifted, f"{len(shifted)} frame times differ by > 1 ms relative to the first frame "
                               f"(frame, output s, source s): {shifted[:4]}")
    if output.size == (facts.width * SCALE, facts.height * SCALE):
        stack = np.stack(source.frames)
        wrong = []
        for i, frame in enumerate(output.frames):
            errors = np.abs(stack - frame).mean(axis=(1, 2, 3))
            best = int(np.argmin(errors))
            if best != i:
                wrong.append((i, best, round(float(errors[i]) * 255, 1), round(float(errors[best]) * 255, 1)))
        checks.expect(not wrong, f"{len(wrong)} output frames match another source frame best (output frame, best "
                                 f"source frame, error to its own, error to the best; of 255): {wrong[:6]}")

    # where it starts and how long it is, as a player shows them
    source_start, source_duration = player_clock(path, source.times[0])
    output_start, output_duration = player_clock(out, output.times[0])
    checks.expect(abs(output_start - source_start) <= TIME_TOLERANCE,
                  f"first frame at {float(output_start):.4f} s on a player's clock, source at "
                  f"{float(source_start):.4f} s")
    frame_time = (source.times[-1] - source.times[0]) / max(1, count - 1)
    if source_duration is not None:
        checks.expect(output_duration is not None and abs(output_duration - source_duration) <= frame_time
                      + TIME_TOLERANCE, f"duration {output_duration and float(output_duration):.4f} s, source "
                                        f"{float(source_duration):.4f} s")

    # audio and subtitles
    origin_source, origin_output = source.times[0], output.times[0]
    tags, timecodes, audio, subtitles = container_facts(out)
    checks.expect((tuple(audio), tuple(subtitles)) == (facts.audio, facts.subtitles),
                  f"output streams: audio {audio} subtitles {subtitles}, source {facts.audio} {facts.subtitles}")
    for kind_of_stream in ("audio", "subtitle"):
        want = copied_packets(path, kind_of_stream, origin_source)
        got = copied_packets(out, kind_of_stream, origin_output)
        if not checks.expect(len(got) == len(want), f"{kind_of_stream} packets: output {len(got)}, source "
                                                    f"{len(want)}"):
            continue
        payload = [i for i, (a, b) in enumerate(zip(got, want)) if (a[0], a[3]) != (b[0], b[3])]
        moved = [(i, float(a[2]), float(b[2])) for i, (a, b) in enumerate(zip(got, want))
                 if abs(a[2] - b[2]) > TIME_TOLERANCE]
        checks.expect(not payload, f"{len(payload)} {kind_of_stream} packets differ in payload, first "
                                   f"{payload[:4]}")
        checks.expect(not moved, f"{len(moved)} {kind_of_stream} packets moved relative to the first video frame "
                                 f"(packet, output s, source s): {moved[:4]}")

    # pictures: colour, HDR, depth, chroma, SAR, rotation
    names = ("range", "primaries", "transfer", "matrix")
    unspecified = {"range": (0,), "primaries": (0, 2), "transfer": (0, 2), "matrix": (2,)}
    for label, want, got in zip(names, source.colour, output.colour):
        if want in unspecified[label] or (label == "matrix" and chroma_layout(source.pix_fmt) is None):
            continue  # untagged, or an RGB source (whose "matrix" is RGB)
        checks.expect(got == want, f"colour {label}: output {got}, source {want}")
    for kind_of_data in HDR_SIDE_DATA:
        if kind_of_data in source.side_data:
            checks.expect(output.side_data.get(kind_of_data) == source.side_data[kind_of_data],
                          f"{kind_of_data} not kept (output has {sorted(output.side_data)})")
    depth = expected_depth(source.bit_depth, output.codec)
    checks.expect(output.bit_depth == depth, f"bit depth: output {output.bit_depth} ({output.codec} "
                                             f"{output.pix_fmt}), source {source.bit_depth} ({source.pix_fmt}), "
                                             f"expected {depth}")
    if chroma_layout(source.pix_fmt):
        checks.expect(chroma_layout(output.pix_fmt) == chroma_layout(source.pix_fmt),
                      f"chroma: output {output.pix_fmt}, source {source.pix_fmt}")
    checks.expect(output.sample_aspect_ratio == source.sample_aspect_ratio,
                  f"SAR: output {output.sample_aspect_ratio}, source {source.sample_aspect_ratio}")
    checks.expect(output.rotation == source.rotation, f"rotation: output {output.rotation}, source "
                                                      f"{source.rotation}")

    # timecode and container tags
    if facts.timecode:
        checks.expect(facts.timecode in timecodes, f"timecode {facts.timecode} not kept (output has {timecodes})")
    for key, value in facts.tags:
        checks.expect(tags.get(key) == value, f"container tag {key}={value!r} not kept (output: {tags.get(key)!r})")

    # interlaced sources come out deinterlaced
    if facts.deinterlaced:
        checks.expect(not any(output.interlaced), "output frames are flagged interlaced")
        checks.expect(output.field_order == FIELD_PROGRESSIVE,
                      f"output field order {output.field_order}, not progressive ({FIELD_PROGRESSIVE})")
        woven = np.mean([combing(frame) for frame in source.frames])
        combed = np.mean([combing(frame) for frame in output.frames])
        checks.expect(combed <= COMBING_RATIO * woven,
                      f"combing: output {combed * 255:.2f}, woven source {woven * 255:.2f} (of 255; at most "
                      f"{COMBING_RATIO} x the weave when deinterlaced)")

    assert not checks.failures, f"{kind} ({path.name}):\n  " + "\n  ".join(checks.failures)
