"""Colours and fields as players show them (issue 15): untagged SD colour bars keep their colours at HD output
sizes, HDR stays HDR, and interlaced sources come out without combing unless deinterlacing is turned off."""

from __future__ import annotations

import av
import numpy as np
import pytest
from av.video.reformatter import ColorRange, Colorspace
from support import video_corpus as corpus
from support.video_path import combing, run_video_path

from media.video import (
    VideoEncoding,
    field_rate_index,
    index_video,
    plan_segments,
)

# 75 % colour bars (white, yellow, cyan, green, magenta, red, blue, black), as SD test tapes carry them
BARS = np.array([[191, 191, 191], [191, 191, 0], [0, 191, 191], [0, 191, 0], [191, 0, 191], [191, 0, 0],
                 [0, 0, 191], [0, 0, 0]], dtype=np.uint8)
BAR_WIDTH = 40  # 8 bars x 40 = 320 wide; x4 of 320x180 is 1280x720, an HD output
MATRICES = {1: Colorspace.ITU709, 5: Colorspace.ITU601, 6: Colorspace.ITU601, 9: Colorspace.BT2020}


def colour_bars(path, frames: int = 6) -> None:
    """Untagged 4:2:0 H.264 (lossless, so the source is exactly what FFmpeg's default guess reads)."""
    row = np.repeat(BARS, BAR_WIDTH, axis=0)
    picture = np.repeat(row[None], 180, axis=0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"qp": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=Colorspace.ITU601, dst_color_range=ColorRange.MPEG)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def decoded_by_tags(path) -> tuple[list[np.ndarray], tuple[int, int, int, int]]:
    """Frames as a player that honours the stream's tags shows them, and the tags (range, primaries, transfer,
    matrix)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        tags = (context.color_range, context.color_primaries, context.color_trc, context.colorspace)
        frames = [frame.reformat(format="rgb24", src_colorspace=MATRICES[context.colorspace],
                                 src_color_range=ColorRange.JPEG if context.color_range == 2 else ColorRange.MPEG,
                                 dst_color_range=ColorRange.JPEG).to_ndarray()
                  for frame in container.decode(stream)]
    return frames, tags


def decoded_by_default_guess(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def bar_means(frame: np.ndarray) -> np.ndarray:
    """Mean colour of each bar's middle half (away from the chroma edges between bars)."""
    width = frame.shape[1] // len(BARS)
    return np.array([frame[:, i * width + width // 4 : (i + 1) * width - width // 4].reshape(-1, 3).mean(axis=0)
                     for i in range(len(BARS))])


def test_untagged_sd_colour_bars_look_the_same_at_hd_size(tmp_path):
    source = tmp_path / "bars.mp4"
    colour_bars(source)
    index = index_video(str(source), source.name)
    assert (index.colorspace, index.color_primaries, index.color_trc) == (None, None, None)  # untagged
    out, _ = run_video_path(source, tmp_path, scale=4, segments=2,
                            encoding=VideoEncoding(codec="h264", crf=4, preset="ultrafast", threads=2))
    frames, tags = decoded_by_tags(out)
    assert frames[0].shape == (720, 1280, 3)
    # explicit tags: limited range, NTSC primaries (180 lines), the SDR curve, and the matrix converted to BT.709
    assert tags == (1, 6, 1, 1)
    reference = bar_means(decoded_by_default_guess(source)[0])
    shown = bar_means(frames[0])
    differences = np.abs(shown - reference).max(axis=1)
    as_bt601 = np.abs(bar_means(_decoded_with_matrix(out, Colorspace.ITU601)) - reference).max(axis=1)
    print(f"colour bars: per-bar max channel difference (of 255) {differences.round(2).tolist()}, as BT.601 "
          f"{as_bt601.round(1).tolist()}")
    assert differences.max() <= 2.0, f"per-bar mean difference (of 255): {differences.round(2)}"
    # the tags matter: read as BT.601 (the pixels' old matrix), the saturated bars shift well past that
    misread = bar_means(_decoded_with_matrix(out, Colorspace.ITU601))
    assert np.abs(misread - reference).max() > 6.0


def _decoded_with_matrix(path, matrix) -> np.ndarray:
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.reformat(format="rgb24", src_colorspace=matrix, src_color_range=ColorRange.MPEG,
                              dst_color_range=ColorRange.JPEG).to_ndarray()


@pytest.mark.parametrize("kind", ["hevc_hdr10_mkv", "hevc_hlg_mov"])
@pytest.mark.parametrize("codec", ["auto", "h264"])
def test_hdr_stays_hdr(tmp_path, kind, codec):
    """No transfer or gamut conversion: HDR pixels keep their HDR tags whatever the codec; `auto` writes H.265 10-bit,
    which carries HDR10's mastering-display and content-light metadata (x264 cannot)."""
    path, _ = getattr(corpus, kind)(tmp_path)
    source = index_video(str(path), path.name)
    out, _ = run_video_path(path, tmp_path, scale=2, encoding=VideoEncoding(codec=codec, preset="ultrafast",
                                                                            threads=2))
    result = index_video(str(out), out.name)
    assert (result.color_primaries, result.color_trc, result.colorspace) == (
        source.color_primaries, source.color_trc, source.colorspace) == (9, 16 if "hdr10" in kind else 18, 9)
    if codec == "auto":
        assert (result.codec, result.bit_depth) == ("hevc", 10)
        assert (result.mastering_display, result.content_light) == (source.mastering_display, source.content_light)


@pytest.mark.parametrize("kind", ["mpeg2_tff_ts", "h264_mbaff_m2ts", "dv_pal_bff_avi"])
def test_interlaced_sources_are_deinterlaced_unless_turned_off(tmp_path, kind):
    path, facts = getattr(corpus, kind)(tmp_path)
    woven = np.mean([combing(frame) for frame in decoded_by_default_guess(path)])
    progressive_reference = np.mean([combing(corpus.pattern(i, facts.width, facts.height)) for i in range(4)])
    shown = {}
    for mode in ("auto", "off"):
        (tmp_path / mode).mkdir()
        out, _ = run_video_path(path, tmp_path / mode, scale=1, segments=2, deinterlace=mode,
                                encoding=VideoEncoding(codec="h264", crf=0, preset="ultrafast", threads=2))
        with av.open(str(out)) as container:
            field_order = container.streams.video[0].codec_context.field_order
        shown[mode] = (np.mean([combing(frame) for frame in decoded_by_default_guess(out)]), field_order)
    (deinterlaced, order_auto), (kept, _) = shown["auto"], shown["off"]
    print(f"{kind}: combing (of 255) woven {woven:.2f}, deinterlaced {deinterlaced:.2f}, off {kept:.2f}, "
          f"progressive render {progressive_reference:.2f}")
    # measured (of 255): woven 10.6-10.7, deinterlaced 0.45-0.50, off 10.4-10.6, a progressive render 0.07-0.09
    assert deinterlaced <= 0.1 * woven, (deinterlaced, woven, progressive_reference)
    assert kept >= 0.8 * woven  # `off` upscales the weave: the combing stays
    assert order_auto == 1  # tagged progressive


def shown_frames(path) -> tuple[list[float], list[np.ndarray], int]:
    """Each frame's time (seconds) and pixels as a player shows them, and the stream's field order tag."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        shown = [(frame.time, frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
        return [time for time, _ in shown], [pixels for _, pixels in shown], stream.codec_context.field_order


@pytest.mark.parametrize("kind", ["mpeg2_tff_ts", "h264_mbaff_m2ts", "dv_pal_bff_avi"])
def test_field_rate_deinterlacing_gives_a_frame_per_field_at_its_time(tmp_path, kind):
    """`video.deinterlace_rate: field`: twice the frames, the second of each pair halfway to the next frame (the last
    one's halfway to the clip's end), no combing, tagged progressive; each first field is the frame-rate output's
    frame (both are bwdif's output for that field)."""
    path, facts = getattr(corpus, kind)(tmp_path)
    source = index_video(str(path), path.name)
    woven = np.mean([combing(frame) for frame in decoded_by_default_guess(path)])
    outputs = {}
    for rate in ("frame", "field"):
        (tmp_path / rate).mkdir()
        out, _ = run_video_path(path, tmp_path / rate, scale=1, segments=2, deinterlace_rate=rate,
                                encoding=VideoEncoding(codec="h264", crf=0, preset="ultrafast", threads=2))
        outputs[rate] = shown_frames(out)
    (frame_times, frame_pixels, _), (times, pixels, field_order) = outputs["frame"], outputs["field"]
    assert len(frame_times) == source.frames and len(times) == 2 * source.frames
    last_field = float((source.end_pts - source.pts[-1]) * source.time_base) / 2
    expected = [time for first, after in zip(frame_times, [*frame_times[1:], frame_times[-1] + 2 * last_field])
                for time in (first, (first + after) / 2)]
    lag = np.abs(np.array(times) - np.array(expected)).max()
    deinterlaced = np.mean([combing(frame) for frame in pixels])
    difference = max(np.abs(pixels[2 * i].astype(np.float32) - frame_pixels[i]).mean() for i in range(source.frames))
    # each frame shows the bar where it was at its field's time (the corpus samples it per field): the second
    # field is a picture of its own, not its frame's again
    timings = [timing(frame, k // 2, k / 2, facts) for k, frame in enumerate(pixels)]
    off_time = max(at / min(before, after) for before, at, after in timings)
    print(f"{kind}: field rate: {len(times)} frames, worst time error {lag * 1000:.2f} ms, combing (of 255) "
          f"{deinterlaced:.2f} (woven {woven:.2f}), first fields vs frame rate: mean difference {difference:.3f}, "
          f"each frame's bar at its field's time: error at most {off_time:.2f} of a field early or late")
    assert lag <= 0.001, list(zip(times, expected))
    assert deinterlaced <= 0.1 * woven, (deinterlaced, woven)
    assert field_order == 1  # tagged progressive
    assert difference <= 0.5  # the same bwdif output for the first field of each frame
    # measured: 1.4-1.5 (of 255) at the field's time, 10-13 a field (half a frame) early or late
    assert off_time <= 0.25, timings


def timing(frame: np.ndarray, index: int, time: float, facts) -> list[float]:
    """How far (mean luma difference, lower half: the bar's band) the frame is from the corpus's frame `index` with
    its bar where it is half a frame before `time`, at `time`, and half a frame after (luma: 4:2:0 chroma is shared
    by both fields' rows)."""
    def luma(pixels):
        return pixels[pixels.shape[0] // 2 :].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return [float(np.abs(luma(frame) - luma(corpus.pattern(index, facts.width, facts.height, at))).mean())
            for at in (time - 0.5, time, time + 0.5)]


def test_the_field_rate_timeline_halves_the_time_base_and_places_each_second_field_halfway(tmp_path):
    path, _ = corpus.mpeg2_tff_ts(tmp_path)
    source = index_video(str(path), path.name)
    fields = field_rate_index(source)
    assert fields.time_base == source.time_base / 2 and fields.frames == 2 * source.frames
    assert fields.pts[0::2] == tuple(2 * pts for pts in source.pts)
    assert fields.pts[1::2] == tuple(a + b for a, b in zip(source.pts, (*source.pts[1:], source.end_pts)))
    assert (fields.first_pts, fields.end_pts, fields.average_rate) == (
        2 * source.first_pts, 2 * source.end_pts, 2 * source.average_rate)
    assert fields.duration == source.duration and fields.clock_offset == source.clock_offset  # seconds
    planned = plan_segments(source, 5, rate="field")
    assert all(s.field_rate and s.output_frames == 2 * s.frames for s in planned)
    assert not any(s.field_rate for s in plan_segments(source, 5, deinterlace="off", rate="field"))
    with pytest.raises(ValueError, match="deinterlace rate 'double'"):
        plan_segments(source, 5, rate="double")
