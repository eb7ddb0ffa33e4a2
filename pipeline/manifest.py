"""Parquet manifests: one row per input per run, committed after the outputs they describe.

Layout under ``<output.uri>/_manifests/``::

    run=<run_id>/part-<hash>.parquet   one file per written batch (plus one for planner rows), atomically written
    run=<run_id>/_summary.json         counts, throughput and failures by type, written at the end of the run

A part's name is derived from the inputs it describes, so a batch that Ray retries after its part was written
replaces that part instead of duplicating rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import uuid
from collections import Counter
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .storage import Location

MANIFEST_DIR = "_manifests"

_TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("source_uri", pa.string()),
    ("source_key", pa.string()),
    ("source_size", pa.int64()),
    ("source_etag_or_mtime", pa.string()),
    ("output_uri", pa.string()),
    ("output_key", pa.string()),
    ("output_size", pa.int64()),
    ("output_etag_or_mtime", pa.string()),
    ("status", pa.string()),  # ok | failed | skipped
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("out_width", pa.int64()),
    ("out_height", pa.int64()),
    ("source_format", pa.string()),
    ("config_fingerprint", pa.string()),
    ("seed", pa.int64()),
    ("output_sha256", pa.string()),
    ("started_at", _TS),
    ("finished_at", _TS),
    ("seconds", pa.float64()),
    ("worker", pa.string()),  # <node id>/<pid> of the actor that upscaled the input
    ("node_id", pa.string()),
])
COLUMNS = SCHEMA.names


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_run_id() -> str:
    return f"{utcnow():%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:6]}"


def empty_row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(values)
    return row


def to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist([{name: row.get(name) for name in COLUMNS} for row in rows], schema=SCHEMA)


def part_name(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256("\n".join(sorted(row["source_key"] for row in rows)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def write_part(output: Location, run_id: str, rows: list[dict[str, Any]]) -> str | None:
    """Commit one Parquet file with ``rows`` (temp+rename locally, one PUT on object stores)."""
    if not rows:
        return None
    buffer = io.BytesIO()
    pq.write_table(to_table(rows), buffer)
    key = f"{MANIFEST_DIR}/run={run_id}/{part_name(rows)}"
    output.write_atomic(key, buffer.getvalue())
    return output.url(key)


def compact_run(output: Location, run_id: str) -> None:
    """Fold a finished run's per-batch parts into one file, so later planners read one object per run.

    The combined part is committed before the batch parts are deleted: a crash in between leaves some rows
    twice in that run, which planning tolerates (it keeps each source's latest ``ok`` row), never a lost row.
    """
    run = Location(output.url(f"{MANIFEST_DIR}/run={run_id}"), output.storage_options)
    parts = [entry.relative for entry in run.list(include=["part-*.parquet"])]
    if len(parts) <= 1:
        return
    table = pads.dataset([run.path(key) for key in parts], schema=SCHEMA, format="parquet",
                         filesystem=run.fs).to_table()
    combined = write_part(output, run_id, table.to_pylist())
    for key in parts:
        if run.url(key) != combined:
            run.remove(key)


def read_manifests(output: Location, columns: list[str] | None = None, where: pads.Expression | None = None
                   ) -> pa.Table:
    """Committed manifest rows of all runs (temp files are never matched: they are hidden dot-files)."""
    manifests = Location(output.url(MANIFEST_DIR), output.storage_options)
    parts = [entry.relative for entry in manifests.list(include=["**/part-*.parquet"])]
    if not parts:
        return SCHEMA.empty_table().select(columns or COLUMNS)
    dataset = pads.dataset([manifests.path(key) for key in parts], schema=SCHEMA, format="parquet",
                           filesystem=manifests.fs)
    return dataset.to_table(columns=columns, filter=where)


def latest_ok(output: Location) -> dict[str, dict[str, Any]]:
    """For each source key, its most recent ``ok`` row (what the output object should currently hold)."""
    columns = ["source_key", "source_size", "source_etag_or_mtime", "output_key", "output_size",
               "output_etag_or_mtime", "config_fingerprint", "finished_at"]
    latest: dict[str, dict[str, Any]] = {}
    for row in read_manifests(output, columns, where=pads.field("status") == "ok").to_pylist():
        current = latest.get(row["source_key"])
        if current is None or row["finished_at"] > current["finished_at"]:
            latest[row["source_key"]] = row
    return latest


def summarize(rows: list[dict[str, Any]], *, run_id: str, seconds: float, fingerprint: str,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    statuses = Counter(row["status"] for row in rows)
    processed = statuses.get("ok", 0) + statuses.get("failed", 0)
    return {
        "run_id": run_id,
        "config_fingerprint": fingerprint,
        "inputs": len(rows),
        "ok": statuses.get("ok", 0),
        "failed": statuses.get("failed", 0),
        "skipped": statuses.get("skipped", 0),
        "failures_by_type": dict(Counter(row["error_type"] for row in rows if row["status"] == "failed")),
        "seconds": round(seconds, 3),
        "items_per_min": round(processed / seconds * 60, 2) if seconds > 0 else None,
        **(extra or {}),
    }


def write_summary(output: Location, run_id: str, summary: dict[str, Any]) -> str:
    key = f"{MANIFEST_DIR}/run={run_id}/_summary.json"
    output.write_atomic(key, json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
    return output.url(key)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run {summary['run_id']}: {summary['inputs']} inputs — {summary['ok']} ok, {summary['failed']} failed, "
             f"{summary['skipped']} skipped in {summary['seconds']:.1f}s "
             f"({summary['items_per_min'] or 0:.1f} items/min)"]
    for error_type, count in sorted(summary["failures_by_type"].items()):
        lines.append(f"  failed {error_type}: {count}")
    return "\n".join(lines)
