"""Data-parallel training under Ray Train: ``python -m dit4sr.train --config FILE --num-workers N
[--gpus-per-worker 1] [--storage s3://bucket/runs] [--resume]``.

Each worker is one ``Trainer`` rank in a DDP group set up by Ray Train's ``TorchTrainer`` (NCCL on GPUs,
gloo on CPUs); it builds only its own slice of every global batch, from its own data shards
(``dit4sr.training.data``), so ``N`` workers x batch ``B`` follow the same loss trajectory as one worker
with batch ``N x B`` (same ``data.num_shards``), up to floating-point rounding. Rank 0 writes each checkpoint
(the same folder as a single-device run: pipeline root + ``training_state/``) and hands it to
``ray.train.report``, which uploads it to the run's storage: a local path or any fsspec URL
(``distributed.storage``, default ``output_dir``; ``distributed.storage_options`` for e.g. an S3 endpoint).
``--resume`` continues the run of the same name from its latest checkpoint; without it an existing run is
refused. Connects to the Ray cluster in ``RAY_ADDRESS`` (or starts a local one). It uses Ray Train's current
API (reported checkpoints restored by run name), the default since Ray 2.51.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import fsspec
import torch

from ..prompt_cache import PromptEmbedding
from .config import TrainConfig
from .errors import TrainingInputError
from .trainer import Trainer, seed_everything

logger = logging.getLogger(__name__)


def _storage(config) -> tuple[str, Any, fsspec.AbstractFileSystem, str]:
    """(storage_path, pyarrow filesystem or None, fsspec filesystem, run folder) for Ray Train's RunConfig."""
    import pyarrow.fs

    dist = config.distributed
    url = dist.storage or config.output_dir
    fs, path = fsspec.core.url_to_fs(url, **dist.storage_options)
    path = path.rstrip("/")
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    if local:
        os.makedirs(path, exist_ok=True)
    arrow_fs = None if local else pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return path, arrow_fs, fs, f"{path}/{dist.run_name}"


def _train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)
    device = ray.train.torch.get_device() if config.distributed.gpus_per_worker > 0 else torch.device("cpu")
    trainer = Trainer(config, device=device, rank=rank, world_size=world_size, prompts=loop_config["prompts"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.load_state(folder)

    def report(trainer: Trainer) -> str | None:
        metrics = {"step": trainer.step, "loss": trainer.losses[-1], "data_wait_fraction": trainer.data_wait_fraction}
        with tempfile.TemporaryDirectory(prefix="dit4sr-checkpoint-") as folder:
            if rank == 0:
                trainer.write_checkpoint(folder)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=f"checkpoint-{trainer.step:07d}")
            else:
                ray.train.report(metrics, checkpoint=None)
        return f"checkpoint-{trainer.step:07d}" if rank == 0 else None

    trainer.fit(show_progress=loop_config["show_progress"], stop_at=loop_config["stop_at"], on_checkpoint=report)


def _input_error(failure: BaseException | None) -> BaseException | None:
    """The ``TrainingInputError`` behind a worker failure (Ray re-raises it wrapped), if any."""
    seen = set()
    while failure is not None and id(failure) not in seen:
        seen.add(id(failure))
        if isinstance(failure, TrainingInputError):
            return failure
        failure = getattr(failure, "cause", None) or failure.__cause__
    return None


def run_exists(config) -> bool:
    _, _, fs, run_folder = _storage(config)
    return fs.exists(run_folder) and bool(fs.ls(run_folder))


def train_distributed(config, prompts: tuple[PromptEmbedding, PromptEmbedding] | None = None, resume: bool = False,
                      stop_at: int | None = None, show_progress: bool = True):
    """Run (or, with ``resume``, continue) the training under Ray Train; returns Ray Train's ``Result``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = config.distributed
    storage_path, arrow_fs, _, run_folder = _storage(config)
    if run_exists(config) and not resume:
        raise TrainingInputError(f"Ray Train run {run_folder} already exists: pass --resume to continue it or "
                                 "choose another distributed.run_name / --storage")
    use_gpu = dist.gpus_per_worker > 0
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config.model_dump(), "prompts": prompts, "stop_at": stop_at,
                           "show_progress": show_progress},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=dist.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": dist.cpus_per_worker, **({"GPU": dist.gpus_per_worker} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=dist.run_name, storage_path=storage_path, storage_filesystem=arrow_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        # A bad input met by a worker (data folder, checkpoint, device) reads as on one device.
        for rank, failure in sorted((getattr(error, "worker_failures", None) or {}).items()):
            cause = _input_error(failure)
            if cause is not None:
                raise TrainingInputError(f"worker {rank}: {cause}") from None
        raise
    logger.info("Ray Train run %s finished; latest checkpoint %s", run_folder,
                result.checkpoint.path if result.checkpoint else None)
    return result
