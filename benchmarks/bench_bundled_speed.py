"""Speed of the bundled model on this machine: one 256x256 photo to 1024x1024 with its recommended settings.

    python benchmarks/bench_bundled_speed.py [--runs 3] [--threads N] [--model bundled] [--image PATH]

The bar (issue 5) is <= 20 s per image on the 2-core development CPU. Model loading is timed apart
from upscaling; the first call is a warm-up and is reported but not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit4sr.pipeline_dit4sr import DiT4SRPipeline

SHARED_PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "CBSD68" / "106024.png"


def test_image(path: str | None) -> tuple[Image.Image, str]:
    """A 256x256 centre crop of a real photo when one is available, else a seeded synthetic texture."""
    source = Path(path) if path else SHARED_PHOTO
    if source.is_file():
        image = Image.open(source).convert("RGB")
        left, top = (image.width - 256) // 2, (image.height - 256) // 2
        return image.crop((left, top, left + 256, top + 256)), str(source)
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
    return coarse, "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--image", help="photo to crop 256x256 from")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    pipe = DiT4SRPipeline.from_pretrained(args.model, device="cpu")
    load_s = time.perf_counter() - started
    image, source = test_image(args.image)

    times = []
    for _ in range(args.runs + 1):
        started = time.perf_counter()
        out = pipe(image, upscale=4, seed=0, show_progress=False).images[0]
        times.append(time.perf_counter() - started)
    assert out.size == (1024, 1024), out.size
    print(json.dumps({
        "model": args.model, "input": source, "output_size": out.size,
        "settings": {k: v for k, v in pipe.effective_settings().items() if "prompt" not in k},
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_s": round(load_s, 2),
        "warmup_s": round(times[0], 2), "runs_s": [round(t, 2) for t in times[1:]],
        "median_s": round(statistics.median(times[1:]), 2), "bar_s": 20.0,
    }, indent=1, default=str))


if __name__ == "__main__":
    main()
