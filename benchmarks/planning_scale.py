"""Planning and bookkeeping at catalog scale: does the driver's memory follow the catalog, the runs, or what is in
flight?

Planning (default): a synthetic catalog of ``--inputs`` photos (default 1,000,000) with ``--runs`` runs of history
(default 30): the first run processed everything, each later one ``--churn`` of the catalog (new or changed inputs),
every run folded into the unit state (``pipeline.state``), as runs do when they end. Then a nightly run is planned
on a local Ray (``pipeline.plan.make_plan``, Ray already up): every input is done, so everything is skipped. The
inputs come from a synthetic S3 Inventory report (``--inventory``: Parquet data files and a manifest.json, as S3
writes them, read by the planning tasks) or from a synthetic listing; the output listing is synthetic too (blocks of
entries read by tasks, as the parallel listing makes them): no store holds 10 M objects here. Then one more run is
folded into the state (what every run pays when it ends). The history is built by a child process, so the driver
measured here only plans and folds.

Processing (``--process N``): a real catalog job (``pipeline.run.run_job`` in this process, local Ray, bicubic
engine) over N tiny PNGs; the driver's RSS is read when 10 % of the units and when all of them have been
processed.

Printed: wall times, the driver's peak RSS (``getrusage``: the whole life of this process) and the peak of the Ray
session's summed RSS (this process and all its children, sampled every 0.2 s; object-store pages shared by several
processes count once per process). The last two lines are ``plan_seconds=`` and ``driver_peak_rss_gib=``.

    python benchmarks/planning_scale.py                                  # 1M inputs x 30 runs, listed
    python benchmarks/planning_scale.py --inputs 10000000 --inventory    # 10M from an inventory
    python benchmarks/planning_scale.py --process 100000                 # driver RSS over a 100k-unit run
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import listing, manifest, plan, state  # noqa: E402
from pipeline.config import validate_config  # noqa: E402
from pipeline.spec import RunSpec  # noqa: E402
from pipeline.storage import Location  # noqa: E402

CHUNK = 1_000_000  # rows per synthetic file (inventory data file, listing block, run-file row group)
INPUT_URI = "s3://archive"
GIB = 2**30


def key(i: int) -> str:
    return f"archive/{i // 1000:05d}/photo_{i:08d}.png"


def config(root: Path, inventory: str | None = None):
    return validate_config({"input": {"uri": INPUT_URI, **({"inventory": inventory} if inventory else {})},
                            "output": {"uri": str(root / "out"), "format": "png"}, "model": {"path": "bicubic"},
                            "upscale": {"scale": 4}, "run": {"lock": {"enabled": False}}})


# -- the synthetic history (a child process) ----------------------------------------------------------------------
def run_table(run_id: str, ids: np.ndarray, version: np.ndarray, fingerprint: str, when: dt.datetime) -> pa.Table:
    """Manifest rows of one run: ``ok`` rows for ``ids`` (source and output identities carry each one's version)."""
    keys = [key(i) for i in ids.tolist()]
    versions = version[ids].tolist()
    n = len(keys)
    columns = {
        "run_id": pa.array([run_id] * n), "source_key": pa.array(keys), "unit_key": pa.array(keys),
        "source_uri": pa.array([f"{INPUT_URI}/{k}" for k in keys]),
        "output_key": pa.array(keys), "output_uri": pa.array([f"s3://upscaled/{k}" for k in keys]),
        "source_size": pa.array(1000 + ids % 977, pa.int64()),
        "source_etag_or_mtime": pa.array([f"src-{i}-{v}" for i, v in zip(ids.tolist(), versions)]),
        "output_size": pa.array(4000 + ids % 977, pa.int64()),
        "output_etag_or_mtime": pa.array([f"out-{i}-{v}" for i, v in zip(ids.tolist(), versions)]),
        "status": pa.array(["ok"] * n), "unit": pa.array(["image"] * n),
        "config_fingerprint": pa.array([fingerprint] * n), "width": pa.array([640] * n, pa.int64()),
        "height": pa.array([480] * n, pa.int64()), "out_width": pa.array([2560] * n, pa.int64()),
        "out_height": pa.array([1920] * n, pa.int64()), "seconds": pa.array([1.5] * n),
        "output_sha256": pa.array([f"{i:064x}" for i in ids.tolist()]),
        "started_at": pa.array([when] * n, manifest.SCHEMA.field("started_at").type),
        "finished_at": pa.array([when] * n, manifest.SCHEMA.field("finished_at").type),
    }
    return pa.table({field.name: columns.get(field.name, pa.nulls(n, field.type)) for field in manifest.SCHEMA},
                    schema=manifest.SCHEMA)


def entries(ids: np.ndarray, version: np.ndarray, kind: str) -> pa.Table:
    base, prefix = (1000, "src") if kind == "src" else (4000, "out")
    return pa.table({"relative": [key(i) for i in ids.tolist()], "size": pa.array(base + ids % 977, pa.int64()),
                     "identity": [f"{prefix}-{i}-{v}" for i, v in zip(ids.tolist(), version[ids].tolist())]},
                    schema=listing.ENTRY_SCHEMA)


def run_id_of(number: int, start: dt.datetime) -> str:
    return f"{start + dt.timedelta(days=number):%Y%m%dT%H%M%S}Z-r{number:03d}"


def build(root: Path, inputs: int, runs: int, churn_share: float) -> None:
    """The output folder after ``runs`` runs (their files, the folded state), the synthetic output listing, and the
    inputs as an S3 Inventory report and as a listing."""
    cfg = config(root)
    spec = RunSpec.resolve(cfg, "20990101T000000Z-bench0")
    fingerprint = spec.unit_fingerprint("image", spec.fingerprint)
    output = Location(str(root / "out"), {})
    churn = max(1, int(inputs * churn_share))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    version, last_run = np.zeros(inputs, np.int64), np.zeros(inputs, np.int64)
    history = 0
    for number in range(runs):
        run_id = run_id_of(number, start)
        when = start + dt.timedelta(days=number, hours=1)
        path = Path(output.path(f"{manifest.run_dir(run_id)}/part-{number:04d}.parquet"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if number == 0:
            chunks = [np.arange(low, min(low + CHUNK, inputs)) for low in range(0, inputs, CHUNK)]
        else:
            ids = np.unique((number * 7919 + np.arange(churn, dtype=np.int64) * 104729) % inputs)
            version[ids] += 1
            last_run[ids] = number
            chunks = [ids]
        with pq.ParquetWriter(path, manifest.SCHEMA) as writer:
            for ids in chunks:
                writer.write_table(run_table(run_id, ids, version, fingerprint, when))
                history += len(ids)
    # The state as folding every run leaves it: each unit's latest row, all runs folded.
    folded = json.dumps([run_id_of(number, start) for number in range(runs)]).encode()
    state_path = Path(output.path(state.STATE_KEY))
    state_path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(state_path, manifest.SCHEMA.with_metadata({b"dit4sr.folded_runs": folded})) as writer:
        for low in range(0, inputs, CHUNK):
            ids = np.arange(low, min(low + CHUNK, inputs))
            for number in np.unique(last_run[ids]):
                chosen = ids[last_run[ids] == number]
                writer.write_table(run_table(run_id_of(int(number), start), chosen, version, fingerprint,
                                             start + dt.timedelta(days=int(number), hours=1)),
                                   row_group_size=state.STATE_ROW_GROUP)
    # Inputs: an S3 Inventory report (Parquet) and the same as listing blocks; outputs: listing blocks.
    config_root = root / "inventory" / "archive" / "nightly"
    (config_root / "data").mkdir(parents=True, exist_ok=True)
    (root / "listing").mkdir(exist_ok=True)
    files = []
    for number, low in enumerate(range(0, inputs, CHUNK)):
        ids = np.arange(low, min(low + CHUNK, inputs))
        source = entries(ids, version, "src")
        report = pa.table({"bucket": ["archive"] * len(ids), "key": source["relative"], "size": source["size"],
                           "last_modified_date": pa.array([1764633600000] * len(ids), pa.timestamp("ms", "UTC")),
                           "e_tag": source["identity"], "storage_class": ["STANDARD"] * len(ids)})
        data_key = f"archive/nightly/data/{number:04d}.parquet"
        pq.write_table(report, config_root / "data" / f"{number:04d}.parquet")
        files.append({"key": data_key, "size": (config_root / "data" / f"{number:04d}.parquet").stat().st_size,
                      "MD5checksum": "0" * 32})
        pq.write_table(source, root / "listing" / f"inputs-{number:04d}.parquet")
        pq.write_table(entries(ids, version, "out"), root / "listing" / f"outputs-{number:04d}.parquet")
    (config_root / "2026-12-01T01-00Z").mkdir(exist_ok=True)
    (config_root / "2026-12-01T01-00Z" / "manifest.json").write_text(json.dumps({
        "sourceBucket": "archive", "destinationBucket": "arn:aws:s3:::inventory", "version": "2016-11-30",
        "creationTimestamp": "1764550800000", "fileFormat": "Parquet",
        "fileSchema": "message s3.inventory { required binary bucket (STRING); required binary key (STRING); "
                      "optional int64 size; optional int64 last_modified_date (TIMESTAMP(MILLIS,true)); "
                      "optional binary e_tag (STRING); optional binary storage_class (STRING);}",
        "files": files}))
    (root / "built.json").write_text(json.dumps({"inputs": inputs, "runs": runs, "churn": churn_share,
                                                 "history_rows": history}))


# -- measuring ---------------------------------------------------------------------------------------------------
def _memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a process in bytes (Linux /proc), zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if line.startswith(("VmRSS", "Rss")))
        return {name: int(value.split()[0]) * 1024 for name, value in fields.items()}
    except (OSError, ValueError):  # gone meanwhile
        return {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): Ray's raylet, GCS, workers, ... started by this driver."""
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                with open(f"/proc/{parent}/task/{thread}/children") as handle:
                    children = [int(child) for child in handle.read().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


class RssSampler:
    """Peak RSS of this process (all of it, and its own pages without the object store's that it maps when it reads
    an object) and peak memory of the whole Ray session (this process and its children), sampled."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.driver, self.driver_own, self.session = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        """The driver's RSS now. The session's memory: every process's own (anonymous) pages, plus the object
        store's shared pages once (each process that reads an object maps them: summing RSS would count them
        once per reader)."""
        mine = _memory(os.getpid())
        driver = mine.get("VmRSS", 0)
        others = [mine] + [_memory(pid) for pid in _descendants(os.getpid())]
        total = sum(m.get("RssAnon", 0) for m in others) + max(m.get("RssShmem", 0) for m in others)
        self.driver, self.session = max(self.driver, driver), max(self.session, total)
        self.driver_own = max(self.driver_own, mine.get("RssAnon", 0) + mine.get("RssFile", 0))
        return driver

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def driver_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss: KiB on Linux


def timed(label: str, function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - started
    print(f"  {label:<62} {seconds:8.1f} s wall", flush=True)
    return result, seconds


def _read_entries(path: str) -> pa.Table:
    return pq.read_table(path)


def start_ray(cpus: int) -> None:
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def plan_catalog(args: argparse.Namespace, root: Path) -> None:
    built = root / "built.json"
    wanted = {"inputs": args.inputs, "runs": args.runs, "churn": args.churn}
    if not built.exists() or {k: json.loads(built.read_text()).get(k) for k in wanted} != wanted:
        print(f"building {args.inputs:,} inputs x {args.runs} runs of history under {root} (child process) ...",
              flush=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-only", "--workdir", str(root), "--inputs",
                        str(args.inputs), "--runs", str(args.runs), "--churn", str(args.churn)], check=True)
        print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
    facts = json.loads(built.read_text())
    state_bytes = (root / "out" / state.STATE_KEY).stat().st_size
    print(f"history: {facts['history_rows']:,} rows in {args.runs} run files; state: {args.inputs:,} rows, "
          f"{state_bytes / 2**20:.0f} MiB", flush=True)

    import ray

    start_ray(args.cpus)
    inventory = str(root / "inventory" / "archive" / "nightly") if args.inventory else None
    cfg = config(root, inventory)
    spec = RunSpec.resolve(cfg, "20990101T000000Z-bench1")
    output_uri = cfg.output.uri
    real_list_blocks = listing.list_blocks
    read = ray.remote(_read_entries).options(num_cpus=listing.LIST_TASK_CPUS)

    def synthetic_listing(location, include=None, exclude=None, *, in_tasks, case_sensitive=True):
        """The synthetic listing's blocks, read by tasks as the parallel listing's would be made."""
        kind = {INPUT_URI: "inputs", output_uri: "outputs"}.get(location.uri)
        if kind is None:
            return real_list_blocks(location, include, exclude, in_tasks=in_tasks, case_sensitive=case_sensitive)
        return [read.remote(str(path)) for path in sorted((root / "listing").glob(f"{kind}-*.parquet"))]

    source = "an S3 Inventory report (Parquet)" if args.inventory else "a listing"
    print(f"planning a nightly run (everything already done; inputs from {source}; {args.cpus} Ray CPUs):",
          flush=True)
    state_file = root / "out" / state.STATE_KEY
    with RssSampler() as rss, mock.patch.object(listing, "list_blocks", synthetic_listing):
        result, plan_s = timed("plan (plan.make_plan), cold: each Ray worker's first task imports the pipeline",
                               plan.make_plan, spec)
        assert len(result.skipped) == args.inputs and not result.todo and not result.rejected, \
            (len(result.skipped), len(result.todo), len(result.rejected))
        del result
        planning_peaks = rss.driver, rss.driver_own
        warm_s = None
        if args.warm:
            result, warm_s = timed("plan again, warm workers", plan.make_plan, spec)
            del result
        churn = max(1, int(args.inputs * args.churn))
        run_id = "20990101T000000Z-bench1"
        run_folder = Path(cfg.output.uri, manifest.run_dir(run_id))
        run_folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(run_table(run_id, np.arange(churn), np.full(args.inputs, 99),
                                 spec.unit_fingerprint("image", spec.fingerprint),
                                 dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc)), run_folder / "part-bench.parquet")
        fold_s = None
        if not args.skip_fold:
            shutil.copy(state_file, root / "state-before-fold.parquet")  # the history stays as built, for re-runs
            try:
                _, fold_s = timed(f"a run's end: fold its {churn:,} rows into the state (state.fold)", state.fold,
                                  Location(cfg.output.uri, {}))
            finally:
                shutil.move(root / "state-before-fold.parquet", state_file)
        shutil.rmtree(run_folder)
    ray.shutdown()
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    warm = f" ({warm_s:.1f} s with warm workers)" if warm_s is not None else ""
    fold = f"; fold {fold_s:.1f} s" if fold_s is not None else ""
    print(f"planning {args.inputs:,} inputs from {source} with {args.runs} runs of history: {plan_s:.1f} s{warm}"
          f"{fold}; peak memory: driver RSS {rss.driver / GIB:.2f} GiB (sampled; planning alone "
          f"{planning_peaks[0] / GIB:.2f}), its own pages without the object store's it maps "
          f"{rss.driver_own / GIB:.2f} GiB (planning alone {planning_peaks[1] / GIB:.2f}), Ray session (every "
          f"process's own pages + the object store's once) {rss.session / GIB:.2f} GiB")
    print(f"plan_seconds={plan_s:.1f}")
    print(f"driver_peak_rss_gib={driver_peak_gib():.2f}")


def process_catalog(args: argparse.Namespace, root: Path) -> None:
    """A real run over ``--process`` tiny photos; the driver's RSS at 10 % and at 100 % of the units."""
    from PIL import Image

    from pipeline import run

    count = args.process
    source = root / "process-in"
    if not (source / "ready").exists():
        print(f"writing {count:,} tiny PNGs under {source} ...", flush=True)
        variants = []
        for seed in range(16):
            buffer = io.BytesIO()
            Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 8, 3), np.uint8)).save(buffer, "PNG")
            variants.append(buffer.getvalue())
        for i in range(count):
            folder = source / f"{i // 1000:04d}"
            if i % 1000 == 0:
                folder.mkdir(parents=True, exist_ok=True)
            (folder / f"p{i:07d}.png").write_bytes(variants[i % 16])
        (source / "ready").write_text("")
    shutil.rmtree(root / "process-out", ignore_errors=True)
    cfg = validate_config({"input": {"uri": str(source), "exclude": ["ready"]},
                           "output": {"uri": str(root / "process-out"), "format": "png"},
                           "model": {"path": "bicubic"}, "upscale": {"scale": 2},
                           # as the embedded default: one actor, the other CPUs for the read and write tasks (actors
                           # holding every CPU would leave none for the stream's first task: the run would wait forever)
                           "compute": {"actors": {"min": 1, "max": 1}, "batch_size": args.batch_size,
                                       "cpus_per_actor": 1},
                           "run": {"progress_interval_s": 60, "lock": {"enabled": False}}})
    start_ray(args.cpus)
    checkpoints = {count // 10: None, count: None}
    real_add = run.Progress.add

    def add(progress, rows):
        real_add(progress, rows)
        done = progress.ok + progress.failed
        for mark in checkpoints:
            if checkpoints[mark] is None and done >= mark:
                checkpoints[mark] = (done, rss.sample())

    with RssSampler() as rss, mock.patch.object(run.Progress, "add", add):
        code, wall = timed(f"the catalog job over {count:,} tiny photos (bicubic, batch {args.batch_size})",
                           run.run_job, cfg)
    assert code == 0, code
    import ray

    ray.shutdown()
    (low_done, low), (high_done, high) = checkpoints[count // 10], checkpoints[count]
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{count:,} units in {wall:.0f} s ({count / wall:.0f} units/s); driver RSS {low / GIB:.3f} GiB after "
          f"{low_done:,} units, {high / GIB:.3f} GiB after {high_done:,} units ({(high / low - 1) * 100:+.1f} %); "
          f"peak RSS: driver {rss.driver / GIB:.2f} GiB, Ray session {rss.session / GIB:.2f} GiB")
    print(f"driver_rss_gib_at_{low_done}={low / GIB:.3f}")
    print(f"driver_rss_gib_at_{high_done}={high / GIB:.3f}")
    print(f"driver_peak_rss_gib={driver_peak_gib():.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--churn", type=float, default=0.01, help="share of the catalog each later run redid")
    parser.add_argument("--inventory", action="store_true", help="inputs from a synthetic S3 Inventory report")
    parser.add_argument("--warm", action="store_true", help="plan a second time, on warm Ray workers")
    parser.add_argument("--skip-fold", action="store_true", help="leave out folding one more run into the state")
    parser.add_argument("--process", type=int, default=0, metavar="N",
                        help="instead: run the job over N tiny photos and report the driver's RSS over the run")
    parser.add_argument("--batch-size", type=int, default=64, help="--process: compute.batch_size")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray's logical CPUs")
    parser.add_argument("--workdir", default=None, help="where to build the synthetic catalog (default: a temp "
                        "dir, removed after); an earlier build there with the same sizes is reused")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="planning-scale-"))
    if args.build_only:
        build(root, args.inputs, args.runs, args.churn)
        return
    try:
        (process_catalog if args.process else plan_catalog)(args, root)
    finally:
        if not args.workdir:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
