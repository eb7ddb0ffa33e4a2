"""Training throughput on one device: steps/s, samples/s and the share of time the device waits for data.

    python benchmarks/bench_train_throughput.py --config configs/train/dit4sr_finetune.yaml --device cuda \\
        [--precision auto] [--steps 50] [--warmup 5] [--data-workers 8] [--batch-size 8] [--gradient-checkpointing]

Runs the real training step (data synthesis in the loader threads, forward, backward, optimizer, EMA) without
writing checkpoints. The waiting share is the time ``PrefetchingLoader.get`` blocks over the wall time of the
timed steps; every step ends with a host sync (the loss value), so a blocked loader is an idle device.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from dit4sr.training import Trainer, load_config
from dit4sr.training.data import PrefetchingLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--data-workers", type=int, help="loader threads (data.num_workers)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    config.output_dir = tempfile.mkdtemp(prefix="dit4sr-bench-")
    config.precision = args.precision or config.precision
    config.model.gradient_checkpointing |= args.gradient_checkpointing
    if args.batch_size:
        config.optim.batch_size = args.batch_size
    if args.data_workers:
        config.data.num_workers = args.data_workers
    trainer = Trainer(config, device=args.device)
    total = args.warmup + args.steps
    loader = PrefetchingLoader(trainer.source, 0, total, config.data.num_workers, config.data.prefetch,
                               pin_memory=trainer.device.type == "cuda")
    try:
        for _ in range(args.warmup):
            trainer.train_step(loader.get(trainer.step))
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
            torch.cuda.reset_peak_memory_stats(trainer.device)
        waited, started = loader.wait_seconds, time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(loader.get(trainer.step))
        elapsed = time.perf_counter() - started
        waited = loader.wait_seconds - waited
    finally:
        loader.close()
    result = {
        "device": str(trainer.device),
        "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu",
        "precision": str(trainer.autocast_dtype or torch.float32), "batch_size": config.optim.batch_size,
        "crop_size": config.data.crop_size, "data_workers": config.data.num_workers,
        "gradient_checkpointing": config.model.gradient_checkpointing, "steps": args.steps,
        "steps_per_s": args.steps / elapsed, "samples_per_s": args.steps * config.optim.batch_size / elapsed,
        "data_wait_fraction": waited / elapsed,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(trainer.device) / 2**30
                            if trainer.device.type == "cuda" else None),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
