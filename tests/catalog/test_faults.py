"""Faults: an actor killed mid-batch, the driver killed mid-run and re-run. (The job's exit codes:
test_preflight.py.)"""

from __future__ import annotations

import pathlib
import signal

import duckdb
import pytest
from support.catalog import (
    Job,
    job_config,
    manifests,
    outputs,
    run_index,
    session_ray_address,
    small_catalog,
    write_catalog,
)

from pipeline.config import validate_config
from pipeline.manifest import read_manifests
from pipeline.run import EXIT_OK, run_job
from pipeline.storage import Location


@pytest.mark.slow
def test_actor_killed_mid_batch_loses_and_duplicates_nothing(ray_local, marker_dir, tmp_path):
    files = small_catalog(8)
    write_catalog(tmp_path / "in", files)
    reference = job_config(str(tmp_path / "in"), str(tmp_path / "reference"))
    assert run_job(validate_config(reference)) == EXIT_OK
    # the engine SIGKILLs its own process on its second image, i.e. in the middle of its first batch of 4
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), model={"path": "support.engines:crash_once"},
                        compute={"batch_size": 4, "actors": {"min": 1, "max": 1}})
    assert run_job(validate_config(config)) == EXIT_OK
    assert (marker_dir / "crashed").exists()
    rows = manifests(tmp_path / "out")
    assert sorted(rows.source_key) == sorted(files) and set(rows.status) == {"ok"}  # each exactly once
    assert rows.worker.nunique() == 1 and str(rows.worker.iloc[0]).split("/")[1] != (marker_dir / "crashed").read_text()
    assert outputs(tmp_path / "out") == outputs(tmp_path / "reference")  # bicubic = bicubic: same bytes


# -- kill and resume with the bundled DiT4SR model (the seed matters), at deterministic points ------------------------
BUNDLED = {"model": {"path": "bundled"}, "upscale": {"scale": 4},
           "compute": {"batch_size": 2, "actors": {"min": 1, "max": 1}, "torch_threads": 1},
           # the killed run's lease must not hold the re-run for long: it expires in 3 s, the re-run waits for it
           "run": {"progress_interval_s": 1, "lock": {"ttl_s": 3, "wait_s": 60}}}
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def bundled_reference(ray_session, tmp_path_factory) -> tuple[pathlib.Path, dict[str, bytes]]:
    """A catalog of tiny photos and an uninterrupted run's outputs (run in this process on the session's Ray: only
    the killed runs need a process of their own)."""
    root = tmp_path_factory.mktemp("bundled")
    files = small_catalog(6)
    write_catalog(root / "in", files)
    assert run_job(validate_config(job_config(str(root / "in"), str(root / "reference"), **BUNDLED))) == EXIT_OK
    return root / "in", outputs(root / "reference")


def user_duplicates(output: pathlib.Path) -> list:
    """The README's query for inputs with more than one ok row, as users type it (DuckDB refuses a glob that
    matches no file: no run committed yet)."""
    if not list(output.glob("_manifests/*/*.parquet")):
        return []
    return duckdb.sql(f"select source_key, count(*) from read_parquet('{output}/_manifests/*/*.parquet') "
                      "where status = 'ok' group by 1 having count(*) > 1").fetchall()


def user_ok_rows(output: pathlib.Path) -> list[str]:
    if not list(output.glob("_manifests/*/*.parquet")):
        return []
    return sorted(key for (key,) in duckdb.sql(
        f"select source_key from read_parquet('{output}/_manifests/*/*.parquet') where status = 'ok'").fetchall())


@pytest.mark.slow
def test_kill_between_output_write_and_manifest_commit_resumes_exactly_once(ray_local, bundled_reference,
                                                                          tmp_path):
    source, reference = bundled_reference
    output = tmp_path / "out"
    config = job_config(str(source), str(output), **BUNDLED)
    # killed once the run has committed one batch's part, as the next batch's outputs are written and its part is not
    # (the writing task and the driver; Ray ends the rest of the job)
    killed = Job(config, tmp_path / "job.yaml", kill_at="after_output_write:1",
                 env={"RAY_ADDRESS": session_ray_address()})
    assert killed.finish() == KILLED and killed.killed_at == "after_output_write", killed.log
    recorded = read_manifests(Location(str(output), {})).to_pandas()  # the killed run's committed batch parts
    written = outputs(output)
    done = len(recorded)  # 2 or more: write tasks may run side by side
    assert 0 < done < len(inputs_of(source)) and set(recorded.status) == {"ok"}
    assert len(written) > len(recorded)  # outputs whose manifest part was never committed: the window was hit
    assert user_duplicates(output) == [] and user_ok_rows(output) == []  # the run was not committed: none shown

    assert run_job(validate_config(config)) == EXIT_OK  # the re-run, in this process on the session's Ray
    assert outputs(output) == reference  # byte-identical to the uninterrupted run, nothing partial
    assert user_duplicates(output) == [] and user_ok_rows(output) == inputs_of(source)
    runs = run_index(output)
    assert list(runs.outcome) == ["interrupted", "ok"]
    assert list(runs.ok) == [done, len(reference) - done]  # the re-run redid exactly what had no committed row
    assert list(runs.skipped) == [0, done]
    assert not list(output.glob("_manifests/run=*/parts"))


@pytest.mark.slow
def test_kill_inside_compaction_never_shows_a_row_twice(ray_local, bundled_reference, tmp_path):
    source, reference = bundled_reference
    output = tmp_path / "out"
    config = job_config(str(source), str(output), **BUNDLED)
    killed = Job(config, tmp_path / "job.yaml", kill_at="inside_compaction", env={"RAY_ADDRESS": session_ray_address()})
    assert killed.finish() == KILLED and killed.killed_at == "inside_compaction", killed.log
    assert outputs(output) == reference
    # the run's file was committed before its parts went: every input once, none twice
    assert user_duplicates(output) == [] and user_ok_rows(output) == inputs_of(source)
    assert len(list(output.glob("_manifests/run=*/parts/part-*.parquet"))) >= 2  # killed with parts half deleted

    assert run_job(validate_config(config)) == EXIT_OK  # the re-run, in this process on the session's Ray
    assert outputs(output) == reference
    assert user_duplicates(output) == [] and user_ok_rows(output) == inputs_of(source)
    assert not list(output.glob("_manifests/run=*/parts"))  # the interrupted commit was finished
    runs = run_index(output)
    assert list(runs.outcome) == ["interrupted", "ok"] and list(runs.skipped) == [0, len(reference)]


def inputs_of(source: pathlib.Path) -> list[str]:
    return sorted(str(path.relative_to(source)) for path in source.rglob("*") if path.is_file())
