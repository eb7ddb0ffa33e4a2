"""Parquet manifests: one row per unit of work per run, committed after the outputs they describe.

Units of work (``unit``): an ``image``; a ``segment`` of a clip (a frame range: its upscaled frames are
``staged`` — a segment file under the output's staging prefix, or a sequence's frame files); and the clip
itself, a ``video`` or a frame ``sequence``, whose row is committed once its assembled output is. Every
row has a ``unit_key``: the source key for images and clips, ``<source key>#<first frame>-<end frame>`` for
segments, so a clip's one ``ok`` row is the only ``ok`` row with its ``source_key``.

Layout under ``<output.uri>/_manifests/``::

    run=<run_id>/part-<hash>.parquet   one file per written batch (plus one for planner rows), atomically written
    run=<run_id>/_summary.json         counts, throughput and failures by type, written at the end of the run

A part's name is derived from the units of work it describes, so a batch that Ray retries after its part was written
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
    ("status", pa.string()),  # ok | failed | skipped | staged (a segment whose frames await assembly)
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
    ("unit", pa.string()),  # image | segment | video | sequence
    ("unit_key", pa.string()),
    ("frame_start", pa.int64()),  # segments: the frame range [frame_start, frame_stop) of their clip
    ("frame_stop", pa.int64()),
    ("frames_in", pa.int64()),
    ("frames_out", pa.int64()),
    ("duration_in", pa.float64()),  # seconds
    ("duration_out", pa.float64()),
    ("streams_copied", pa.string()),  # e.g. "audio:aac,subtitle:ass", copied packet for packet
    ("codec", pa.string()),
    ("flicker", pa.float64()),  # mean |frame_t - frame_t-1| of the output / the same of the bicubic input
    ("flicker_pairs", pa.int64()),  # consecutive frame pairs behind `flicker`
    ("reference_motion", pa.float64()),  # the bicubic input's mean |frame_t - frame_t-1| (the denominator)
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


def unit_key(row: dict[str, Any]) -> str:
    """The row's unit of work (manifests written before units existed keyed images by source)."""
    return row.get("unit_key") or row["source_key"]


def part_name(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256("\n".join(sorted(unit_key(row) for row in rows)).encode()).hexdigest()[:20]
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


def latest_done(output: Location) -> dict[str, dict[str, Any]]:
    """For each unit of work, its most recent ``ok`` or ``staged`` row (what its output should currently hold)."""
    columns = ["source_key", "unit_key", "source_size", "source_etag_or_mtime", "output_key", "output_size",
               "output_etag_or_mtime", "config_fingerprint", "finished_at", "status",
               # what finishing a clip needs of segments staged by earlier runs
               "width", "height", "out_width", "out_height", "frames_out", "flicker", "flicker_pairs",
               "reference_motion"]
    latest: dict[str, dict[str, Any]] = {}
    done = pads.field("status").isin(["ok", "staged"])
    for row in read_manifests(output, columns, where=done).to_pylist():
        key = unit_key(row)
        current = latest.get(key)
        if current is None or row["finished_at"] > current["finished_at"]:
            latest[key] = row
    return latest


def summarize(rows: list[dict[str, Any]], *, run_id: str, seconds: float, fingerprint: str,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts per input (photos, videos, sequences); segments, the clips' units of work, are counted apart."""
    inputs = [row for row in rows if row.get("unit") != "segment"]
    segments = Counter(row["status"] for row in rows if row.get("unit") == "segment")
    statuses = Counter(row["status"] for row in inputs)
    processed = statuses.get("ok", 0) + statuses.get("failed", 0)
    return {
        "run_id": run_id,
        "config_fingerprint": fingerprint,
        "inputs": len(inputs),
        "ok": statuses.get("ok", 0),
        "failed": statuses.get("failed", 0),
        "skipped": statuses.get("skipped", 0),
        "segments": {"staged": segments.get("staged", 0), "failed": segments.get("failed", 0)},
        "failures_by_type": dict(Counter(row["error_type"] for row in inputs if row["status"] == "failed")),
        "seconds": round(seconds, 3),
        "items_per_min": round(processed / seconds * 60, 2) if seconds > 0 else None,
        "frames_per_min": round(sum(row.get("frames_out") or 0 for row in inputs if row["status"] == "ok")
                                / seconds * 60, 2) if seconds > 0 else None,
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
