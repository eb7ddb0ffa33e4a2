"""Parquet manifests: one row per unit of work per run, committed after the outputs they describe.

Units of work (``unit``): an ``image``; a ``segment`` of a clip (a frame range: its upscaled frames are
``staged`` — a segment file under the output's staging prefix, or a sequence's frame files); and the clip
itself, a ``video`` or a frame ``sequence``, whose row is committed once its assembled output is. Every
row has a ``unit_key``: the source key for images and clips, ``<source key>#<first frame>-<end frame>`` for
segments, so a clip's one ``ok`` row is the only ``ok`` row with its ``source_key``. Inputs a run skips (already
done) get no row: they are counted in its summary.

Layout under ``<output.uri>/_manifests/``::

    run=<id>/part-<hash>.parquet         the run's rows, one file, committed when the run ends (or, for a run
                                         that was killed, by the next run): what ``_manifests/*/*.parquet`` reads
    run=<id>/parts/part-<hash>.parquet   one file per written batch while the run lives (removed once the run's
                                         file is committed); a part's name comes from the units it holds, so a
                                         batch Ray redoes replaces its part instead of adding rows
    run=<id>/_summary.json               counts, throughput, failures by type (and _report.html, pipeline.report)
    _index/units/latest.parquet          latest ok/staged row per unit of work over all folded runs (pipeline.state)
    _index/runs/<id>.parquet             one row per run (pipeline.state)

Why two levels: a run's rows become visible to ``read_parquet('<output>/_manifests/*/*.parquet')`` in one atomic
write of one file, so no kill can leave that glob showing a row twice (batch parts and the file that folds them
never sit at the same depth) or a run partly. Everything else lives deeper than that glob reaches.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import signal
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .storage import Location, with_retries

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
    ("processing", pa.string()),  # videos: what was done besides upscaling (deinterlacing, timestamps rebased)
    ("movie_key", pa.string()),  # sequences with video.sequence_fps: the movie made of their frames
    ("prompt", pa.string()),  # the exact text the model was prompted with (DiT4SR: added_prompt appended)
    ("caption", pa.string()),  # upscale.caption: the input's (or clip's) caption, filtered, before added_prompt
    ("caption_model", pa.string()),  # upscale.caption.model that wrote it
    ("caption_fingerprint", pa.string()),  # hash of the caption settings: a caption is reused while it matches
    ("caption_run_id", pa.string()),  # the run that generated the caption (earlier runs' are reused, not redone)
])
COLUMNS = SCHEMA.names


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_run_id() -> str:
    """Sorts in start order: runs on one output are serialised by its lease, so milliseconds never tie."""
    now = utcnow()
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{uuid.uuid4().hex[:6]}"


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


PARTS_DIR = "parts"
KILL_AT_ENV = "DIT4SR_TEST_KILL_AT"


def kill_point(name: str, done: int = 0) -> None:
    """Test-only fault hook: ``DIT4SR_TEST_KILL_AT=<name>[:<n>]`` SIGKILLs the process group
    ``DIT4SR_TEST_KILL_PGID`` (the job driver's and its local Ray's: the test runs the job in a session of its own
    and names it; Ray workers inherit both variables) and this process at ``name``, once ``done`` >= n (other Ray
    workers, each in a group of its own, die with their raylet). Without the variable it does nothing.
    Points: ``after_output_write`` (a batch's outputs are written, its manifest part not yet; ``done`` = parts the
    run has committed) and ``inside_compaction`` (the run's file is committed, one of its parts deleted). The
    point's name is written to ``DIT4SR_TEST_KILL_MARKER`` first, if set, so a test can tell its kill from others."""
    point, _, count = os.environ.get(KILL_AT_ENV, "").partition(":")
    if point == name and done >= int(count or 0):
        if os.environ.get("DIT4SR_TEST_KILL_MARKER"):
            with open(os.environ["DIT4SR_TEST_KILL_MARKER"], "w") as marker:
                marker.write(name)
        os.killpg(int(os.environ["DIT4SR_TEST_KILL_PGID"]), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)  # a Ray worker: in a process group of its own


def run_dir(run_id: str) -> str:
    return f"{MANIFEST_DIR}/run={run_id}"


def table_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_part(output: Location, run_id: str, rows: list[dict[str, Any]]) -> str | None:
    """Commit one batch's rows as a Parquet file under the run's ``parts/`` (temp+rename locally, one PUT on
    object stores)."""
    if not rows:
        return None
    data = table_bytes(to_table(rows))
    parts, name = f"{run_dir(run_id)}/{PARTS_DIR}", part_name(rows)
    if os.environ.get(KILL_AT_ENV) and any(row["status"] in ("ok", "staged") for row in rows):
        committed = {entry.relative for entry in Location(output.url(parts), output.storage_options).list(
            include=["part-*.parquet"])}
        if name not in committed:  # not a batch Ray redoes after its part was committed
            kill_point("after_output_write", len(committed))
    key = f"{parts}/{name}"
    output.write_atomic(key, data)
    return output.url(key)


@dataclass
class RunFiles:
    """One run's manifest files as listed: its committed file (if any) and its batch parts."""

    run_id: str
    committed: list[str] = field(default_factory=list)  # keys under _manifests/
    parts: list[str] = field(default_factory=list)

    @property
    def rows_from(self) -> list[str]:
        """Where the run's rows are: the committed file holds them all once it exists."""
        return self.committed or self.parts


def list_runs(output: Location) -> dict[str, RunFiles]:
    """Every run's manifest files, by run id (one listing of ``_manifests/``)."""
    manifests = Location(output.url(MANIFEST_DIR), output.storage_options)
    runs: dict[str, RunFiles] = {}
    for entry in manifests.list(include=["run=*/part-*.parquet", f"run=*/{PARTS_DIR}/part-*.parquet"]):
        folder, _, rest = entry.relative.partition("/")
        files = runs.setdefault(folder[len("run="):], RunFiles(folder[len("run="):]))
        (files.parts if rest.startswith(f"{PARTS_DIR}/") else files.committed).append(entry.relative)
    return runs


def read_files(output: Location, keys: list[str], columns: list[str] | None = None,
               where: pads.Expression | None = None) -> pa.Table:
    """Rows of the given manifest files (keys under ``_manifests/``)."""
    if not keys:
        return SCHEMA.empty_table().select(columns or COLUMNS)
    manifests = Location(output.url(MANIFEST_DIR), output.storage_options)
    # pyarrow reads through fsspec without our retry layer: a throttled read is retried as a whole.
    return with_retries(lambda: pads.dataset([manifests.path(key) for key in keys], schema=SCHEMA,
                                             format="parquet", filesystem=manifests.fs
                                             ).to_table(columns=columns, filter=where))


COMMIT_ROWS_PER_GROUP = 65_536  # rows per row group of a run's committed file (its parts hold one batch each)


def _committed_name(parts: list[str]) -> str:
    """The run's file, named after its parts (each named after its units): the same parts, the same name."""
    digest = hashlib.sha256("\n".join(sorted(key.rsplit("/", 1)[-1] for key in parts)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def iter_batches(output: Location, keys: list[str], columns: list[str] | None = None,
                 where: pads.Expression | None = None) -> Iterator[pa.RecordBatch]:
    """Rows of the given manifest files (keys under ``_manifests/``), a batch at a time: memory follows the batch,
    not the files."""
    if not keys:
        return
    manifests = Location(output.url(MANIFEST_DIR), output.storage_options)
    dataset = pads.dataset([manifests.path(key) for key in keys], schema=SCHEMA, format="parquet",
                           filesystem=manifests.fs)
    yield from dataset.to_batches(columns=columns, filter=where, batch_size=COMMIT_ROWS_PER_GROUP)


def commit_run(output: Location, run_id: str) -> None:
    """Make a run's rows visible: fold its batch parts into ``run=<id>/part-<hash>.parquet``, then delete them.

    The file is streamed from the parts into a local temp file (memory: one row group) and committed atomically.
    Crash-safe at every step: before the run's file is committed, readers of ``_manifests/*/*.parquet`` see none of
    the run's rows, afterwards all of them (its parts lie one level deeper, where that glob does not reach); and
    once the file exists it is never rewritten from whatever parts are left — a commit interrupted while deleting
    them is finished by deleting the rest (``pipeline.state.recover``).
    """
    files = list_runs(output).get(run_id)
    if files is None or not files.parts:
        return
    if not files.committed:
        key = f"{run_dir(run_id)}/{_committed_name(files.parts)}"
        temp = output.temp_path(key)

        def write() -> None:  # pyarrow reads through fsspec without our retry layer: a throttled read redoes it all
            with pq.ParquetWriter(temp, SCHEMA) as writer:
                for batch in iter_batches(output, files.parts):
                    writer.write_batch(batch)

        try:
            with_retries(write)
            output.commit_file(key, temp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
    for number, key in enumerate(files.parts):
        with contextlib.suppress(FileNotFoundError):
            output.remove(f"{MANIFEST_DIR}/{key}")
        if number == 0:
            kill_point("inside_compaction")
    if output.is_local:  # object stores have no folders; a local one would stay behind empty
        with contextlib.suppress(OSError):
            os.rmdir(output.path(f"{run_dir(run_id)}/{PARTS_DIR}"))


def read_manifests(output: Location, columns: list[str] | None = None, where: pads.Expression | None = None
                   ) -> pa.Table:
    """Every run's rows, each exactly once: a run's committed file, or its batch parts while it has none."""
    keys = [key for files in list_runs(output).values() for key in files.rows_from]
    return read_files(output, keys, columns, where)


@dataclass
class Tally:
    """A run's rows counted (per unit kind, status and error type), with its frames and its time span: what its
    summary needs, built from rows or streamed from its manifest files."""

    counts: Counter = field(default_factory=Counter)  # (is segment, status, error type) -> rows
    frames_ok: int = 0  # frames_out of ok inputs
    captions: Counter = field(default_factory=Counter)  # inputs' caption_run_id -> inputs (upscale.caption)
    started: dt.datetime | None = None
    finished: dt.datetime | None = None

    def add(self, table: pa.Table | pa.RecordBatch) -> None:
        if not table.num_rows:
            return
        table = pa.table({"segment": pc.fill_null(pc.equal(table["unit"], "segment"), False),
                          "status": table["status"], "error_type": table["error_type"],
                          "frames": pc.if_else(pc.and_(pc.not_equal(table["unit"], "segment").fill_null(True),
                                                       pc.equal(table["status"], "ok").fill_null(False)),
                                               pc.fill_null(table["frames_out"], 0), 0),
                          "caption_run_id": table["caption_run_id"]})
        grouped = table.group_by(["segment", "status", "error_type"], use_threads=False).aggregate(
            [("status", "count", pc.CountOptions(mode="all")), ("frames", "sum")])
        for row in grouped.to_pylist():
            self.counts[(row["segment"], row["status"], row["error_type"])] += row["status_count"]
            self.frames_ok += row["frames_sum"] or 0
        inputs = table.filter(pc.invert(table["segment"]))
        if inputs.num_rows and inputs["caption_run_id"].null_count < inputs.num_rows:
            for row in inputs.group_by("caption_run_id").aggregate([("status", "count")]).to_pylist():
                if row["caption_run_id"] is not None:
                    self.captions[row["caption_run_id"]] += row["status_count"]

    def add_times(self, table: pa.Table | pa.RecordBatch) -> None:
        started, finished = pc.min(table["started_at"]).as_py(), pc.max(table["finished_at"]).as_py()
        if started is not None:
            self.started = started if self.started is None else min(self.started, started)
        if finished is not None:
            self.finished = finished if self.finished is None else max(self.finished, finished)

    @classmethod
    def of_rows(cls, rows: list[dict[str, Any]]) -> "Tally":
        tally = cls()
        tally.add(to_table(rows))
        return tally

    @classmethod
    def of_files(cls, output: Location, keys: list[str]) -> "Tally":
        tally = cls()
        for batch in iter_batches(output, keys, ["unit", "status", "error_type", "frames_out", "started_at",
                                                 "finished_at", "caption_run_id"]):
            tally.add(batch)
            tally.add_times(batch)
        return tally


def summarize(rows: list[dict[str, Any]] | Tally, *, run_id: str, seconds: float, fingerprint: str,
              skipped: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts per input (photos, videos, sequences); segments, the clips' units of work, are counted apart.
    ``rows``: the run's rows or their ``Tally``; ``skipped``: inputs already done, which have no rows."""
    tally = rows if isinstance(rows, Tally) else Tally.of_rows(rows)
    statuses, segments, failures = Counter(), Counter(), Counter()
    for (segment, status, error_type), number in tally.counts.items():
        (segments if segment else statuses)[status] += number
        if not segment and status == "failed":
            failures[error_type] += number
    processed = statuses.get("ok", 0) + statuses.get("failed", 0)
    # upscale.caption: captions this run generated, and those it took from earlier runs (the unit state)
    captioned = sum(tally.captions.values())
    captions = {"captions": {"generated": tally.captions[run_id], "reused": captioned - tally.captions[run_id]}}
    return {
        "run_id": run_id,
        "config_fingerprint": fingerprint,
        "inputs": processed + skipped,
        "ok": statuses.get("ok", 0),
        "failed": statuses.get("failed", 0),
        "skipped": skipped,
        "segments": {"staged": segments.get("staged", 0), "failed": segments.get("failed", 0)},
        "failures_by_type": dict(failures),
        "seconds": round(seconds, 3),
        "items_per_min": round(processed / seconds * 60, 2) if seconds > 0 else None,
        "frames_per_min": round(tally.frames_ok / seconds * 60, 2) if seconds > 0 else None,
        **(captions if captioned else {}),
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
    if "captions" in summary:
        lines.append(f"  captions: {summary['captions']['generated']} generated, {summary['captions']['reused']} "
                     "reused from earlier runs")
    return "\n".join(lines)
