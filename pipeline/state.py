"""What planning reads, bounded by the catalog: the latest row per unit of work, and one row per run.

* ``_manifests/_index/units/latest.parquet``: for each unit of work its latest ``ok``/``staged`` row (the newest
  ``finished_at``) over every run folded into it; the runs it holds are listed in the file's own metadata, so the
  file and that list change together, in one atomic write. Each run folds itself in when it ends; planning reads
  this file plus the rows of any run not folded in yet (one killed before folding, or one that lost a race when
  the run lock is off) — never the whole history.
* ``_manifests/_index/runs/<run id>.parquet``: one row per run (start, end, outcome, exit code, counts, failures by
  type, config fingerprint), for "what did last night do?".
* ``recover``, at the start of a run holding the run lock: commits the manifests of runs that were killed (so
  ``_manifests/*/*.parquet`` shows them), finishes commits interrupted half way, folds committed runs into the
  state, records killed runs as ``interrupted``, and sweeps temp files that killed writes left behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import time
import zlib
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import listing, manifest
from .outcome import EXIT_INPUTS_FAILED, EXIT_OK
from .storage import Location, with_retries

log = logging.getLogger("pipeline")

STATE_KEY = f"{manifest.MANIFEST_DIR}/_index/units/latest.parquet"
RUNS_DIR = f"{manifest.MANIFEST_DIR}/_index/runs"
_FOLDED = b"dit4sr.folded_runs"  # state metadata: JSON list of the run ids folded into it
# A killed write's temp file (dit4sr.files.temp_name): hidden, the target's name, a uuid4 hex, ".tmp".
_TEMP = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")
STALE_TEMP_AGE_S = 3600.0  # far above any single write; younger temp files may belong to a live writer

_TS = pa.timestamp("us", tz="UTC")
RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("started_at", _TS),
    ("finished_at", _TS),
    ("outcome", pa.string()),  # ok | inputs_failed | interrupted (killed or crashed; recorded by the next run)
    ("exit_code", pa.int64()),  # null for an interrupted run
    ("inputs", pa.int64()),
    ("ok", pa.int64()),
    ("failed", pa.int64()),
    ("skipped", pa.int64()),
    ("segments_staged", pa.int64()),
    ("failures_by_type", pa.map_(pa.string(), pa.int64())),
    ("config_fingerprint", pa.string()),
    ("seconds", pa.float64()),
    ("output_uri", pa.string()),
    ("summary_uri", pa.string()),
])

# What planning needs of a unit's latest row (planner.py: done_before, and finishing clips from staged segments).
PLAN_COLUMNS = ["source_key", "unit_key", "source_size", "source_etag_or_mtime", "output_key", "output_size",
                "output_etag_or_mtime", "config_fingerprint", "finished_at", "status", "width", "height",
                "out_width", "out_height", "frames_out", "flicker", "flicker_pairs", "reference_motion",
                "caption", "caption_fingerprint", "caption_run_id"]
_DONE = pc.field("status").isin(["ok", "staged"])


# -- the unit state ------------------------------------------------------------------------------------------------
def read_state(output: Location, columns: list[str] | None = None) -> tuple[pa.Table, set[str]]:
    """The state's rows and the runs folded into it (none yet: an empty table)."""
    def read() -> tuple[pa.Table, set[str]]:
        with output.fs.open(output.path(STATE_KEY), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            folded = set(json.loads((parquet.schema_arrow.metadata or {}).get(_FOLDED, b"[]")))
            present = [name for name in columns or manifest.COLUMNS if name in parquet.schema_arrow.names]
            return _conform(parquet.read(columns=present), columns or manifest.COLUMNS), folded

    try:
        return with_retries(read)  # pyarrow reads through fsspec without our retry layer
    except FileNotFoundError:
        return manifest.SCHEMA.empty_table().select(columns or manifest.COLUMNS), set()


def _conform(table: pa.Table, columns: list[str]) -> pa.Table:
    """``table`` with exactly ``columns``: columns added to the manifest after the state was written are null."""
    for name in columns:
        if name not in table.column_names:
            table = table.append_column(manifest.SCHEMA.field(name), pa.nulls(table.num_rows,
                                                                              manifest.SCHEMA.field(name).type))
    return table.select(columns)


def _with_unit_keys(table: pa.Table) -> pa.Table:
    """Rows written before units existed have no unit_key: theirs is the source key."""
    keys = pc.coalesce(table["unit_key"], table["source_key"])
    return table.set_column(table.schema.get_field_index("unit_key"), "unit_key", keys)


def _latest_per_unit(table: pa.Table) -> pa.Table:
    """One row per unit_key: the one with the newest finished_at."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(table, sort_keys=[("unit_key", "ascending"), ("finished_at", "descending")])
    table = table.take(order)
    keys = table["unit_key"].combine_chunks()
    first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), first.fill_null(True)]))


def _merge(state: pa.Table, rows: pa.Table) -> pa.Table:
    """``state`` (one row per unit) updated with ``rows``: only the units ``rows`` touch are re-decided."""
    if rows.num_rows == 0:
        return state
    rows = _with_unit_keys(rows)
    touched = pc.is_in(state["unit_key"], value_set=pc.unique(rows["unit_key"]))
    contested = pa.concat_tables([state.filter(touched), rows.select(state.column_names)])
    return pa.concat_tables([state.filter(pc.invert(touched)), _latest_per_unit(contested)])


def _runs_to_read(output: Location, folded: set[str]) -> list[manifest.RunFiles]:
    return [files for run_id, files in sorted(manifest.list_runs(output).items()) if run_id not in folded]


class LatestRows(Mapping[str, dict[str, Any]]):
    """unit key -> its latest ok/staged row, built as a dict on lookup (a million dicts up front cost seconds)."""

    def __init__(self, table: pa.Table):
        self._names = table.column_names
        self._rows = dict(zip(table["unit_key"].to_pylist(), zip(*(table[name].to_pylist() for name in self._names))))

    def __getitem__(self, key: str) -> dict[str, Any]:
        return dict(zip(self._names, self._rows[key]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


STATE_ROW_GROUP = 250_000  # rows per row group of the state file: the unit of parallel reads


def _state_layout(output: Location) -> tuple[set[str], int]:
    """The runs folded into the state and its number of row groups, from the file's footer alone."""
    def read() -> tuple[set[str], int]:
        with output.fs.open(output.path(STATE_KEY), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            return (set(json.loads((parquet.schema_arrow.metadata or {}).get(_FOLDED, b"[]"))),
                    parquet.metadata.num_row_groups)

    try:
        return with_retries(read)
    except FileNotFoundError:
        return set(), 0


def read_state_groups(output: Location, groups: list[int], columns: list[str]) -> pa.Table:
    """Task: some row groups of the state file, its done rows only."""
    def read() -> pa.Table:
        with output.fs.open(output.path(STATE_KEY), "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = [name for name in columns or manifest.COLUMNS if name in parquet.schema_arrow.names]
            return _conform(parquet.read_row_groups(groups, columns=present), columns or manifest.COLUMNS)

    table = with_retries(read)
    return _with_unit_keys(table.filter(pc.field("status").isin(["ok", "staged"])))


def read_unfolded(output: Location, keys: list[str], columns: list[str]) -> pa.Table:
    """Task: the done rows of a run not folded into the state yet."""
    return _with_unit_keys(manifest.read_files(output, keys, columns, where=_DONE))


def done_blocks(output: Location, *, in_tasks: bool, columns: list[str] | None = PLAN_COLUMNS,
                unfolded: bool = True) -> list[Any]:
    """What ``latest_done`` reads, as blocks (tables, or refs to tables read in Ray tasks): the state file's done
    rows a few row groups per block, and each unfolded run's done rows. A unit may have rows in several blocks:
    whoever joins them keeps its newest (``latest_per_unit``)."""
    folded, groups = _state_layout(output)
    reads = [(read_state_groups, (output, [group], columns)) for group in range(groups)]
    if unfolded:
        reads += [(read_unfolded, (output, files.rows_from, columns)) for files in _runs_to_read(output, folded)]
    runner = listing.Runner(in_tasks)
    return [runner.submit(function, *args) for function, args in reads]


def latest_per_unit(tables: list[pa.Table], columns: list[str] = PLAN_COLUMNS) -> pa.Table:
    """One row per unit of work, its newest, from blocks of ``done_blocks``."""
    if not tables:
        return manifest.SCHEMA.empty_table().select(columns)
    return _latest_per_unit(pa.concat_tables(tables))


def latest_done(output: Location) -> LatestRows:
    """For each unit of work, its most recent ``ok`` or ``staged`` row (what its output should currently hold):
    the state, updated with the rows of runs not folded into it yet."""
    state, folded = read_state(output, PLAN_COLUMNS)
    state = state.filter(_DONE)
    for files in _runs_to_read(output, folded):
        state = _merge(state, manifest.read_files(output, files.rows_from, PLAN_COLUMNS, where=_DONE))
    return LatestRows(state)


ROWS_PER_BUCKET = 100_000  # unit rows merged by one task while folding


def _split_units(table: pa.Table, buckets: int) -> listing.Buckets:
    """Task: a block's rows by bucket of their unit key."""
    ids = np.fromiter((zlib.crc32(key.encode()) % buckets for key in table["unit_key"].to_pylist()), np.int64,
                      count=table.num_rows)
    return listing.Buckets.split(table, ids, buckets)


def _latest_of(*tables: pa.Table) -> pa.Table:
    """Task: the latest row per unit of ``tables``."""
    return _latest_per_unit(pa.concat_tables(tables).replace_schema_metadata(None))


def _latest_in_bucket(number: int, *splits: listing.Buckets) -> pa.Table:
    """Task: bucket ``number``'s latest row per unit, from every block's split."""
    return _latest_of(*(split.part(number) for split in splits))


def fold(output: Location, *, in_tasks: bool | None = None) -> list[str]:
    """Fold every committed run that the state lacks into it, in one atomic write; returns their ids.

    A run without its committed file (still running, or killed and not recovered) stays out: planning reads its
    parts directly until it is committed. The state and the runs' rows are split by unit into buckets merged in Ray
    tasks (where Ray is up), and streamed into the new file one at a time by one more task: the driver only waits."""
    folded, _ = _state_layout(output)
    runs = [files for files in _runs_to_read(output, folded) if files.committed]
    if not runs:
        return []
    runner = listing.Runner(ray_is_up() if in_tasks is None else in_tasks)
    blocks = done_blocks(output, in_tasks=runner.in_tasks, columns=None, unfolded=False)
    blocks += [runner.submit(read_unfolded, output, files.committed, None) for files in runs]
    buckets = max(1, -(-runner.rows(blocks) // ROWS_PER_BUCKET))
    if buckets == 1:
        merged = [runner.submit(_latest_of, *blocks)]
    else:
        splits = [runner.submit(_split_units, block, buckets) for block in blocks]
        merged = [runner.submit(_latest_in_bucket, number, *splits) for number in range(buckets)]
        del splits
    del blocks
    ids = sorted(folded | {files.run_id for files in runs})
    writing = runner.submit(_write_state, output, ids, merged, runner.in_tasks)
    del merged  # the writing task holds the buckets now, and lets each go once written
    runner.get(writing)
    return [files.run_id for files in runs]


def _write_state(output: Location, folded: list[str], merged: list[Any], in_tasks: bool) -> None:
    """Task: stream the merged buckets, one at a time, into the new state file and commit it atomically — here,
    not on the driver, whose memory would otherwise map every bucket's object-store pages it read."""
    runner = listing.Runner(in_tasks)
    schema = manifest.SCHEMA.with_metadata({_FOLDED: json.dumps(folded).encode()})
    temp = output.temp_path(STATE_KEY)
    try:
        with pq.ParquetWriter(temp, schema) as writer:
            for number in range(len(merged)):
                writer.write_table(runner.get(merged[number]).cast(manifest.SCHEMA), row_group_size=STATE_ROW_GROUP)
                merged[number] = None  # the bucket is written: let it go
        output.commit_file(STATE_KEY, temp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


# -- the runs index ------------------------------------------------------------------------------------------------
def record_run(output: Location, summary: dict[str, Any], *, started_at: dt.datetime, finished_at: dt.datetime,
               exit_code: int | None) -> str:
    """Commit the run's row of the runs index (from its summary); returns its URI."""
    outcome = "interrupted" if exit_code is None else "ok" if summary["failed"] == 0 else "inputs_failed"
    row = {
        "run_id": summary["run_id"], "started_at": started_at, "finished_at": finished_at, "outcome": outcome,
        "exit_code": exit_code, "inputs": summary["inputs"], "ok": summary["ok"], "failed": summary["failed"],
        "skipped": summary["skipped"], "segments_staged": summary.get("segments", {}).get("staged", 0),
        "failures_by_type": list(summary["failures_by_type"].items()),
        "config_fingerprint": summary["config_fingerprint"], "seconds": summary["seconds"],
        "output_uri": summary.get("output_uri"), "summary_uri": summary.get("summary_uri"),
    }
    key = f"{RUNS_DIR}/{summary['run_id']}.parquet"
    output.write_atomic(key, manifest.table_bytes(pa.Table.from_pylist([row], schema=RUNS_SCHEMA)))
    return output.url(key)


def _record_unrecorded(output: Location, files: manifest.RunFiles) -> None:
    """The runs-index row of a run that has none: from its summary where it wrote one (it ended, but was stopped
    before its row), else from its manifest rows, as ``interrupted``."""
    summary_key = f"{manifest.run_dir(files.run_id)}/_summary.json"
    if output.fs.exists(output.path(summary_key)):
        summary = json.loads(output.read(summary_key))
        timestamps = [dt.datetime.fromisoformat(summary[name]) if summary.get(name) else None
                      for name in ("started_at", "finished_at")]
        record_run(output, summary, started_at=timestamps[0], finished_at=timestamps[1],
                   exit_code=exit_code_of(summary))
        return
    tally = manifest.Tally.of_files(output, files.rows_from)  # streamed: a killed run may have millions of rows
    started, finished = tally.started or tally.finished, tally.finished or tally.started
    first = next(manifest.iter_batches(output, files.rows_from[:1], ["config_fingerprint"]), None)
    summary = manifest.summarize(tally, run_id=files.run_id,
                                 seconds=(finished - started).total_seconds() if started else 0.0,
                                 fingerprint=first["config_fingerprint"][0].as_py() if first and first.num_rows
                                 else None)
    record_run(output, summary, started_at=started, finished_at=finished, exit_code=None)


def exit_code_of(summary: dict[str, Any]) -> int:
    """The exit code of a run that ended (pipeline.run): 0 all ok or already done, 3 some inputs failed."""
    return EXIT_INPUTS_FAILED if summary["failed"] else EXIT_OK


# -- recovery ------------------------------------------------------------------------------------------------------
def sweep_stale_temps(output: Location, max_age_s: float = STALE_TEMP_AGE_S) -> list[str]:
    """Delete hidden temp files (``.<name>.<uuid>.tmp``) older than ``max_age_s`` under the output root; returns
    their keys. Only local outputs can hold them: on object stores a write is one PUT and large outputs are built
    in the machine's own temp folder, never under the output prefix."""
    if not output.is_local or not os.path.isdir(output.root):
        return []
    cutoff = time.time() - max_age_s
    swept = []
    for folder, _, names in os.walk(output.root):
        for name in names:
            path = os.path.join(folder, name)
            if _TEMP.match(name) and os.lstat(path).st_mtime < cutoff:
                os.remove(path)
                swept.append(os.path.relpath(path, output.root).replace(os.sep, "/"))
    if swept:
        log.info("removed %d temp file(s) left by killed writes, e.g. %s", len(swept), swept[0])
    return swept


def recover(output: Location) -> None:
    """Tidy what earlier runs left, before planning. Call only while holding the run lock, before this run writes
    anything: no other run may be writing manifests under ``output``."""
    recorded = {entry.relative.removesuffix(".parquet") for entry in
                Location(output.url(RUNS_DIR), output.storage_options).list(include=["*.parquet"])}
    for run_id, files in sorted(manifest.list_runs(output).items()):
        if run_id not in recorded:
            _record_unrecorded(output, files)
        if files.parts:
            if not files.committed:
                log.info("run %s was interrupted: committing its manifest (%d parts)", run_id, len(files.parts))
            manifest.commit_run(output, run_id)
    folded = fold(output)
    if folded:
        log.info("folded %d run(s) into the manifest state: %s", len(folded), ", ".join(folded))
    sweep_stale_temps(output)
