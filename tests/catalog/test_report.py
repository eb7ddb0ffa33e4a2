"""The run report (pipeline.report): written beside the run's manifests, self-contained, covering photos, videos and
frame sequences, and rendered by headless Chromium without console errors, every image loaded, the sliders working
and the figures of each clip shown; the screenshot is kept as a test artifact (test-artifacts/run_report.png,
ignored by git)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image
from support.browser import CHROMIUM, open_page
from support.catalog import REPO, image_bytes, job_config, manifests, write_catalog

from pipeline.config import validate_config
from pipeline.example_catalog import FILM_FRAMES, FILM_KEY, REEL_FRAMES, lay_out_example_catalog, lay_out_example_videos
from pipeline.report import PAIRS, REPORT_NAME, sample_pairs, sequence_frame_keys
from pipeline.run import EXIT_INPUTS_FAILED, run_job
from pipeline.storage import Location

ARTIFACTS = REPO / "test-artifacts"
SEQUENCE_KEY = "reels/coffee/frame_%04d.png"
CLIP_IMAGES = 2 * 3 * 3  # two clips x (first, middle, last frame) x (before, after, whole output)


@pytest.fixture(scope="module")
def report(ray_session, tmp_path_factory):
    """A mixed run — the example photos, a few more images, some broken files, the example film and frame
    sequence — and its report's path, summary and clip rows."""
    root = tmp_path_factory.mktemp("report")
    lay_out_example_catalog(Location(str(root / "in"), {}))
    lay_out_example_videos(Location(str(root / "in"), {}))
    write_catalog(root / "in", {
        **{f"scans/scan {i}.png": image_bytes(40 + 8 * i, 30, seed=i) for i in range(3)},
        "broken/empty.png": b"", "broken/also empty.jpg": b"", "broken/not a photo.jpg": b"plain text",
    })
    config = job_config(str(root / "in"), str(root / "out"),
                        video={"sequence_folders": ["reels/*"], "segment_seconds": 1.0})
    assert run_job(validate_config(config)) == EXIT_INPUTS_FAILED
    (path,) = (root / "out").glob(f"_manifests/run=*/{REPORT_NAME}")
    rows = manifests(root / "out")
    return {"path": path, "summary": json.loads((path.parent / "_summary.json").read_text()),
            "clips": rows[rows.unit.isin(["video", "sequence"])].set_index("source_key"), "rows": rows}


def test_the_report_is_self_contained_and_says_what_happened(report):
    page = report["path"].read_text()
    assert "<script src" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 * PAIRS + CLIP_IMAGES and all(src.startswith("data:image/jpeg;base64,")
                                                           for src in sources)
    assert set(re.findall(r"https?://[^\s\"']+", page)) <= {"http://www.w3.org/2000/svg"}  # the SVG namespace only
    for text in ("<b>13</b>inputs", "<b>10</b>ok", "<b>3</b>failed", "empty_file", "broken/also empty.jpg",
                 "<svg", "<title>", "people/cameraman.png", f"<b>{FILM_FRAMES + REEL_FRAMES}</b>frames",
                 # sliders name the source and what it became (a WebP photo is written as PNG here)
                 '<code class=source>space/rocket.webp</code> → <code class=output>space/rocket.png</code>'):
        assert text in page, text


def test_the_throughput_chart_spans_the_whole_run(report):
    page, seconds = report["path"].read_text(), report["summary"]["seconds"]
    svg = page[page.index("<svg"):page.index("</svg>")]
    axis = re.findall(r'text-anchor="end">([\d.]+) (s|min)</text>', svg)[-1]  # the x axis's right end
    assert float(axis[0]) * (60 if axis[1] == "min" else 1) == pytest.approx(seconds, rel=0.01)


def test_the_pairs_sample_image_outputs_whatever_their_order_and_skip_failures():
    rows = [{"status": "ok", "source_key": f"{i:02d}.png", "output_key": f"{i:02d}.png"} for i in range(20)]
    rows += [{"status": "failed", "source_key": "bad.png", "output_key": "bad.png"},
             {"status": "ok", "source_key": "clip.mp4", "output_key": "clip.mp4", "unit": "video"}]
    chosen = [row["source_key"] for row in sample_pairs(iter(rows), 5)]  # streamed: rows are read once
    assert chosen == [row["source_key"] for row in sample_pairs(rows[::-1], 5)] == sorted(chosen)
    assert len(chosen) == 5 and set(chosen) <= {f"{i:02d}.png" for i in range(20)}
    assert len({key[0] for key in chosen}) == 2  # spread over the keys, not the first five


def test_a_sequences_frames_are_found_in_number_order(tmp_path):
    location = Location(str(tmp_path), {})
    write_catalog(tmp_path, {f"reel/f_{n:04d}.png": b"x" for n in (10, 9, 100, 1)} | {"reel/f_12.png": b"x",
                                                                                     "reel/other_0001.png": b"x"})
    assert sequence_frame_keys(location, "reel/f_%04d.png") == [
        "reel/f_0001.png", "reel/f_0009.png", "reel/f_0010.png", "reel/f_0100.png"]


@pytest.mark.skipif(CHROMIUM is None, reason="missing: chromium (apt-get install chromium)")
def test_chromium_renders_the_report_with_every_image_and_each_clips_figures(report, tmp_path):
    page = open_page(report["path"].as_uri(), {
        "images": "[...document.images].map(i => [i.complete, i.naturalWidth, i.alt])",
        "sliders": "document.querySelectorAll('input[type=range]').length",
        "bars": "document.querySelectorAll('svg rect').length",
        "slid": """(() => { const slider = document.querySelector('input[type=range]');
                            slider.value = 20; slider.dispatchEvent(new Event('input'));
                            return getComputedStyle(slider.parentNode).getPropertyValue('--pos').trim(); })()""",
        "clips": """[...document.querySelectorAll('section.clip')].map(section => ({
                        key: section.querySelector('h3 code').textContent,
                        frames: [...section.querySelectorAll('figcaption')].map(c => c.textContent),
                        loaded: [...section.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth).length,
                        facts: Object.fromEntries([...section.querySelectorAll('[data-fact]')].map(
                            cell => [cell.dataset.fact, cell.textContent]))}))""",
    })
    assert page.errors == []
    assert len(page.values["images"]) == 3 * PAIRS + CLIP_IMAGES
    assert all(complete and width > 0 for complete, width, _ in page.values["images"]), page.values["images"]
    assert page.values["sliders"] == PAIRS + 6 and page.values["bars"] >= 1
    assert page.values["slid"] == "20%"
    clips = {clip["key"]: clip for clip in page.values["clips"]}
    assert set(clips) == {FILM_KEY, SEQUENCE_KEY}
    for key, clip in clips.items():
        row = report["clips"].loc[key]
        assert clip["frames"] == ["first frame", "middle frame", "last frame"] and clip["loaded"] == 9
        assert clip["facts"]["frames in"] == clip["facts"]["frames out"] == str(int(row.frames_out))
        assert clip["facts"]["flicker"] == f"{row.flicker:.2f}"
        segments = report["rows"][(report["rows"].unit == "segment") & (report["rows"].source_key == key)]
        seconds = (row.finished_at - segments.started_at.min()).total_seconds()  # first segment to the commit
        assert float(clip["facts"]["frames / min"]) == pytest.approx(row.frames_out / seconds * 60, rel=0.01)
    ARTIFACTS.mkdir(exist_ok=True)
    (tmp_path / "run_report.png").write_bytes(page.screenshot)
    shutil.copy(tmp_path / "run_report.png", ARTIFACTS / "run_report.png")
    with Image.open(tmp_path / "run_report.png") as shot:
        assert shot.width == 1280 and shot.height > 900  # the whole page, longer than one screen
