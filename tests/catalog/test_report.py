"""The run report (pipeline.report): written beside the run's manifests, self-contained, and rendered by headless
Chromium without console errors, every image loaded and the sliders working; the screenshot is kept as a test
artifact (test-artifacts/run_report.png, ignored by git)."""

from __future__ import annotations

import re
import shutil

import pytest
from PIL import Image
from support.browser import CHROMIUM, open_page
from support.catalog import REPO, image_bytes, job_config, write_catalog

from pipeline.config import validate_config
from pipeline.example_catalog import lay_out_example_catalog
from pipeline.report import PAIRS, REPORT_NAME, sample_pairs
from pipeline.run import EXIT_INPUTS_FAILED, run_job
from pipeline.storage import Location

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def report(ray_session, tmp_path_factory):
    """A run over the example photos, a few more images and some broken files; its report's path."""
    root = tmp_path_factory.mktemp("report")
    lay_out_example_catalog(Location(str(root / "in"), {}))
    write_catalog(root / "in", {
        **{f"scans/scan {i}.png": image_bytes(40 + 8 * i, 30, seed=i) for i in range(3)},
        "broken/empty.png": b"", "broken/also empty.jpg": b"", "broken/not a photo.jpg": b"plain text",
    })
    assert run_job(validate_config(job_config(str(root / "in"), str(root / "out")))) == EXIT_INPUTS_FAILED
    (path,) = (root / "out").glob(f"_manifests/run=*/{REPORT_NAME}")
    return path


def test_the_report_is_self_contained_and_says_what_happened(report):
    page = report.read_text()
    assert "<script src" not in page and "<link" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 * PAIRS and all(src.startswith("data:image/jpeg;base64,") for src in sources)
    assert set(re.findall(r"https?://[^\s\"']+", page)) <= {"http://www.w3.org/2000/svg"}  # the SVG namespace only
    for text in ("<b>11</b>inputs", "<b>8</b>ok", "<b>3</b>failed", "empty_file", "broken/also empty.jpg",
                 "<svg", "<title>", "people/cameraman.png", "space/rocket.png"):
        assert text in page, text


def test_the_pairs_sample_image_outputs_evenly_and_skip_failures():
    rows = [{"status": "ok", "source_key": f"{i:02d}.png", "output_key": f"{i:02d}.png"} for i in range(20)]
    rows += [{"status": "failed", "source_key": "bad.png", "output_key": "bad.png"},
             {"status": "ok", "source_key": "clip.mp4", "output_key": "clip.mp4", "unit": "video"}]
    assert [row["source_key"] for row in sample_pairs(rows, 5)] == ["00.png", "05.png", "10.png", "14.png", "19.png"]


@pytest.mark.skipif(CHROMIUM is None, reason="missing: chromium (apt-get install chromium)")
def test_chromium_renders_the_report_without_errors_and_loads_every_image(report, tmp_path):
    page = open_page(report.as_uri(), {
        "images": "[...document.images].map(i => [i.complete, i.naturalWidth, i.alt])",
        "sliders": "document.querySelectorAll('input[type=range]').length",
        "bars": "document.querySelectorAll('svg rect').length",
        "slid": """(() => { const slider = document.querySelector('input[type=range]');
                            slider.value = 20; slider.dispatchEvent(new Event('input'));
                            return getComputedStyle(slider.parentNode).getPropertyValue('--pos').trim(); })()""",
    })
    assert page.errors == []
    assert len(page.values["images"]) == 3 * PAIRS
    assert all(complete and width > 0 for complete, width, _ in page.values["images"]), page.values["images"]
    assert page.values["sliders"] == PAIRS and page.values["bars"] >= 1
    assert page.values["slid"] == "20%"
    ARTIFACTS.mkdir(exist_ok=True)
    (tmp_path / "run_report.png").write_bytes(page.screenshot)
    shutil.copy(tmp_path / "run_report.png", ARTIFACTS / "run_report.png")
    with Image.open(tmp_path / "run_report.png") as shot:
        assert shot.width == 1280 and shot.height > 900  # the whole page, longer than one screen
