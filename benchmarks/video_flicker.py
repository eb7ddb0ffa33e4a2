"""Flicker and throughput of the video path, end to end through the catalog job.

    python benchmarks/video_flicker.py --clip ../shared/data/video/Mustache_640x360.mp4 --seconds 1 \
        --out benchmarks/results/video_flicker_cpu.json

Takes the clip's first ``--seconds`` (re-encoded losslessly, so the input frames are the source's), runs the
job with consistent noise (cut into segments of ``--segment-seconds``, so segment boundaries are crossed) and
with independent noise (a seed per frame), and with the bicubic engine (the plumbing: decode + encode). From
the decoded outputs it reports, per mode:

* flicker = mean |out_t - out_t-1| over consecutive frame pairs / the same for the bicubic-upscaled input;
* whether segment boundaries show: the mean difference of the pairs that straddle a boundary against the
  largest inside a segment;
* frames/min of the whole job (Ray start excluded) on this machine.
"""

from __future__ import annotations

import argparse
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
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def trim(clip: pathlib.Path, seconds: float, out: pathlib.Path) -> int:
    """The clip's first `seconds` as lossless H.264 (qp 0, RGB-exact enough for a flicker reference)."""
    with av.open(str(clip)) as source, av.open(str(out), "w") as target:
        stream = source.streams.video[0]
        encoder = target.add_stream("libx264", rate=stream.average_rate, options={"qp": "0", "preset": "medium"})
        encoder.width, encoder.height, encoder.pix_fmt = stream.width, stream.height, "yuv420p"
        encoder.codec_context.thread_count = 1
        frames = 0
        for frame in source.decode(stream):
            if frame.time >= seconds:
                break
            frame.pict_type = av.video.frame.PictureType.NONE
            target.mux(encoder.encode(frame))
            frames += 1
        target.mux(encoder.encode())
    return frames


def decode(path: pathlib.Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24").astype(np.float32) / 255 for frame in container.decode(video=0)]


def bicubic(frame: np.ndarray, scale: int) -> np.ndarray:
    height, width, _ = frame.shape
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(frame[..., c]), mode="F").resize(
        (width * scale, height * scale), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)


def pair_differences(frames: list[np.ndarray]) -> np.ndarray:
    return np.array([np.abs(b - a).mean() for a, b in zip(frames, frames[1:])])


def run(config: dict, label: str) -> dict:
    from pipeline.config import validate_config
    from pipeline.run import EXIT_OK, execute, prepare

    cfg = validate_config(config)
    started = time.monotonic()
    summary = execute(prepare(cfg))
    seconds = time.monotonic() - started
    if summary["failed"] or summary["ok"] != 1:
        raise SystemExit(f"{label}: the job did not finish the clip: {summary}")
    return {"seconds": round(seconds, 2), "exit": EXIT_OK}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default=str(ROOT.parent / "shared/data/video/Mustache_640x360.mp4"))
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--segment-seconds", type=float, default=0.4)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="bicubic,consistent,independent",
                        help="runs to make, of bicubic (the plumbing), consistent and independent (the model)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False)
    work = pathlib.Path(tempfile.mkdtemp(prefix="video-flicker-"))
    (work / "in").mkdir()
    clip = work / "in" / "clip.mp4"
    frames = trim(pathlib.Path(args.clip), args.seconds, clip)
    source = decode(clip)
    scale = 4
    reference = pair_differences([bicubic(frame, scale) for frame in source]).mean()
    base = {"input": {"uri": str(work / "in")}, "compute": {"torch_threads": args.threads, "batch_size": 1},
            "upscale": {"scale": scale}, "run": {"progress_interval_s": 60, "lock": {"enabled": False}}}
    results = {"clip": pathlib.Path(args.clip).name, "seconds_of_clip": args.seconds, "frames": frames,
               "size": list(source[0].shape[1::-1]), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d"), "reference_motion": float(reference), "runs": {}}

    runs = {"bicubic": ("bicubic", "consistent"), "consistent": (args.model, "consistent"),
            "independent": (args.model, "independent")}
    for label in args.modes.split(","):
        model, noise = runs[label]
        out = work / f"out-{label}"
        timing = run({**base, "output": {"uri": str(out)}, "model": {"path": model},
                      "video": {"noise": noise, "segment_seconds": args.segment_seconds, "crf": 12}}, label)
        upscaled = decode(out / "clip.mp4")
        differences = pair_differences(upscaled)
        # Segment boundaries as the planner cut them (balanced ranges of about segment_seconds).
        with av.open(str(clip)) as container:
            rate = container.streams.video[0].average_rate or Fraction(25)
        per_segment = max(1, round(args.segment_seconds * float(rate)))
        count = -(-frames // per_segment)
        boundaries = [frames * i // count for i in range(1, count)]  # first frame of each later segment
        straddling = [differences[b - 1] for b in boundaries]
        inside = [d for i, d in enumerate(differences) if i + 1 not in boundaries]
        results["runs"][label] = {
            **timing, "frames_per_min": round(frames / timing["seconds"] * 60, 2),
            "flicker": float(differences.mean() / reference),
            "boundary_pairs": [float(d) for d in straddling], "inside_pairs_max": float(max(inside)),
            "inside_pairs_mean": float(np.mean(inside)),
            "boundary_visible": bool(straddling and max(straddling) > max(inside)),
        }
        print(label, json.dumps(results["runs"][label]), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
