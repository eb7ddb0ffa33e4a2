"""Train or fine-tune DiT4SR: ``python -m dit4sr.train --config FILE [--resume]`` (console: ``dit4sr-train``).

One device: ``--device auto|cpu|cuda[:N]`` and ``--precision auto|fp32|bf16`` (auto = bfloat16 autocast on
GPUs that support it, float32 elsewhere; master weights, optimizer and loss stay float32). Many GPUs (or CPU
processes): ``--num-workers N [--gpus-per-worker 1]`` runs data-parallel (DDP) under Ray Train's
``TorchTrainer`` with checkpoints in Ray Train's storage (``--storage``, any local path or fsspec URL); see
``dit4sr.training.distributed``.

What is trained and how (objective, determinism, checkpoints): ``dit4sr.training``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dit4sr-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train or fine-tune DiT4SR on one device, or data-parallel under Ray Train (--num-workers).\n\n"
                    "exit codes: 0 done, 1 failed (one 'dit4sr-train: error:' line), 2 a bad command line")
    parser.add_argument("--config", required=True, help="training YAML (see configs/train/dit4sr_tiny.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's, auto)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="auto = bf16 autocast on GPUs with bfloat16, else fp32 (default: the config's)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    parser.add_argument("--num-workers", type=int, help="data-parallel workers under Ray Train (DDP)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray Train worker (default 0: CPU, gloo)")
    parser.add_argument("--storage", help="Ray Train checkpoint storage: local path or fsspec URL "
                                          "(default: the config's distributed.storage, else output_dir)")
    parser.add_argument("--max-steps", type=int, help="override optim.max_steps (the length of the LR schedule)")
    parser.add_argument("--stop-at", type=int, help="stop after this step (checkpointed), keeping the schedule")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from .training import TrainingInputError  # the trainer and torch load once the command line is understood

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _run(args, parser)
    except TrainingInputError as error:
        print(f"dit4sr-train: error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .training import (
        Trainer,
        TrainingInputError,
        load_config,
        resolve_prompt_embeddings,
        resolve_training_device,
        seed_everything,
    )

    config = load_config(args.config)
    if args.max_steps is not None:
        config.optim.max_steps = args.max_steps
    for name in ("device", "precision"):
        if getattr(args, name):
            setattr(config, name, getattr(args, name))
    if args.gradient_checkpointing:
        config.model.gradient_checkpointing = True
    if args.num_workers is not None:
        config.distributed.num_workers = args.num_workers
    if args.gpus_per_worker is not None:
        config.distributed.gpus_per_worker = args.gpus_per_worker
    if args.storage:
        config.distributed.storage = args.storage
    if args.stop_at is not None and args.stop_at < 1:
        raise TrainingInputError(f"--stop-at must be at least 1, got {args.stop_at}")
    prompts = resolve_prompt_embeddings(config.prompts) if config.prompts else None

    if config.distributed.num_workers > 1 or args.num_workers is not None:
        from .training.distributed import train_distributed  # imports Ray: only where it is asked for

        train_distributed(config, prompts=prompts, resume=args.resume, stop_at=args.stop_at,
                          show_progress=not args.no_progress)
        return 0

    resolve_training_device(config.device)  # a missing device fails before any data is read
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    has_checkpoints = any(Path(config.output_dir).glob("checkpoint-*"))
    if has_checkpoints and not args.resume:
        parser.error(f"{config.output_dir} already holds checkpoints: pass --resume or choose another output_dir")
    trainer = Trainer(config, prompts=prompts)
    if args.resume:
        trainer.resume()
    trainer.fit(show_progress=not args.no_progress, stop_at=args.stop_at)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
