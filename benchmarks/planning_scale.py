"""Planning cost over a large catalog with a long history: does it grow with the catalog or with the runs?

A synthetic catalog of ``--inputs`` photos (default 1,000,000) with ``--runs`` runs of history (default 30): the
first run processed everything, each later one ``--churn`` of the catalog (new or changed inputs). Every run was
folded into the unit state (``pipeline.state``), as runs do when they end. Then a nightly run is planned: every
input is already done, so everything is skipped. Listing is excluded: the input and output listings are built
in memory and handed to the planner. Printed: reading the state (``latest_done``), the whole plan, folding one
more run into the state (what a run pays when it ends) and, for comparison, reading the whole history instead
of the state.

    python benchmarks/planning_scale.py                      # 1M inputs x 30 runs
    python benchmarks/planning_scale.py --inputs 100000      # quicker
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import manifest, plan, state  # noqa: E402
from pipeline.config import validate_config  # noqa: E402
from pipeline.engine import resolve_settings  # noqa: E402
from pipeline.spec import RunSpec  # noqa: E402
from pipeline.storage import Entry, Location  # noqa: E402


def key(i: int) -> str:
    return f"archive/{i // 1000:04d}/photo_{i:07d}.png"


def run_table(run_id: str, ids: range | list[int], version: list[int], fingerprint: str, when: dt.datetime
              ) -> pa.Table:
    """Manifest rows of one run: ``ok`` rows for ``ids`` (source and output identities carry each one's version)."""
    keys = [key(i) for i in ids]
    n = len(keys)
    columns = {
        "run_id": pa.array([run_id] * n), "source_key": pa.array(keys), "unit_key": pa.array(keys),
        "source_uri": pa.array([f"s3://archive/{k}" for k in keys]),
        "output_key": pa.array(keys), "output_uri": pa.array([f"s3://upscaled/{k}" for k in keys]),
        "source_size": pa.array([1000 + i % 977 for i in ids], pa.int64()),
        "source_etag_or_mtime": pa.array([f"src-{i}-{version[i]}" for i in ids]),
        "output_size": pa.array([4000 + i % 977 for i in ids], pa.int64()),
        "output_etag_or_mtime": pa.array([f"out-{i}-{version[i]}" for i in ids]),
        "status": pa.array(["ok"] * n), "unit": pa.array(["image"] * n),
        "config_fingerprint": pa.array([fingerprint] * n), "width": pa.array([640] * n, pa.int64()),
        "height": pa.array([480] * n, pa.int64()), "out_width": pa.array([2560] * n, pa.int64()),
        "out_height": pa.array([1920] * n, pa.int64()), "seconds": pa.array([1.5] * n),
        "output_sha256": pa.array([f"{i:064x}" for i in ids]),
        "started_at": pa.array([when] * n, manifest.SCHEMA.field("started_at").type),
        "finished_at": pa.array([when] * n, manifest.SCHEMA.field("finished_at").type),
    }
    return pa.table({field.name: columns.get(field.name, pa.nulls(n, field.type)) for field in manifest.SCHEMA},
                    schema=manifest.SCHEMA)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(label: str, function, *args):
    """Wall and CPU seconds (the CPU figure is what a shared, overloaded machine distorts least)."""
    started, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    print(f"  {label:<58} {seconds:8.1f} s wall {cpu:8.1f} s CPU", flush=True)
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--churn", type=float, default=0.01, help="share of the catalog each later run redid")
    parser.add_argument("--workdir", default=None, help="where to build the synthetic output (default: a temp dir)")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="planning-scale-"))
    output_uri, input_uri = str(root / "out"), "s3://archive"
    cfg = validate_config({"input": {"uri": input_uri}, "output": {"uri": output_uri, "format": "png"},
                           "model": {"path": "bicubic"}, "upscale": {"scale": 4}, "run": {"lock": {"enabled": False}}})
    spec = RunSpec.resolve(cfg, resolve_settings(cfg), "20990101T000000Z-bench0")
    fingerprint = spec.unit_fingerprint("image", spec.fingerprint)
    output = Location(output_uri, {})

    print(f"building {args.inputs:,} inputs x {args.runs} runs of history under {root} ...", flush=True)
    version = [0] * args.inputs
    churn = max(1, int(args.inputs * args.churn))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    history_rows = 0
    for number in range(args.runs):
        run_id = f"{start + dt.timedelta(days=number):%Y%m%dT%H%M%S}Z-r{number:03d}"
        if number == 0:
            ids = range(args.inputs)
        else:
            ids = sorted({(number * 7919 + j * 104729) % args.inputs for j in range(churn)})
            for i in ids:
                version[i] += 1
        table = run_table(run_id, ids, version, fingerprint, start + dt.timedelta(days=number, hours=1))
        output.write_atomic(f"{manifest.run_dir(run_id)}/{manifest.part_name([{'unit_key': run_id}])}",
                            manifest.table_bytes(table))
        history_rows += table.num_rows
        state.fold(output)
    inputs = [Entry(key(i), 1000 + i % 977, f"src-{i}-{version[i]}") for i in range(args.inputs)]
    existing = [Entry(key(i), 4000 + i % 977, f"out-{i}-{version[i]}") for i in range(args.inputs)]
    state_bytes = os.path.getsize(output.path(state.STATE_KEY))
    print(f"history: {history_rows:,} rows in {args.runs} run files; state: {args.inputs:,} rows, "
          f"{state_bytes / 2**20:.0f} MiB", flush=True)

    real_list = Location.list

    def listing(self, include=None, exclude=None):  # listing excluded: the catalog and outputs come from memory
        if self.uri == input_uri:
            return inputs
        if self.uri == output_uri and exclude == [f"{manifest.MANIFEST_DIR}/**"]:
            return existing
        return real_list(self, include, exclude)

    print("planning a nightly run (everything already done):")
    with mock.patch.object(Location, "list", listing):
        _, read_s = timed("read the unit state (state.latest_done)", state.latest_done, output)
        result, plan_s = timed("plan: state + diff of every input (plan.make_plan)", plan.make_plan, cfg, spec)
    assert len(result.skipped) == args.inputs and not result.todo, (len(result.skipped), len(result.todo))

    run_id = "20990101T000000Z-bench1"
    output.write_atomic(f"{manifest.run_dir(run_id)}/part-bench.parquet",
                        manifest.table_bytes(run_table(run_id, range(churn), [99] * churn, fingerprint,
                                                       dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc))))
    _, fold_s = timed(f"a run's end: fold its {churn:,} rows into the state", state.fold, output)
    os.remove(output.path(state.STATE_KEY))
    _, history_s = timed(f"for comparison, no state: read all {args.runs + 1} runs' rows", state.latest_done, output)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"planning {args.inputs:,} inputs with {args.runs} runs of history: {plan_s:.1f} s "
          f"(state read {read_s:.1f} s); fold at a run's end {fold_s:.1f} s; without the state {history_s:.1f} s "
          f"to read the history alone; peak RSS {peak:.1f} GiB")
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
