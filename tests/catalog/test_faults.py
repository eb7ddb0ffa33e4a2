"""Faults: an actor killed mid-batch, the driver killed mid-run and re-run, and the job's exit codes."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml
from catalog_support import (
    REPO,
    job_config,
    manifests,
    outputs,
    small_catalog,
    write_catalog,
)

from pipeline.config import validate_config
from pipeline.run import EXIT_INPUTS_FAILED, EXIT_JOB_FAILED, EXIT_OK, run_job

JOB = REPO / "jobs" / "upscale_catalog.py"


def test_actor_killed_mid_batch_loses_and_duplicates_nothing(ray_local, marker_dir, tmp_path):
    files = small_catalog(8)
    write_catalog(tmp_path / "in", files)
    reference = job_config(str(tmp_path / "in"), str(tmp_path / "reference"))
    assert run_job(validate_config(reference)) == EXIT_OK
    # the engine SIGKILLs its own process on its second image, i.e. in the middle of its first batch of 4
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), model={"path": "catalog_test_engines:crash_once"},
                        compute={"batch_size": 4, "actors": {"min": 1, "max": 1}})
    assert run_job(validate_config(config)) == EXIT_OK
    assert (marker_dir / "crashed").exists()
    rows = manifests(tmp_path / "out")
    assert sorted(rows.source_key) == sorted(files) and set(rows.status) == {"ok"}  # each exactly once
    assert rows.worker.nunique() == 1 and str(rows.worker.iloc[0]).split("/")[1] != (marker_dir / "crashed").read_text()
    assert outputs(tmp_path / "out") == outputs(tmp_path / "reference")  # bicubic = bicubic: same bytes


def _write_config(path: pathlib.Path, config: dict) -> pathlib.Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _job(config: pathlib.Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "CATALOG_TEST_SLOW_S": "0.3"}
    return subprocess.Popen([sys.executable, str(JOB), "--config", str(config), *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _kill_when(driver: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert driver.poll() is None, f"the job ended before {what}:\n{driver.stdout.read()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started, at once
    driver.wait()


@pytest.mark.slow
def test_killed_driver_rerun_finishes_exactly_once_with_identical_bytes(ray_local, tmp_path):
    files = small_catalog(16)
    write_catalog(tmp_path / "in", files)
    sections = {"model": {"path": "catalog_test_engines:slow"},
                "compute": {"batch_size": 2, "actors": {"min": 1, "max": 1}}}
    reference = job_config(str(tmp_path / "in"), str(tmp_path / "reference"), **sections)
    assert run_job(validate_config(reference)) == EXIT_OK  # the uninterrupted run, same machine

    output = tmp_path / "out"
    config = _write_config(tmp_path / "job.yaml", job_config(str(tmp_path / "in"), str(output), **sections))
    parts = lambda: len(list(output.glob("_manifests/run=*/part-*.parquet")))  # noqa: E731
    # kill 1: as soon as the first output exists (most likely before its manifest part is committed)
    _kill_when(_job(config, start_new_session=True), lambda: bool(outputs(output)), "the first output")
    # kill 2: in the middle of the re-run, after it committed two more batches
    committed = parts()
    _kill_when(_job(config, start_new_session=True), lambda: parts() >= committed + 2, "two more batches")
    before = manifests(output)
    before = before[before.status == "ok"]
    assert 0 < len(before) < len(files) and before.source_key.is_unique

    final = _job(config)
    log, _ = final.communicate(timeout=300)
    assert final.returncode == EXIT_OK, log
    assert outputs(output) == outputs(tmp_path / "reference")  # byte-identical, nothing partial
    rows = manifests(output)
    ok = rows[rows.status == "ok"]
    assert sorted(ok.source_key) == sorted(files)  # every input exactly once in the final state
    last = rows[rows.run_id == rows.run_id.max()]
    assert sorted(last[last.status == "skipped"].source_key) == sorted(before.source_key)
    assert sorted(last[last.status == "ok"].source_key) == sorted(set(files) - set(before.source_key))


@pytest.mark.slow
def test_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {uri: x}\noutput: {uri: y}\nupscale: {scael: 2}\n")
    result = subprocess.run([sys.executable, str(JOB), "--config", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == EXIT_JOB_FAILED and "upscale.scael: unknown key" in result.stderr

    write_catalog(tmp_path / "in", {"ok.png": small_catalog(1)["album0/photo 0.png"], "empty.png": b""})
    config = _write_config(tmp_path / "job.yaml", job_config(str(tmp_path / "in"), str(tmp_path / "out")))
    first = _job(config)
    log, _ = first.communicate(timeout=300)
    assert first.returncode == EXIT_INPUTS_FAILED, log
    assert "1 ok, 1 failed" in log and "failed empty_file: 1" in log
    assert "progress: 1 done, 1 failed, 0 remaining of 2" in log and "items/min" in log
    (tmp_path / "in" / "empty.png").unlink()  # failed inputs are retried on the next run; this one is gone
    second = _job(config)
    log, _ = second.communicate(timeout=300)
    assert second.returncode == EXIT_OK, log
    assert "0 ok, 0 failed, 1 skipped" in log
