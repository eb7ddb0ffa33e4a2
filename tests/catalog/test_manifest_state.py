"""Manifests over many runs: incremental runs, the compacted unit state planning reads, the runs index, commits
that a kill interrupts (one row per unit of work, always, in what users query), and stale temp files."""

from __future__ import annotations

import datetime as dt
import os
import pathlib
import time
import uuid

import duckdb
import pytest
from support.catalog import (
    image_bytes,
    job_config,
    manifests,
    outputs,
    read_runs,
    run_index,
    small_catalog,
    write_catalog,
)

from pipeline import manifest, state
from pipeline.config import validate_config
from pipeline.run import EXIT_INPUTS_FAILED, EXIT_OK, run_job
from pipeline.storage import Location


def run(config: dict) -> int:
    return run_job(validate_config(config))


def ok_counts(output: pathlib.Path) -> dict[str, int]:
    """ok rows per input in ``_manifests/*/*.parquet``, queried as the README shows (DuckDB refuses a glob that
    matches no file: no run committed yet)."""
    if not list(output.glob("_manifests/*/*.parquet")):
        return {}
    return dict(duckdb.sql(f"select source_key, count(*) from read_parquet('{output}/_manifests/*/*.parquet') "
                           "where status = 'ok' group by 1").fetchall())


@pytest.mark.slow
def test_a_second_run_processes_exactly_what_changed(ray_local, tmp_path):
    """New and changed sources and a deleted output are redone, nothing else (untouched outputs are not even
    rewritten); the result is what one run over the final catalog gives; a setting that changes output bytes
    redoes everything."""
    source, output = tmp_path / "in", tmp_path / "out"
    files = small_catalog(6)
    write_catalog(source, files)
    assert run(job_config(str(source), str(output))) == EXIT_OK
    untouched = {key: (output / key).stat() for key in outputs(output)}

    changed, lost = sorted(files)[1], sorted(files)[2]
    new = {"album0/new.png": image_bytes(7, 5, seed=40), "new/b.jpg": image_bytes(6, 6, "JPEG", seed=41)}
    files[changed] = image_bytes(8, 5, "PNG" if changed.endswith("png") else "JPEG", seed=42)
    write_catalog(source, {changed: files[changed], **new})
    files.update(new)
    lost_output = str(pathlib.PurePosixPath(lost).with_suffix(".png"))
    (output / lost_output).unlink()
    assert run(job_config(str(source), str(output))) == EXIT_OK

    second = run_index(output).iloc[-1]
    assert (second.ok, second.skipped, second.failed) == (4, len(files) - 4, 0)
    rows = manifests(output)
    assert sorted(rows[rows.run_id == second.run_id].source_key) == sorted([changed, lost, *new])
    changed_output = str(pathlib.PurePosixPath(changed).with_suffix(".png"))
    for key, before in untouched.items():  # unchanged inputs' outputs were not even rewritten
        if key not in (changed_output, lost_output):
            after = (output / key).stat()
            assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), key
    assert run(job_config(str(source), str(tmp_path / "fresh"))) == EXIT_OK
    assert outputs(output) == outputs(tmp_path / "fresh")  # the same bytes as one run over the final catalog
    assert ok_counts(output) == {key: 2 if key in (changed, lost) else 1 for key in files}  # history kept

    assert run(job_config(str(source), str(output), upscale={"scale": 3})) == EXIT_OK
    third = run_index(output).iloc[-1]
    assert (third.ok, third.skipped) == (len(files), 0)
    rows = manifests(output)
    latest = rows[rows.run_id == third.run_id]
    assert set(latest.status) == {"ok"} and (latest.out_width == latest.width * 3).all()


@pytest.mark.slow
def test_planning_reads_the_unit_state_not_the_runs_history(ray_local, tmp_path):
    source, output = tmp_path / "in", tmp_path / "out"
    files = small_catalog(4)
    write_catalog(source, files)
    config = job_config(str(source), str(output))
    assert run(config) == EXIT_OK
    (source / sorted(files)[0]).write_bytes(image_bytes(9, 9, seed=7) if sorted(files)[0].endswith("png")
                                            else image_bytes(9, 9, "JPEG", seed=7))
    assert run(config) == EXIT_OK
    location = Location(str(output), {})
    table, folded = state.read_state(location)
    assert folded == set(run_index(output).run_id) and table.num_rows == len(files)  # one row per unit
    assert sorted(table["source_key"].to_pylist()) == sorted(files)
    # the runs' own files can no longer be read: planning does not need them
    for path in output.glob("_manifests/run=*/part-*.parquet"):
        path.write_bytes(b"not parquet")
    assert run(config) == EXIT_OK
    assert run_index(output).iloc[-1].skipped == len(files)


def _row(run_id: str, key: str, status: str = "ok") -> dict:
    now = manifest.utcnow()
    return manifest.empty_row(run_id=run_id, source_key=key, unit="image", unit_key=key, status=status,
                              output_key=key, config_fingerprint="f", started_at=now, finished_at=now)


def test_a_killed_runs_rows_count_for_planning_and_show_once_committed(tmp_path):
    output = Location(str(tmp_path / "out"), {})
    for batch in (["a", "b"], ["c"]):  # two batches committed by a run that was then killed
        manifest.write_part(output, "r1", [_row("r1", key) for key in batch])
    assert sorted(state.latest_done(output)) == ["a", "b", "c"]  # planning sees them: nothing is redone
    assert ok_counts(tmp_path / "out") == {}  # users see no run that was not committed, never a part of one

    state.recover(output)  # the next run, holding the lock
    assert ok_counts(tmp_path / "out") == {"a": 1, "b": 1, "c": 1}
    assert not list((tmp_path / "out").glob("_manifests/run=r1/parts/*"))
    assert state.read_state(output)[1] == {"r1"}
    (interrupted,) = read_runs(output).to_pylist()
    assert (interrupted["run_id"], interrupted["outcome"], interrupted["exit_code"], interrupted["ok"]) == \
        ("r1", "interrupted", None, 3)


def test_a_state_written_before_the_caption_columns_gains_them(tmp_path):
    """Columns added to the manifest later (prompt, caption, ...) read as null from an older state file, and the
    next fold writes them, with the values of the runs it folds."""
    output = Location(str(tmp_path / "out"), {})
    new_columns = ["prompt", "caption", "caption_model", "caption_fingerprint", "caption_run_id"]
    older = manifest.to_table([_row("r0", "a")]).drop_columns(new_columns)
    output.write_atomic(state.STATE_KEY, manifest.table_bytes(
        older.replace_schema_metadata({b"dit4sr.folded_runs": b'["r0"]'})))
    assert state.latest_done(output)["a"]["caption"] is None
    manifest.write_part(output, "r1", [{**_row("r1", "b"), "caption": "a boat", "caption_fingerprint": "c"}])
    manifest.commit_run(output, "r1")
    assert state.fold(output) == ["r1"]
    table, folded = state.read_state(output)
    assert folded == {"r0", "r1"} and set(new_columns) <= set(table.column_names)
    assert {row["unit_key"]: row["caption"] for row in table.to_pylist()} == {"a": None, "b": "a boat"}
    assert state.latest_done(output)["b"]["caption_fingerprint"] == "c"


def test_a_commit_interrupted_while_deleting_parts_is_finished_not_redone(tmp_path):
    output = Location(str(tmp_path / "out"), {})
    for batch in (["a", "b"], ["c"], ["d"]):
        manifest.write_part(output, "r1", [_row("r1", key) for key in batch])
    parts = {path: path.read_bytes() for path in sorted((tmp_path / "out").glob("_manifests/run=r1/parts/*"))}
    manifest.commit_run(output, "r1")
    for path, data in list(parts.items())[1:]:  # as a kill inside compaction leaves it: the run's file, some parts
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    committed = sorted((tmp_path / "out").glob("_manifests/run=r1/part-*.parquet"))
    assert len(committed) == 1 and ok_counts(tmp_path / "out") == dict.fromkeys("abcd", 1)
    assert sorted(manifest.read_manifests(output)["source_key"].to_pylist()) == list("abcd")  # none twice
    assert sorted(state.latest_done(output)) == list("abcd")
    state.recover(output)
    # finished by deleting the leftovers, not by folding them into a second (partial) file
    assert sorted((tmp_path / "out").glob("_manifests/run=r1/part-*.parquet")) == committed
    assert ok_counts(tmp_path / "out") == dict.fromkeys("abcd", 1)
    assert not list((tmp_path / "out").glob("_manifests/run=r1/parts/*"))


def test_stale_temp_files_are_swept_only_when_old_and_only_under_the_output(tmp_path):
    output_root = tmp_path / "out"
    old = time.time() - 2 * state.STALE_TEMP_AGE_S

    def temp(folder: pathlib.Path, target: str, age: float | None = None) -> pathlib.Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f".{target}.{uuid.uuid4().hex}.tmp"
        path.write_bytes(b"partial")
        if age is not None:
            os.utime(path, (age, age))
        return path

    stale = [temp(output_root / "album", "photo.png", old), temp(output_root / "_staging" / "film.mp4", "s.nut", old),
             temp(output_root / "_manifests" / "run=r" / "parts", "part-x.parquet", old)]
    fresh = temp(output_root / "album", "photo 2.png")  # a live writer's, perhaps
    outside = temp(tmp_path / "elsewhere", "photo.png", old)
    lookalike = output_root / "album" / ".notes.tmp"
    lookalike.write_bytes(b"a user's file")
    os.utime(lookalike, (old, old))
    staged = output_root / "_staging" / "film.mp4" / "000000000-000000016.nut"
    staged.write_bytes(b"a staged segment")
    os.utime(staged, (old, old))

    state.recover(Location(str(output_root), {}))
    assert not any(path.exists() for path in stale)
    assert fresh.exists() and outside.exists() and lookalike.exists() and staged.exists()


@pytest.mark.slow
@pytest.mark.parametrize("lock", [True, False])
def test_the_next_run_sweeps_temp_files_a_killed_write_left(ray_local, tmp_path, lock):
    source, output = tmp_path / "in", tmp_path / "out"
    write_catalog(source, small_catalog(2))
    killed_write = output / "album" / f".photo.png.{uuid.uuid4().hex}.tmp"
    killed_write.parent.mkdir(parents=True)
    killed_write.write_bytes(b"partial")
    old = time.time() - 2 * state.STALE_TEMP_AGE_S
    os.utime(killed_write, (old, old))
    assert run(job_config(str(source), str(output), run={"lock": {"enabled": lock}})) == EXIT_OK
    assert not killed_write.exists()


@pytest.mark.slow
def test_what_did_last_night_do_is_one_query(ray_local, tmp_path):
    source, output = tmp_path / "in", tmp_path / "out"
    write_catalog(source, {**small_catalog(3), "broken.png": b"", "bad/x.png": b"not a png"})
    assert run(job_config(str(source), str(output))) == EXIT_INPUTS_FAILED
    assert run(job_config(str(source), str(output))) == EXIT_INPUTS_FAILED  # failed inputs are retried
    last = duckdb.sql(f"select run_id, started_at, finished_at, outcome, exit_code, ok, failed, skipped, "
                      f"failures_by_type from read_parquet('{output}/_manifests/_index/runs/*.parquet') "
                      "order by started_at desc limit 1").fetchall()[0]
    run_id, started, finished, outcome, exit_code, ok, failed, skipped, failures = last
    assert (outcome, exit_code, ok, failed, skipped) == ("inputs_failed", 3, 0, 2, 3)
    assert failures == {"empty_file": 1, "not_an_image": 1}
    assert isinstance(started, dt.datetime) and finished >= started
    assert (output / "_manifests" / f"run={run_id}" / "_summary.json").exists()


@pytest.mark.parametrize("rows", [0, 3])
def test_the_user_glob_never_reads_the_index_files(tmp_path, rows):
    """State and runs index live deeper than ``_manifests/*/*.parquet``: the glob stays one schema, one row per
    unit of work per run."""
    output = Location(str(tmp_path / "out"), {})
    for i in range(rows):
        manifest.write_part(output, "r1", [_row("r1", f"k{i}")])
    state.recover(output)
    state.record_run(output, manifest.summarize([], run_id="r2", seconds=1.0, fingerprint="f", skipped=rows),
                     started_at=manifest.utcnow(), finished_at=manifest.utcnow(), exit_code=0)
    assert (tmp_path / "out" / state.RUNS_DIR / "r2.parquet").exists()
    assert sum(ok_counts(tmp_path / "out").values()) == rows
