"""media.video with real PyAV-encoded clips: indexing from packets, segment extraction and decoding, the
encoder, and assembly keep every frame, timestamp, duration, rotation, colour tag and audio/subtitle packet of the
source; bad inputs fail with the right error_type; outputs are byte-identical run to run."""

from __future__ import annotations

import io
import pathlib
import pickle
import shutil
from fractions import Fraction

import av
import fsspec
import numpy as np
import pytest
from support import video_clips as clips

from media import MediaError
from media.video import (
    SegmentEncoder,
    VideoEncoding,
    assemble,
    decode_segment,
    extract_segment,
    index_video,
    output_container,
    plan_segments,
)

SHARED_VIDEO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "video"  # ../shared beside the repo
FAST = VideoEncoding(codec="h264", preset="ultrafast", threads=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("clips")


def decoded_segments(path, index, segment_frames):
    segments = plan_segments(index, segment_frames)
    for segment in segments:
        data = extract_segment(str(path), segment, path.name)
        yield segment, list(decode_segment(data, segment, path.name))


def as_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)


def stage(path, index, encoding=FAST, segment_frames=10, scale=1, size=None) -> list[bytes]:
    """Decode each segment and re-encode it (scaled by pixel repetition: no model needed)."""
    staged = []
    for segment, frames in decoded_segments(path, index, segment_frames):
        height, width = size or (frames[0].shape[0] * scale, frames[0].shape[1] * scale)
        encoder = SegmentEncoder(index, encoding, width, height)
        for offset, pixels in enumerate(frames):
            image = as_float(pixels).repeat(scale, 0).repeat(scale, 1)
            encoder.add(image, index.pts[segment.start + offset])
        staged.append(encoder.finish())
    return staged


def roundtrip(path, folder, encoding=FAST, segment_frames=10, scale=1):
    index = index_video(str(path), path.name)
    staged = stage(path, index, encoding, segment_frames, scale)
    out = folder / f"{path.stem}.{encoding.codec}.x{scale}{output_container(path.name, index, encoding.codec)}"
    stats = assemble(str(path), staged, str(out), index, path.name)
    return index, staged, out, stats


def packets(path, kind: str) -> list[tuple]:
    """(stream number within its kind, pts in seconds, duration in seconds, payload) of every packet of a kind."""
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == kind]
        numbers = {s.index: n for n, s in enumerate(streams)}
        if not streams:
            return []
        return [(numbers[p.stream_index], p.pts * p.time_base, (p.duration or 0) * p.time_base, bytes(p))
                for p in container.demux(*streams) if p.size]


def adts_payload(frame: bytes) -> bytes:
    """An AAC frame without its ADTS header (7 bytes, 9 with a CRC), or as it is when it has none."""
    if frame[:2] in (b"\xff\xf1", b"\xff\xf9"):
        return frame[7 if frame[1] & 1 else 9 :]
    return frame


def assert_is_frame(pixels: np.ndarray, number: int, frames: int) -> None:
    """`pixels` decode the clip's frame `number`: of all its frames, that one is the closest (mean error < 12 of 255
    at this size and quality; the neighbours are > 40 away)."""
    errors = [np.abs(as_float(pixels) * 255 - clips.frame_pixels(k, pixels.shape[1], pixels.shape[0])).mean()
              for k in range(frames)]
    assert int(np.argmin(errors)) == number and errors[number] < 12


def video_packets(path) -> list[av.Packet]:
    with av.open(str(path)) as container:
        return [p for p in container.demux(container.streams.video[0]) if p.size]


# --- indexing ---------------------------------------------------------------------------------------------------


def test_index_reads_frames_timestamps_and_keyframes(folder):
    path = clips.moving_clip(folder)
    index = index_video(str(path), path.name)
    assert index.frames == 25 and index.pts == tuple(512 * i for i in range(25))
    assert index.time_base == Fraction(1, 12800)
    assert index.keyframes == (0, 12, 24)  # gop 12
    assert (index.width, index.height, index.codec, index.pix_fmt, index.bit_depth) == (64, 36, "h264", "yuv420p", 8)
    assert index.duration == 1.0 and index.end_pts == 12800 and index.average_rate == 25
    assert (index.audio_streams, index.subtitle_streams, index.rotation, index.leading_frames_dropped) == (0, 0, 0, 0)
    assert pickle.loads(pickle.dumps(index)) == index
    assert len(pickle.dumps(index)) < 2000


def test_content_hash_is_the_clips_identity_not_its_name_or_container(folder):
    path = clips.moving_clip(folder, "identity.mp4")
    renamed = folder / "renamed.mp4"
    shutil.copy(path, renamed)
    remuxed = folder / "identity_remuxed.mkv"
    with av.open(str(path)) as source, av.open(str(remuxed), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = stream
                target.mux(packet)
    other = clips.static_clip(folder, "identity_static.mp4")
    digest = index_video(str(path), "a").content_sha256
    assert index_video(str(renamed), "b").content_sha256 == digest
    assert index_video(str(remuxed), "c").content_sha256 == digest  # same packets and times, 1/1000 time base
    assert index_video(str(other), "d").content_sha256 != digest


@pytest.mark.parametrize(
    ("make", "error_type"),
    [
        (clips.empty_file, "empty_file"),
        (clips.not_a_video_file, "not_a_video"),
        (clips.audio_only_file, "no_video_stream"),
        (clips.zero_frame_clip, "zero_frames"),
        (clips.truncated_clip, "truncated"),
        (lambda folder: clips.truncated_clip(folder, "truncated_faststart.mp4", faststart=True), "truncated"),
        (lambda folder: clips.truncated_clip(folder, "truncated.mkv"), "truncated"),
        (lambda folder: clips.truncated_clip(folder, "truncated_head.mkv", keep=0.02), "truncated"),
        (clips.unsupported_codec_clip, "unsupported_codec"),
    ],
)
def test_bad_inputs_fail_with_their_error_type(folder, make, error_type):
    path = make(folder)
    with pytest.raises(MediaError) as caught:
        index_video(str(path), path.name)
    assert caught.value.error_type == error_type
    assert path.name in str(caught.value)


def test_frames_before_the_first_keyframe_are_left_out(folder):
    path = clips.mid_gop_clip(folder)  # 30 frames, keyframes at 0, 12, 24; the first 3 packets cut away
    index = index_video(str(path), path.name)
    assert index.frames == 18 and index.leading_frames_dropped == 9
    assert index.pts == tuple(40 * i for i in range(12, 30)) and index.keyframes == (0, 12)
    assert index.start_seek_pts == index.pts[0]
    _, _, out, _ = roundtrip(path, folder, segment_frames=7)
    assert index_video(str(out), out.name).pts == index.pts


def test_too_long_videos_are_refused(folder):
    path = clips.moving_clip(folder, "long.mp4")
    assert index_video(str(path), path.name, max_frames=25).frames == 25
    with pytest.raises(MediaError) as caught:
        index_video(str(path), path.name, max_frames=24)
    assert caught.value.error_type == "too_long"


# --- segments ---------------------------------------------------------------------------------------------------


def test_segments_are_balanced_ranges_starting_at_the_keyframe_before_them(folder):
    path = clips.moving_clip(folder, "plan.mp4", frames=50)
    index = index_video(str(path), path.name)
    segments = plan_segments(index, 16)
    assert [(s.start, s.stop) for s in segments] == [(0, 12), (12, 25), (25, 37), (37, 50)]
    assert [s.seek_pts for s in segments] == [index.pts[k] for k in (0, 12, 24, 36)]
    assert all(s.first_pts == index.pts[s.start] and s.last_pts == index.pts[s.stop - 1] for s in segments)
    assert [(s.start, s.stop) for s in plan_segments(index, 100)] == [(0, 50)]
    assert pickle.loads(pickle.dumps(segments)) == segments
    with pytest.raises(ValueError):
        plan_segments(index, 0)


@pytest.mark.parametrize("make", [
    lambda folder: clips.moving_clip(folder, "exact.mp4", frames=40),  # H.264, closed GOPs with B-frames
    lambda folder: clips.open_gop_clip(folder, "open_gop.mkv"),  # HEVC CRAs: leading pictures follow the keyframe
    lambda folder: clips.open_gop_clip(folder, "open_gop.mp4"),
], ids=["h264-mp4", "hevc-open-gop-mkv", "hevc-open-gop-mp4"])
def test_each_segment_decodes_exactly_its_frames(folder, make):
    """Segments (starting mid-GOP, at keyframes, single frames) give the same pixels as one sequential decode."""
    path = make(folder)
    index = index_video(str(path), path.name)
    assert index.frames == 40 and index.keyframes == (0, 12, 24, 36)
    (_, whole), = decoded_segments(path, index, index.frames)
    for segment_frames in (5, 8, 1):  # boundaries mid-GOP, at keyframes (24), everywhere
        parts = [frames for _, frames in decoded_segments(path, index, segment_frames)]
        assert {len(p) for p in parts} == {segment_frames}
        pieces = [frame for part in parts for frame in part]
        assert all(np.array_equal(a, b) for a, b in zip(pieces, whole, strict=True))
    assert whole[0].shape == (36, 64, 3) and whole[0].dtype == np.uint8
    for i in (0, 7, 23, 39):
        assert_is_frame(whole[i], i, 40)


class CountingFile(io.RawIOBase):
    def __init__(self, path):
        self.file = open(path, "rb")
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer):
        count = self.file.readinto(buffer)
        self.bytes_read += count
        return count

    def seek(self, offset, whence=io.SEEK_SET):
        return self.file.seek(offset, whence)

    def tell(self):
        return self.file.tell()

    def close(self):
        self.file.close()
        super().close()


def test_extract_segment_reads_only_the_header_and_its_range(folder):
    path = clips.write_clip(folder / "long_noise.mp4", frames=200, size=(128, 72), content="noise", gop=25)
    index = index_video(str(path), path.name)
    last = plan_segments(index, 25)[-1]
    reader = CountingFile(path)
    data = extract_segment(reader, last, path.name)
    reader.close()
    assert data == extract_segment(str(path), last, path.name)
    # the last eighth of the file plus fixed costs: the header and FFmpeg's stream probe (two 32 KiB reads)
    assert reader.bytes_read < 0.25 * path.stat().st_size
    assert len(list(decode_segment(data, last, path.name))) == 25
    with fsspec.open(f"file://{path}", "rb") as remote:  # an fsspec file object, as from s3fs
        assert extract_segment(remote, last, path.name) == data


def test_a_corrupt_packet_fails_its_segment_naming_the_frame(folder):
    path, damaged_pts = clips.corrupt_packet_clip(folder)
    index = index_video(str(path), path.name)  # demuxing does not see the damage
    results = {}
    for segment in plan_segments(index, 12):
        data = extract_segment(str(path), segment, path.name)
        try:
            results[segment.start] = len(list(decode_segment(data, segment, path.name)))
        except MediaError as error:
            results[segment.start] = error
    damaged_frame = index.pts.index(damaged_pts * 40)  # 1/1000 time base, 40 ms frames
    failed = results.pop(12)
    assert 12 <= damaged_frame < 24
    assert failed.error_type == "corrupt" and f"frame {damaged_frame} " in str(failed)
    assert results == {0: 12, 24: 12}  # the other GOPs decode


# --- encoding and assembly --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [clips.audio_clip, clips.subtitle_clip, clips.mov_text_clip, clips.vfr_clip])
def test_output_keeps_frames_timestamps_duration_audio_and_subtitles(folder, make):
    path = make(folder)
    index, staged, out, stats = roundtrip(path, folder)
    result = index_video(str(out), out.name)
    assert result.frames == index.frames == stats["frames"]
    assert result.pts == index.pts and result.time_base == index.time_base
    assert result.end_pts == index.end_pts and result.duration == index.duration
    assert result.audio_codecs == index.audio_codecs and result.subtitle_codecs == index.subtitle_codecs
    for kind in ("audio", "subtitle"):
        assert packets(out, kind) == packets(path, kind)  # copied packet for packet: bytes, pts, durations
    assert stats["streams_copied"] == [f"audio:{c}" for c in index.audio_codecs] + [
        f"subtitle:{c}" for c in index.subtitle_codecs]
    assert out.suffix == pathlib.Path(path).suffix
    with av.open(str(out)) as container:
        assert container.streams.audio[0].language == clips.AUDIO_LANGUAGE
        if path.suffix == ".mkv":  # the subtitle clip's font and chapters
            (font,) = container.streams.attachments
            assert (font.name, font.data) == clips.FONT
            assert [(c["metadata"]["title"], c["start"] * c["time_base"], c["end"] * c["time_base"])
                    for c in container.chapters()] == [(t, Fraction(a, 1000), Fraction(b, 1000))
                                                       for t, a, b in clips.CHAPTERS]


@pytest.mark.parametrize(("name", "codec"), [("clip.avi", "mpeg4"), ("clip.ts", "libx264")])
def test_other_containers_become_matroska_with_millisecond_timestamps(folder, name, codec):
    path = clips.write_clip(folder / name, codec=codec, audio=True)
    index, _, out, _ = roundtrip(path, folder)
    assert out.suffix == ".mkv"
    result = index_video(str(out), out.name)
    assert result.frames == index.frames
    # MPEG-TS runs on a clock that starts before the recording: outputs start where a player shows it to start
    assert all(abs(a * result.time_base - (b * index.time_base - index.clock_offset)) <= Fraction(1, 2000)
               for a, b in zip(result.pts, index.pts, strict=True))
    source, copied = packets(path, "audio"), packets(out, "audio")
    # the same AAC frames, not re-encoded (MPEG-TS frames them with ADTS headers, which Matroska does not keep)
    assert [p[3] for p in copied] == [adts_payload(p[3]) for p in source]
    assert all(abs(a[1] - (b[1] - index.clock_offset)) <= Fraction(1, 2000)
               for a, b in zip(copied, source, strict=True))


def test_variable_frame_rate_is_kept_not_resampled(folder):
    path = clips.vfr_clip(folder, "vfr_kept.mp4")
    index, staged, out, _ = roundtrip(path, folder, segment_frames=7)
    assert index.pts == tuple(clips.vfr_pts())
    assert index_video(str(out), out.name).pts == index.pts
    durations = {p.pts: p.duration for p in video_packets(out)}
    assert [durations[pts] for pts in index.pts[:-1]] == list(np.diff(index.pts))


def test_segments_join_into_one_stream(folder):
    """Monotonic DTS across segment boundaries (B-frames, variable frame rate), a keyframe starting each segment,
    and the whole output decoding as one stream with every frame at its timestamp."""
    path = clips.vfr_clip(folder, "joined.mp4")
    index = index_video(str(path), path.name)
    encoding = VideoEncoding(preset="medium", threads=2)  # B-frames with pyramid: reorder delay 2
    staged = stage(path, index, encoding, segment_frames=7)
    out = folder / "joined_out.mp4"
    assemble(str(path), staged, str(out), index, path.name)
    written = video_packets(out)
    dts = [p.dts for p in written]
    assert all(a < b for a, b in zip(dts, dts[1:]))
    assert all(p.dts <= p.pts for p in written)
    assert any(p.pts != p.dts for p in written)  # there really are B-frames
    starts = {index.pts[s.start] for s in plan_segments(index, 7)}
    assert starts <= {p.pts for p in written if p.is_keyframe}
    with av.open(str(out)) as container:
        container.streams.video[0].codec_context.options = {"err_detect": "crccheck+bitstream+buffer+careful"}
        decoded = list(container.decode(video=0))
    assert [f.pts for f in decoded] == list(index.pts)
    assert not any(f.is_corrupt for f in decoded)


def test_assembly_refuses_mismatched_missing_or_repeated_segments(folder):
    path = clips.moving_clip(folder, "mismatch.mp4")
    index = index_video(str(path), path.name)
    staged = stage(path, index, FAST, segment_frames=10)
    other_settings = stage(path, index, VideoEncoding(preset="slow", threads=2), segment_frames=10)
    out = folder / "mismatch_out.mp4"
    cases = {
        "different codec parameters": [staged[0], other_settings[1], staged[2]],
        "where frame 8 (pts 4096) belongs": [staged[0], staged[2]],  # segments of 8, 8 and 9 frames
        "segment 1 has pts 0 where frame 8": [staged[0], staged[0], staged[1], staged[2]],
        "hold 16 of 25": staged[:2],
    }
    for expected, segments in cases.items():
        with pytest.raises(MediaError) as caught:
            assemble(str(path), segments, str(out), index, path.name)
        assert caught.value.error_type == "assembly_failed" and expected in str(caught.value)
        assert not out.exists()


@pytest.mark.parametrize("encoding", [FAST, VideoEncoding(codec="h265", preset="ultrafast", threads=2),
                                      VideoEncoding(codec="ffv1", threads=2)], ids=["h264", "h265", "ffv1"])
def test_encoding_is_deterministic(folder, encoding):
    path = clips.subtitle_clip(folder, f"determinism_{encoding.codec}.mkv")
    first = roundtrip(path, folder, encoding)
    copy = folder / f"determinism_copy_{encoding.codec}.mkv"
    shutil.copy(path, copy)
    second = roundtrip(copy, folder, encoding)
    assert first[1] == second[1]  # the staged segments
    assert first[2].read_bytes() == second[2].read_bytes()
    assert index_video(str(first[2]), "out").codec == {"h264": "h264", "h265": "hevc", "ffv1": "ffv1"}[encoding.codec]


def test_rotation_is_kept(folder):
    path = clips.rotated_clip(folder, rotation=90)
    index, _, out, _ = roundtrip(path, folder)
    result = index_video(str(out), out.name)
    assert index.rotation == result.rotation == 90
    assert result.display_matrix == index.display_matrix
    assert (result.width, result.height) == (64, 36)  # frames stay in coded orientation


@pytest.mark.parametrize(
    ("make", "source_tags", "tags"),
    [
        (lambda folder: clips.tagged_clip(folder, "bt709"), (1, 1, 1), (1, 1, 1, 1)),
        (lambda folder: clips.tagged_clip(folder, "bt601"), (1, 6, 6), (1, 6, 6, 6)),
        # yuvj420p, otherwise untagged: every tag written as players read such a 36-line clip (NTSC primaries,
        # BT.709 transfer, BT.601 matrix), the range full
        (clips.full_range_clip, (2, None, None), (2, 6, 1, 6)),
    ],
)
@pytest.mark.parametrize("codec", ["h264", "ffv1"])
def test_colour_tags_are_kept(folder, make, source_tags, tags, codec):
    path = make(folder)
    index, _, out, _ = roundtrip(path, folder, VideoEncoding(codec=codec, preset="ultrafast", threads=2))
    result = index_video(str(out), out.name)
    assert (result.color_range, result.color_primaries, result.color_trc, result.colorspace) == tags
    assert (index.color_range, index.color_primaries, index.color_trc) == source_tags


@pytest.mark.parametrize(("codec", "source_pix_fmt", "pix_fmt", "profile"), [
    ("prores", "yuv422p", "yuv422p10le", "HQ"),
    ("prores", "yuv444p", "yuv444p12le", "4444"),  # encoded from 10 bits; FFmpeg decodes 4444 as 12
    ("dnxhr", "yuv422p", "yuv422p10le", "DNXHR HQX"),
])
def test_archive_masters_in_prores_and_dnxhr(folder, codec, source_pix_fmt, pix_fmt, profile):
    """Intra-only mezzanine outputs: staged in MOV (NUT does not take them), assembled into MOV with the source's
    frames, timestamps and audio."""
    path = clips.write_clip(folder / f"master_{codec}_{source_pix_fmt}.mp4", frames=12, size=(96, 64),
                            pix_fmt=source_pix_fmt, audio=True)
    index, _, out, _ = roundtrip(path, folder, VideoEncoding(codec=codec), segment_frames=5, scale=4)
    assert out.suffix == ".mov"  # MP4 does not take them: QuickTime, their own container
    result = index_video(str(out), out.name)
    assert (result.codec, result.pix_fmt, result.frames) == (codec.replace("dnxhr", "dnxhd"), pix_fmt, 12)
    assert [t * result.time_base for t in result.pts] == [t * index.time_base for t in index.pts]
    assert result.keyframes == tuple(range(12))
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.profile == profile
    assert [p[3] for p in packets(out, "audio")] == [p[3] for p in packets(path, "audio")]
    (_, frames), *_ = decoded_segments(out, result, 12)
    assert_is_frame(frames[7][::4, ::4], 7, 12)


def test_dnxhr_refuses_frames_below_its_minimum_with_a_clear_error(folder):
    index = index_video(str(clips.moving_clip(folder)), "clip")
    with pytest.raises(MediaError, match="at least 256x120") as caught:
        SegmentEncoder(index, VideoEncoding(codec="dnxhr"), 128, 72)
    assert caught.value.error_type == "encode_failed"


def test_encoder_options_reach_the_encoder_and_codec_auto_follows_depth(folder):
    path = clips.moving_clip(folder)
    _, _, out, _ = roundtrip(path, folder, VideoEncoding(codec="h264", preset="ultrafast", threads=2,
                                                         encoder_options={"g": 5, "x264-params": "scenecut=0"}),
                             segment_frames=25)
    assert index_video(str(out), out.name).keyframes == (0, 5, 10, 15, 20)  # x264 alone would place 1
    auto = VideoEncoding()
    eight_bit, ten_bit = index_video(str(path), path.name), index_video(str(clips.ten_bit_clip(folder)), "10")
    assert auto.for_clip(eight_bit, 2560, 1440).codec == "h264"
    assert auto.for_clip(eight_bit, 7680, 4320).codec == "h265"  # above 4K
    assert auto.for_clip(ten_bit, 256, 144).codec == "h265"  # above 8 bits


@pytest.mark.parametrize(("codec", "pix_fmt"), [("h264", "yuv420p10le"), ("h265", "yuv420p10le"),
                                                ("ffv1", "yuv420p10le")])
def test_ten_bit_sources_stay_ten_bit(folder, codec, pix_fmt):
    path = clips.ten_bit_clip(folder)
    index = index_video(str(path), path.name)
    assert (index.pix_fmt, index.bit_depth) == ("yuv420p10le", 10)
    (_, frames), *_ = decoded_segments(path, index, 25)
    assert frames[0].dtype == np.uint16 and frames[0].max() > 255
    assert_is_frame(frames[3], 3, 25)
    _, _, out, _ = roundtrip(path, folder, VideoEncoding(codec=codec, preset="ultrafast", threads=2))
    result = index_video(str(out), out.name)
    assert (result.pix_fmt, result.bit_depth) == (pix_fmt, 10)


@pytest.mark.parametrize("pix_fmt", ["yuv422p", "yuv444p"])
def test_chroma_subsampling_is_kept(folder, pix_fmt):
    path = clips.write_clip(folder / f"{pix_fmt}.mkv", frames=6, pix_fmt=pix_fmt)
    _, _, out, _ = roundtrip(path, folder)
    assert index_video(str(out), out.name).pix_fmt == pix_fmt


def test_odd_sizes(folder):
    path = clips.odd_size_clip(folder)  # 212x120 -> x4 848x480
    _, _, out, _ = roundtrip(path, folder, scale=4)
    assert (index_video(str(out), out.name).width, index_video(str(out), out.name).height) == (848, 480)
    odd = clips.odd_dimensions_clip(folder)  # 213x121: H.264 pads to even, FFV1 keeps it
    index, _, h264_out, _ = roundtrip(odd, folder)
    assert (index.width, index.height) == (213, 121)
    result = index_video(str(h264_out), h264_out.name)
    assert (result.width, result.height) == (214, 122)
    (_, frames), = decoded_segments(h264_out, result, 6)
    assert np.abs(frames[0][:, 213].astype(int) - frames[0][:, 212].astype(int)).mean() < 3  # edge repeated
    _, _, ffv1_out, _ = roundtrip(odd, folder, VideoEncoding(codec="ffv1", threads=2))
    lossless = index_video(str(ffv1_out), ffv1_out.name)
    assert (lossless.width, lossless.height) == (213, 121)


def patch_interiors(height: int, width: int, border: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    rows, columns = 2, 4
    step_y, step_x = height // rows, width // columns
    for row in range(rows):
        for column in range(columns):
            mask[row * step_y + border : (row + 1) * step_y - border,
                 column * step_x + border : (column + 1) * step_x - border] = True
    return mask


@pytest.mark.parametrize(("matrix", "full_range"), [("bt709", False), ("bt709", True), ("bt601", False)])
def test_colour_conversion_matches_the_reference(folder, matrix, full_range):
    """Decoding: YUV made by the reference equations (no codec loss) comes back as the patch colours within 2
    levels (measured: 1 for BT.709, 2 for BT.601 limited, from 8-bit YUV rounding). Encoding: the encoder's YUV (read
    back from lossless FFV1) is within 1 level of the reference equations (measured: luma 0.5, chroma 0.8).
    Interiors only: chroma resampling filters blur patch edges."""
    path = clips.patch_clip(folder, matrix, full_range)
    index = index_video(str(path), path.name)
    assert index.colorspace == clips.COLOR_TAGS[matrix][2] and index.color_range == (2 if full_range else 1)
    (_, frames), = decoded_segments(path, index, 10)
    image = clips.patch_image()
    height, width = image.shape[:2]
    error = np.abs(frames[0].astype(int) - image.astype(int))[patch_interiors(height, width, 3)]
    assert error.max() <= 2

    encoder = SegmentEncoder(index, VideoEncoding(codec="ffv1", threads=2), width, height)
    encoder.add(image.astype(np.float32) / 255, index.pts[0])
    with av.open(io.BytesIO(encoder.finish())) as container:
        planes = next(container.decode(video=0)).to_ndarray()
    luma = planes[:height]
    chroma = planes[height:].reshape(2, height // 2, width // 2)
    reference = clips.rgb_to_yuv(image, matrix, full_range)
    reference_chroma = reference[..., 1:].reshape(height // 2, 2, width // 2, 2, 2).mean(axis=(1, 3))
    assert np.abs(luma - reference[..., 0])[patch_interiors(height, width, 2)].max() <= 1
    interiors = patch_interiors(height // 2, width // 2, 2)
    for channel in range(2):
        assert np.abs(chroma[channel] - reference_chroma[..., channel])[interiors].max() <= 1


def test_hevc_in_mp4_is_tagged_for_apple_players(folder):
    path = clips.moving_clip(folder, "hvc1.mp4", frames=6)
    _, _, out, _ = roundtrip(path, folder, VideoEncoding(codec="h265", preset="ultrafast", threads=2))
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_tag == "hvc1"


def test_encoder_checks_its_input(folder):
    path = clips.moving_clip(folder, "checks.mp4", frames=3)
    index = index_video(str(path), path.name)
    encoder = SegmentEncoder(index, FAST, 64, 36)
    with pytest.raises(ValueError, match="64x3"):
        encoder.add(np.zeros((36, 63, 3), np.float32), 0)
    with pytest.raises(ValueError, match="float"):
        encoder.add(np.zeros((36, 64, 3), np.uint8), 0)
    encoder.add(np.zeros((36, 64, 3), np.float32), 512)
    with pytest.raises(ValueError, match="presentation order"):
        encoder.add(np.zeros((36, 64, 3), np.float32), 512)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"codec": "vp9"}, "choose auto, h264"),
        ({"crf": 60}, "crf"),
        ({"preset": "quick"}, "preset"),
        ({"pix_fmt": "yuv420p12le"}, "cannot be written by libx264"),
        ({"codec": "h265", "pix_fmt": "yuvj420p"}, "cannot be written"),
        ({"threads": 0}, "threads"),
    ],
)
def test_video_encoding_is_validated(options, message):
    with pytest.raises(ValueError, match=message):
        VideoEncoding(**options)


def test_video_encoding_defaults_follow_the_source():
    assert VideoEncoding(codec="HEVC").codec == "h265"
    assert VideoEncoding(codec="ffv1", crf=99).codec == "ffv1"  # crf does not apply to lossless FFV1


def test_output_container_keeps_the_source_container_where_it_can(folder):
    plain = index_video(str(clips.moving_clip(folder, "container.mp4", frames=3)), "plain")
    with_mov_text = index_video(str(clips.mov_text_clip(folder, "container_text.mp4", frames=3)), "text")
    assert output_container("a/b.mp4", plain, "h264") == ".mp4"
    assert output_container("a/b.M4V", plain, "h265") == ".mp4"
    assert output_container("a/b.mov", plain, "hevc") == ".mov"
    assert output_container("a/b.mkv", plain, "ffv1") == ".mkv"
    assert output_container("a/b.webm", plain, "h264") == ".mkv"
    assert output_container("a/b.avi", plain, "h264") == ".mkv"
    assert output_container("a/b.mp4", plain, "ffv1") == ".mkv"
    assert output_container("a/b.ts", with_mov_text, "h264") == ".mov"  # Matroska cannot hold mov_text
    with pytest.raises(MediaError, match="no output container"):
        output_container("a/b.mp4", with_mov_text, "ffv1")


# --- the shared sample clips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", sorted(SHARED_VIDEO.glob("*.mp4")) if SHARED_VIDEO.is_dir() else [],
                         ids=lambda p: p.name)
def test_shared_clips_roundtrip(folder, clip):
    index, staged, out, stats = roundtrip(clip, folder, segment_frames=16)
    result = index_video(str(out), out.name)
    assert result.frames == index.frames == 45
    assert result.pts == index.pts and result.duration == index.duration
    assert packets(out, "audio") == packets(clip, "audio")
    source = index.colour  # untagged: written as players read it
    assert (result.color_range, result.color_primaries, result.color_trc) == (
        2 if source.full_range else 1, source.primaries, source.transfer)
    segment = plan_segments(index, 16)[1]
    frames = list(decode_segment(extract_segment(str(clip), segment, clip.name), segment, clip.name))
    assert len(frames) == segment.frames and frames[0].shape == (index.height, index.width, 3)
