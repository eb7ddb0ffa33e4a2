"""Benchmark: what our orchestration costs around the model, with a simulated engine (not a test).

    python benchmarks/pipeline_overhead.py                    # all three figures
    python benchmarks/pipeline_overhead.py --images 300 --rerun-inputs 10000 --json out.json

The catalog job runs for real (local Ray, Ray Data, planner, manifests, atomic writes, the run lock) with the
plug-in engine ``pipeline_overhead:simulated``: it is busy for a fixed time per output megapixel — sleeping,
so the figure measures orchestration and not the model, and needs no free cores on a shared machine — and
returns a nearest-neighbour upscale. Each actor logs its busy intervals to a folder.

* ``busy_fraction``: with 4 actors (fake GPUs: ``ray.init(num_gpus=4)``, ``compute.gpus_per_actor: 1``), the
  engine-busy share of actor time in steady state — the window from the moment every actor has begun its first
  image to the moment the first actor has finished its last.
* ``scaling_1_to_4``: steady-state throughput (images finished per second inside that window) with 4 actors
  over 1; end-to-end job throughputs (Ray Data start and tail included) are printed beside it.
* ``rerun_10k_seconds``: a fresh ``python jobs/upscale_catalog.py`` over a finished catalog of 10,000 inputs —
  Python and Ray start, listing, manifest reading, planning, the summary — all skipped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
BUSY_DIR_ENV = "PIPELINE_OVERHEAD_BUSY_DIR"
SECONDS_PER_MEGAPIXEL_ENV = "PIPELINE_OVERHEAD_SECONDS_PER_MP"
# Logical CPUs for Ray: 4 actors + read/write tasks. More slots only start more worker processes at once, which
# thrashes a small machine (Ray starts up to num_cpus workers concurrently).
RAY_CPUS = 6


class SimulatedEngine:
    """Busy for ``seconds_per_megapixel`` x output megapixels (sleeping); logs each busy interval."""

    version = "simulated-1"

    def __init__(self, settings: dict):
        self.scale = int(settings["scale"])
        self.seconds_per_megapixel = float(os.environ[SECONDS_PER_MEGAPIXEL_ENV])
        self.log = open(pathlib.Path(os.environ[BUSY_DIR_ENV]) / f"busy-{os.getpid()}.jsonl", "a")

    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        height, width = image.shape[:2]
        start = time.time()
        time.sleep(self.seconds_per_megapixel * height * width * self.scale**2 / 1e6)
        out = image.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        self.log.write(json.dumps([start, time.time()]) + "\n")
        self.log.flush()
        return out


def simulated(settings: dict) -> SimulatedEngine:
    return SimulatedEngine(settings)


simulated.version = SimulatedEngine.version


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_catalog(root: pathlib.Path, count: int, width: int, height: int) -> None:
    for i in range(count):
        path = root / f"album{i % 10}" / f"photo{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(width, height, i))


def job_config(source: pathlib.Path, output: pathlib.Path, actors: int, batch_size: int) -> dict:
    return {
        "input": {"uri": str(source)}, "output": {"uri": str(output), "format": "png"},
        "model": {"path": "pipeline_overhead:simulated"}, "upscale": {"scale": 2},
        "compute": {"actors": {"min": actors, "max": actors}, "gpus_per_actor": 1, "cpus_per_actor": 1,
                    "batch_size": batch_size},
        "run": {"progress_interval_s": 30},
    }


def busy_intervals(folder: pathlib.Path) -> dict[str, list[tuple[float, float]]]:
    return {path.stem: [tuple(json.loads(line)) for line in path.read_text().splitlines()]
            for path in folder.glob("busy-*.jsonl")}


def steady_state(intervals: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Busy share and throughput inside the window where every actor should be busy."""
    start = max(spans[0][0] for spans in intervals.values())
    stop = min(spans[-1][1] for spans in intervals.values())
    window = stop - start
    busy = sum(max(0.0, min(b, stop) - max(a, start)) for spans in intervals.values() for a, b in spans)
    finished = sum(start < b <= stop for spans in intervals.values() for _, b in spans)
    return {"window_s": window, "busy_fraction": busy / (window * len(intervals)),
            "images_per_s": finished / window, "actors": len(intervals)}


def run_catalog(work: pathlib.Path, name: str, source: pathlib.Path, actors: int, batch_size: int) -> dict:
    from pipeline.config import validate_config
    from pipeline.run import run_job

    busy = pathlib.Path(os.environ[BUSY_DIR_ENV])  # set before Ray started: its workers inherit it
    for stale in busy.glob("busy-*.jsonl"):
        stale.unlink()
    started = time.monotonic()
    code = run_job(validate_config(job_config(source, work / f"out-{name}", actors, batch_size)))
    wall = time.monotonic() - started
    intervals = busy_intervals(busy)  # one file per actor process of this run
    images = sum(len(spans) for spans in intervals.values())
    return {"exit_code": code, "wall_s": wall, "images": images, "end_to_end_images_per_s": images / wall,
            **steady_state(intervals)}


def rerun(work: pathlib.Path, inputs: int, batch_size: int) -> dict:
    from pipeline.config import validate_config
    from pipeline.run import run_job

    source, output = work / "catalog-10k", work / "out-10k"
    write_catalog(source, inputs, 8, 8)
    started = time.monotonic()
    first = run_job(validate_config(job_config(source, output, 2, batch_size)))
    first_s = time.monotonic() - started
    import ray

    ray.shutdown()  # the re-run starts its own Ray, as a fresh job would
    config = work / "rerun.json"  # JSON is YAML
    config.write_text(json.dumps(job_config(source, output, 1, batch_size)))
    started = time.monotonic()
    # RAY_ADDRESS=local: a Ray of its own, never a cluster someone else started on this machine.
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "upscale_catalog.py"), "--config", str(config)],
                          capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": "local"})
    seconds = time.monotonic() - started
    summary = [line for line in done.stdout.splitlines() if line.startswith("run ")]
    return {"inputs": inputs, "first_run_exit_code": first, "first_run_s": first_s, "exit_code": done.returncode,
            "rerun_seconds": seconds, "summary": summary[-1] if summary else done.stderr[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 48), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--seconds-per-megapixel", type=float, default=16.0,
                        help="simulated engine cost per output megapixel (default: 0.2 s per 128x96 output)")
    parser.add_argument("--batch-size", type=int, default=4, help="compute.batch_size of the timed runs")
    parser.add_argument("--rerun-inputs", type=int, default=10_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["busy", "scaling", "rerun"])
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(REPO), os.environ.get("PYTHONPATH")]))
    sys.path[:0] = [str(HERE), str(REPO)]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    figures: dict = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "images": args.images,
                     "size": args.size, "seconds_per_megapixel": args.seconds_per_megapixel,
                     "batch_size": args.batch_size}
    def start_ray(seconds_per_megapixel: float) -> None:
        # Ray's workers inherit the environment it starts with: the engine's settings travel that way.
        os.environ[SECONDS_PER_MEGAPIXEL_ENV] = str(seconds_per_megapixel)
        for attempt in range(3):  # a heavily loaded machine can miss Ray's fixed 30 s raylet start-up wait
            try:
                ray.init(address="local", num_cpus=RAY_CPUS, num_gpus=4, object_store_memory=300 * 1024**2,
                         include_dashboard=False, log_to_driver=False)
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for it
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                ray.shutdown()
        ray.data.DataContext.get_current().enable_progress_bars = False

    with tempfile.TemporaryDirectory(prefix="pipeline-overhead-") as tmp:
        work = pathlib.Path(tmp)
        os.environ[BUSY_DIR_ENV] = str(work)
        if {"busy", "scaling"} - set(args.skip):
            source = work / "catalog"
            write_catalog(source, args.images, *args.size)
            start_ray(args.seconds_per_megapixel)
            four = run_catalog(work, "4", source, 4, args.batch_size)
            figures["four_actors"] = four
            print(f"4 actors: busy_fraction={four['busy_fraction']:.3f} over a {four['window_s']:.1f} s window; "
                  f"{four['images_per_s']:.2f} images/s steady, {four['end_to_end_images_per_s']:.2f} end to end")
            if "scaling" not in args.skip:
                one = run_catalog(work, "1", source, 1, args.batch_size)
                figures["one_actor"] = one
                figures["scaling_1_to_4"] = four["images_per_s"] / one["images_per_s"]
                figures["scaling_1_to_4_end_to_end"] = four["end_to_end_images_per_s"] / one["end_to_end_images_per_s"]
                print(f"1 actor: busy_fraction={one['busy_fraction']:.3f}; {one['images_per_s']:.2f} images/s "
                      f"steady, {one['end_to_end_images_per_s']:.2f} end to end")
            ray.shutdown()
            figures["busy_fraction"] = four["busy_fraction"]
            print(f"busy_fraction={figures['busy_fraction']:.3f}")
            if "scaling_1_to_4" in figures:
                print(f"scaling_1_to_4={figures['scaling_1_to_4']:.2f} "
                      f"(end to end {figures['scaling_1_to_4_end_to_end']:.2f})")
        if "rerun" not in args.skip:
            start_ray(0.0)
            result = rerun(work, args.rerun_inputs, 64)
            figures["rerun"] = result
            figures["rerun_10k_seconds"] = result["rerun_seconds"]
            print(f"first run over {args.rerun_inputs} inputs: {result['first_run_s']:.1f} s; re-run: "
                  f"{result['summary']}")
            print(f"rerun_10k_seconds={result['rerun_seconds']:.1f}")
    figures["load_average_after"] = os.getloadavg()
    print(f"load average before {figures['load_average_before']}, after {figures['load_average_after']} "
          f"on {figures['cpus']} cores")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
