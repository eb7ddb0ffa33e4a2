"""Observability: one JSON log line per finished input (debug level) and a progress line per interval; the job's
counters through Ray's metrics API, read back from the node's Prometheus endpoint (the metrics agent's export
port), registered and moving."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
import ray
import yaml
from support.catalog import REPO, image_bytes, job_config, session_ray_address, small_catalog, write_catalog

from pipeline.config import validate_config
from pipeline.run import EXIT_INPUTS_FAILED, run_job


@pytest.mark.slow
def test_one_json_line_per_finished_input_and_a_progress_line(ray_local, tmp_path, caplog):
    files = {**small_catalog(3), "broken.png": b""}
    write_catalog(tmp_path / "in", files)
    caplog.set_level(logging.DEBUG, logger="pipeline")
    assert run_job(validate_config(job_config(str(tmp_path / "in"), str(tmp_path / "out")))) == EXIT_INPUTS_FAILED
    finished = [json.loads(record.getMessage()) for record in caplog.records
                if record.levelno == logging.DEBUG and record.getMessage().startswith('{"event": "input_finished"')]
    assert sorted(line["source_key"] for line in finished) == sorted(files)
    by_key = {line["source_key"]: line for line in finished}
    assert (by_key["broken.png"]["status"], by_key["broken.png"]["error_type"]) == ("failed", "empty_file")
    ok = by_key["album0/photo 0.png"]
    assert (ok["status"], ok["output_key"], ok["tile_steps"]) == ("ok", "album0/photo 0.png", 1)
    assert ok["seconds"] > 0 and ok["worker"] and ok["run_id"] == by_key["broken.png"]["run_id"]
    progress = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "progress:" in r.getMessage()]
    assert progress and progress[-1].startswith("progress: 3 done, 1 failed, 0 remaining of 4 inputs — ")
    assert "items/min — " in progress[-1] and progress[-1].endswith("tile-steps/s — ETA 0 s")


def test_clip_progress_counts_frames_as_the_actors_finish_them(ray_local, tmp_path, caplog):
    """A 12-frame sequence in one segment, 2 frames per engine call of 0.25 s each: the progress line moves while
    the segment runs, in frames, with frames per minute and an ETA, and ends with the clip as one input done."""
    from pipeline.example_catalog import REEL_FRAMES, lay_out_example_videos
    from pipeline.storage import Location

    lay_out_example_videos(Location(str(tmp_path / "in"), {}))
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), model={"path": "support.engines:slow"},
                        video={"sequence_folders": ["reels/*"], "segment_seconds": 60.0, "frames_per_call": 2},
                        run={"progress_interval_s": 0.2}, input={"include": ["reels/**"]})
    caplog.set_level(logging.INFO, logger="pipeline")
    assert run_job(validate_config(config)) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    mid_segment = [line for line in lines if (match := re.search(
        rf"0 done, 0 failed, 1 remaining of 1 inputs — (\d+) of {REEL_FRAMES} frames", line))
        and 0 < int(match[1]) < REEL_FRAMES]
    assert mid_segment, lines
    assert all(re.search(r"frames/min — .* — ETA \d+ (s|min)$", line) for line in mid_segment), mid_segment
    assert lines[-1].startswith(f"progress: 1 done, 0 failed, 0 remaining of 1 inputs — {REEL_FRAMES} of "
                                f"{REEL_FRAMES} frames — ") and lines[-1].endswith("ETA 0 s"), lines
    # the run's frame counter ended with it (Ray Data keeps the handle its actors got: it used to live on)
    import ray

    assert not [name for name in ray.util.list_named_actors() if name.startswith("frame-counter-")]


# A driver that joins the session's Ray, runs the job once per config given, and waits for a line on stdin after
# each run, so the test can read the metrics it exported while it still lives (they are labelled by its WorkerId).
DRIVER = """
import sys, ray
from pipeline.config import load_config
from pipeline.run import run_job
ray.init(log_to_driver=False)
print("worker", ray.get_runtime_context().get_worker_id(), flush=True)
for path in sys.argv[1:]:
    print("exit", run_job(load_config(path)), flush=True)
    sys.stdin.readline()
"""


def _scrape(worker: str) -> dict[tuple[str, tuple], float]:
    """The driver's ``dit4sr`` samples from the node's Prometheus endpoint: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    node = next(node for node in ray.nodes() if node["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_dit4sr_") and sample.labels.get("WorkerId") == worker:
                labels = {k: v for k, v in sample.labels.items() if k in ("status", "error_type", "le")}
                samples[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return samples


def _await_metrics(worker: str, expected: dict[tuple[str, tuple], float]) -> dict:
    deadline = time.monotonic() + 120  # exported every second (the driver's RAY_metrics_report_interval_ms)
    while True:
        samples = _scrape(worker)
        if all(samples.get(key) == value for key, value in expected.items()):
            return samples
        assert time.monotonic() < deadline, f"metrics never reached {expected}: {samples}"
        time.sleep(0.25)


def _line(driver: subprocess.Popen, word: str) -> list[str]:
    """The driver's next output line that starts with ``word`` (the job prints its summary too), split."""
    while not (line := driver.stdout.readline()).startswith(word):
        assert line, "the driver ended"
    return line.split()


def _counter(name: str, **labels: str) -> tuple[str, tuple]:
    return (f"ray_dit4sr_{name}", tuple(sorted(labels.items())))


@pytest.mark.slow
def test_metrics_are_registered_and_move(ray_local, tmp_path):
    write_catalog(tmp_path / "in", {**small_catalog(4), "broken.png": b""})
    configs = []
    for name in ("first", "second"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job_config(str(tmp_path / "in"), str(tmp_path / "out"))))
        configs.append(str(path))
    # the driver exports its metrics to the node's agent every second, not every ten (Ray's default)
    env = {**os.environ, "RAY_ADDRESS": session_ray_address(), "RAY_metrics_report_interval_ms": "1000"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *configs], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        worker = _line(driver, "worker")[1]
        assert _line(driver, "exit") == ["exit", str(EXIT_INPUTS_FAILED)]
        first = _await_metrics(worker, {
            _counter("inputs_total", status="ok", error_type=""): 4,
            _counter("inputs_total", status="failed", error_type="empty_file"): 1,
            _counter("input_seconds_count"): 5,
            _counter("tile_steps_total"): 4,  # bicubic: one tile, one step per image
        })
        assert first[_counter("tile_steps_per_second")] > 0
        assert first[_counter("input_seconds_bucket", le="+Inf")] == 5

        write_catalog(tmp_path / "in", {f"new/{i}.png": image_bytes(6, 5, seed=10 + i) for i in range(3)})
        driver.stdin.write("\n")
        driver.stdin.flush()
        assert _line(driver, "exit") == ["exit", str(EXIT_INPUTS_FAILED)]  # broken.png fails again
        _await_metrics(worker, {
            _counter("inputs_total", status="ok", error_type=""): 7,
            _counter("inputs_total", status="failed", error_type="empty_file"): 2,
            _counter("tile_steps_total"): 7,
        })
    finally:
        driver.stdin.close()
        driver.wait(timeout=120)
