"""Planning a catalog of short clips: indexing in Ray tasks against indexing on the driver, and re-planning with the
kept indexes (pipeline/video_index.py).

    python benchmarks/video_planning.py                          # 200 clips, a 2-CPU local Ray
    python benchmarks/video_planning.py --clips 50 --cpus 2 --out benchmarks/results/video_planning-cpu.json

Writes ``--clips`` distinct 1-second H.264 clips (64x36, AAC) and times ``make_plan`` over them (listing, state,
indexing, segmenting; no job runs), each time into a fresh output folder so that no kept index is found, except
where a re-plan is measured:

* ``driver``: the driver indexes in threads (what planning did before, and what a dry run still does);
* ``tasks_cold``: Ray tasks, the first ones of this Ray (its workers start and import the pipeline);
* ``tasks_warm``: Ray tasks again, workers up;
* ``replan_tasks`` / ``replan_driver``: the same catalog planned again, every clip's index kept from before.

Ray's own start (``ray.init``) is not counted in any of them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def write_clip(path: pathlib.Path, seed: int, frames: int = 25, size: tuple[int, int] = (64, 36)) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25, options={"preset": "fast", "g": "12"})
        video.width, video.height, video.pix_fmt = *size, "yuv420p"
        video.codec_context.thread_count = 1
        audio = container.add_stream("aac", rate=48000)
        audio.layout = "stereo"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        samples = np.zeros((2, 48000), np.float32)
        for start in range(0, 48000, 1024):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + 1024]), format="fltp",
                                               layout="stereo")
            chunk.sample_rate, chunk.pts = 48000, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "video_planning-cpu.json"))
    args = parser.parse_args()

    import ray

    from pipeline.config import validate_config
    from pipeline.plan import make_plan
    from pipeline.spec import RunSpec

    work = pathlib.Path(tempfile.mkdtemp(prefix="video-planning-"))
    source = work / "in"
    source.mkdir()
    started = time.monotonic()
    for i in range(args.clips):
        folder = source / f"reel_{i // 50:02d}"
        folder.mkdir(exist_ok=True)
        write_clip(folder / f"clip_{i:04d}.mp4", seed=i)
    print(f"wrote {args.clips} clips in {time.monotonic() - started:.1f} s", flush=True)

    def timed_plan(output: str, in_tasks: bool) -> tuple[float, dict]:
        cfg = validate_config({"input": {"uri": str(source)}, "output": {"uri": str(work / output)},
                               "model": {"path": "bicubic"}, "video": {"segment_seconds": 4}})
        spec = RunSpec.resolve(cfg, "bench")
        began = time.monotonic()
        plan = make_plan(spec, in_tasks=in_tasks)
        seconds = time.monotonic() - began
        stats = plan.video_indexing
        assert len(plan.clips) == args.clips and not plan.rejected, plan.rejected[:3]
        return seconds, {"indexed": stats.indexed, "kept_indexes_reused": stats.cached, "tasks": stats.tasks,
                         "indexing_seconds": round(stats.seconds, 2)}

    began = time.monotonic()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.monotonic() - began
    results = {}
    for name, output, in_tasks in [("driver", "out-driver", False), ("tasks_cold", "out-tasks-cold", True),
                                   ("tasks_warm", "out-tasks", True), ("replan_tasks", "out-tasks", True),
                                   ("replan_driver", "out-driver", False)]:
        seconds, stats = timed_plan(output, in_tasks)
        results[name] = {"seconds": round(seconds, 2), **stats}
        print(f"{name:14s} {seconds:7.2f} s  {stats}", flush=True)
    ray.shutdown()

    record = {
        "clips": args.clips, "clip": "1 s H.264 64x36 + AAC, MP4", "ray_cpus": args.cpus,
        "ray_start_seconds_not_counted": round(ray_start, 2), "plans": results,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "date": dt.date.today().isoformat(),
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
