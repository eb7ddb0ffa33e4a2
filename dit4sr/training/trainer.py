"""The training loop: one process training DiT4SR on one device, or one rank of a DDP group.

The objective is the official one: flow matching (``x_t = (1 - sigma) x0 + sigma noise``) with
logit-normal ``sigma``, the network output turned into an x0 estimate by
``dit4sr.parameterization.predicted_x0`` (the same definition every sampler uses) and an MSE against
x0; AdamW with gradient clipping; prompt embeddings replaced by the null prompt with probability
``null_prompt_prob``. Starting from a pretrained model (``model.pretrained``) only parameters whose
names contain ``control`` train (``model.trainable: all`` trains every weight); a model built from
``model.transformer`` trains everything.

Reproducibility: sample ``i`` of step ``k`` (its crop, degradation, timestep, prompt drop and noise) comes
from generators seeded with ``(seed, k, i)`` (``dit4sr.training.data``), so a resumed run needs only the
weights, optimizer, EMA and step to continue exactly (on the same device type and precision), and a step's
samples are the same however many workers share the global batch. Every checkpoint is a complete pipeline
root (``model_index.json``, ``transformer/`` with the EMA weights, ``vae/``, ``scheduler/``,
``prompt_embeds/``) plus ``training_state/`` for resuming (with the per-step loss history).
"""


from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..degradation import Degradation, DegradationConfig
from ..models import DiT4SRTransformer2DModel
from ..models.transformer_dit4sr import WEIGHTS_NAME
from ..parameterization import predicted_x0
from ..prompt_cache import NULL_EMBEDDING_PATH, PromptEmbedding
from .config import OptimConfig, TrainConfig
from .data import Batch, PrefetchingLoader, ShardedPairSource, list_images, read_list
from .errors import TrainingInputError
from .model import architecture, build_model, write_pipeline_root

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"


def resolve_training_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the current CUDA device when one is present, else the CPU; a named device must exist."""
    if str(name) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingInputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainingInputError(f"device {name!r} is not supported for training: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingInputError(
                f"device {name!r} is not available: torch sees no CUDA GPU (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise TrainingInputError(f"device {name!r} is not available: {count} CUDA GPU(s) visible "
                                     f"(cuda:0..cuda:{count - 1})")
        device = torch.device("cuda", index)
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (``None`` = plain float32): ``auto`` is bfloat16 on GPUs that support it.

    ``bf16`` may be asked for on the CPU too (CPU autocast); a GPU without bfloat16 refuses it.
    """
    if precision == "fp32":
        return None
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return torch.bfloat16 if bf16_gpu else None
    if precision == "bf16":
        if device.type == "cuda" and not bf16_gpu:
            raise TrainingInputError(f"precision bf16: the GPU {torch.cuda.get_device_name(device)} does not "
                                     "support bfloat16; use precision fp32")
        return torch.bfloat16
    raise TrainingInputError(f"unknown precision {precision!r}: use auto, fp32 or bf16")


def lr_lambda(optim: OptimConfig):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine
    return factor


class Trainer:
    """One training process: the whole run on one device, or one rank of a DDP group (``world_size > 1``,
    ``torch.distributed`` already initialised, e.g. by Ray Train)."""

    def __init__(self, config: TrainConfig, device: str | torch.device | None = None, rank: int = 0,
                 world_size: int = 1, prompts: tuple[PromptEmbedding, PromptEmbedding] | None = None):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = resolve_training_device(device if device is not None else config.device)
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        self.transformer, self.vae, null_prompt, trainable = build_model(config.model, config.seed)
        if config.model.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        names = set(trainable)
        for name, param in self.transformer.named_parameters():
            param.requires_grad_(name in names)
        self.transformer.to(self.device)
        self.vae.to(self.device)
        self.params = [p for n, p in self.transformer.named_parameters() if n in names]
        self.ema = [p.detach().clone() for p in self.params]
        self.model = self.transformer
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.transformer, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.learning_rate, betas=optim.betas,
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim))
        self.prompt, self.null_prompt = self._conditioning(null_prompt, prompts)
        self.step = 0
        self.losses: list[float] = []  # every step's (global-batch) loss since step 0
        self.data_wait_fraction = 0.0

        exclude = set(read_list(config.data.holdout_list)) if config.data.holdout_list else set()
        files = list_images(config.data.roots, exclude)
        if not files:
            raise TrainingInputError(f"no training images under {', '.join(config.data.roots)}")
        degradation = DegradationConfig.from_yaml(config.data.degradation) if config.data.degradation \
            else DegradationConfig()
        self.source = ShardedPairSource(files, config.data.crop_size, Degradation(degradation), config.seed,
                                        optim.batch_size, rank, world_size, config.data.num_shards,
                                        config.data.preload)
        self.train_files = [key for key, _ in files]
        if rank == 0:
            logger.info("%d training images (%d on this worker, %d skipped), %d held out, %d trainable "
                        "parameters, device %s, %s", len(files), self.source.num_images, len(self.source.skipped),
                        len(exclude), sum(p.numel() for p in self.params), self.device,
                        f"{self.autocast_dtype} autocast" if self.autocast_dtype else "float32")

    def _conditioning(self, null_prompt: PromptEmbedding | None,
                      prompts: tuple[PromptEmbedding, PromptEmbedding] | None) -> tuple[PromptEmbedding,
                                                                                         PromptEmbedding]:
        if prompts is not None:
            # The null text as the official trainer makes it: "" through the same encoders as the prompt.
            prompt, null_prompt = prompts
        else:
            if null_prompt is None:
                raise TrainingInputError(f"{self.config.model.pretrained} has no null-prompt embedding "
                                         f"({NULL_EMBEDDING_PATH}); add a 'prompts' section to encode one")
            prompt = null_prompt
            if self.config.data.prompt_embeds:
                with open(self.config.data.prompt_embeds, "rb") as f:
                    prompt = PromptEmbedding.from_bytes(f.read())
        if prompt.prompt_embeds.shape != null_prompt.prompt_embeds.shape:
            raise TrainingInputError(f"prompt embeddings {tuple(prompt.prompt_embeds.shape)} and null-prompt "
                                     f"embeddings {tuple(null_prompt.prompt_embeds.shape)} differ in shape")
        return prompt, null_prompt

    # -- one step ------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _latents(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """A posterior sample per image (its own generator), scaled like the pipeline's latents."""
        with torch.no_grad(), self.autocast():
            dist = self.vae.encode(images).latent_dist
        mean = dist.mode().float()
        std = getattr(dist, "std", None)  # None: a deterministic autoencoder
        if std is not None:
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(self.device)
            mean = mean + std.float() * eps
        config = self.vae.config
        return (mean - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor

    def loss(self, step: int, batch: Batch | None = None) -> torch.Tensor:
        """Mean loss over this worker's samples of step ``step``."""
        optim, device = self.config.optim, self.device
        batch = batch or self.source.batch(step)
        generators = [torch.Generator().manual_seed(seed) for seed in batch.noise_seeds]
        sigma = torch.sigmoid(optim.logit_mean + optim.logit_std
                              * torch.cat([torch.randn(1, generator=g) for g in generators])).to(device)
        drop = (torch.cat([torch.rand(1, generator=g) for g in generators]) < optim.null_prompt_prob).to(device)
        hr = batch.hr.to(device, non_blocking=True)
        lr = batch.lr.to(device, non_blocking=True)
        x0, lr_latents = self._latents(hr, generators), self._latents(lr, generators)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(device)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        count = x0.shape[0]
        null, cond = self.null_prompt, self.prompt
        prompt = torch.where(drop.view(-1, 1, 1), null.prompt_embeds.float().to(device),
                             cond.prompt_embeds.float().to(device).expand(count, -1, -1))
        pooled = torch.where(drop.view(-1, 1), null.pooled_prompt_embeds.float().to(device),
                             cond.pooled_prompt_embeds.float().to(device).expand(count, -1))
        cfg = self.transformer.config
        with self.autocast():
            out = self.model(noisy, lr_latents, prompt, pooled, sigma * 1000.0, return_dict=False)[0]
        x0_hat = predicted_x0(out.float(), noisy, lr_latents, sigma, cfg.prediction_type, cfg.lr_residual)
        return torch.nn.functional.mse_loss(x0_hat, x0)

    def train_step(self, batch: Batch | None = None) -> tuple[float, float]:
        loss = self.loss(self.step, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over the workers here
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        # Warm-up of the EMA decay so early checkpoints are not dominated by the random init.
        decay = min(self.config.optim.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)
        value = loss.detach()
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
            value = value / self.world_size
        self.losses.append(value.item())
        return self.losses[-1], float(grad_norm)

    # -- checkpoints ---------------------------------------------------------------------------
    def _ema_transformer(self) -> DiT4SRTransformer2DModel:
        ema_model = DiT4SRTransformer2DModel.from_config(self.transformer.config)
        state = {k: v.detach().cpu() for k, v in self.transformer.state_dict().items()}
        names = [n for n, p in self.transformer.named_parameters() if p.requires_grad]
        state.update({n: e.detach().cpu() for n, e in zip(names, self.ema)})
        ema_model.load_state_dict(state)
        return ema_model

    def write_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write the exported pipeline root and ``training_state/`` into ``folder`` (created)."""
        folder = Path(folder)
        write_pipeline_root(folder, self._ema_transformer(), self.vae, self.null_prompt,
                            getattr(torch, self.config.export_dtype), self.config.recommended_settings)
        state = folder / STATE_DIR
        state.mkdir()
        self.transformer.save_config(state / "transformer")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.transformer.state_dict().items()},
                  str(state / "transformer" / WEIGHTS_NAME), metadata={"format": "pt"})
        save_file({f"{i:05d}": t.detach().cpu().contiguous() for i, t in enumerate(self.ema)},
                  str(state / "ema.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   state / "optimizer.pt")
        (state / "state.json").write_text(json.dumps({
            "step": self.step, "seed": self.config.seed, "device_type": self.device.type,
            "precision": str(self.autocast_dtype or torch.float32), "world_size": self.world_size,
            "global_batch": self.config.optim.batch_size * self.world_size,
            "data_wait_fraction": self.data_wait_fraction, "skipped_images": self.source.skipped,
            "train_files": self.train_files}, indent=1))
        (state / "losses.json").write_text(json.dumps(self.losses))
        return folder

    def save(self) -> Path:
        """A checkpoint under ``output_dir``, visible only once complete; keeps the newest ``keep_checkpoints``."""
        out = Path(self.config.output_dir)
        final = out / f"checkpoint-{self.step:07d}"
        staging = out / f".partial-checkpoint-{self.step:07d}"
        shutil.rmtree(staging, ignore_errors=True)
        self.write_checkpoint(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in sorted(out.glob("checkpoint-*"))[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        return final

    def load_state(self, checkpoint: str | os.PathLike) -> None:
        """Continue from a checkpoint folder (the same architecture and trainable set)."""
        checkpoint = Path(checkpoint)
        state = checkpoint / STATE_DIR
        if not (state / "state.json").is_file():
            raise TrainingInputError(f"{checkpoint} is not a training checkpoint (no {STATE_DIR}/state.json)")
        saved_config = json.loads((state / "transformer" / "config.json").read_text())
        ours, theirs = architecture(self.transformer.config), architecture(saved_config)
        differences = [f"{k}: {theirs.get(k)!r} in the checkpoint, {ours.get(k)!r} here"
                       for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)]
        if differences:
            raise TrainingInputError(f"checkpoint {checkpoint} is of a different architecture than the configured "
                                     f"model ({'; '.join(differences)})")
        ema = load_file(str(state / "ema.safetensors"))
        if len(ema) != len(self.ema) or any(ema[f"{i:05d}"].shape != e.shape for i, e in enumerate(self.ema)):
            raise TrainingInputError(f"checkpoint {checkpoint} trained {len(ema)} parameter tensors, this config "
                                     f"trains {len(self.ema)} (model.trainable changed?)")
        meta = json.loads((state / "state.json").read_text())
        if meta.get("device_type", self.device.type) != self.device.type:
            logger.warning("checkpoint %s was trained on %s, continuing on %s: the run continues, but not bit for "
                           "bit as it would have", checkpoint, meta["device_type"], self.device.type)
        self.transformer.load_checked_state_dict(load_file(str(state / "transformer" / WEIGHTS_NAME)),
                                                 torch.float32)
        with torch.no_grad():
            torch._foreach_copy_(self.ema, [ema[f"{i:05d}"].to(self.device) for i in range(len(self.ema))])
        saved = torch.load(state / "optimizer.pt", weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step = meta["step"]
        losses = state / "losses.json"
        self.losses = json.loads(losses.read_text())[: self.step] if losses.is_file() else []
        # The schedule follows the current config (max_steps may have been extended), not the saved rate.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.step)
        if self.rank == 0:
            logger.info("resumed from %s at step %d", checkpoint, self.step)

    def resume(self) -> bool:
        """Continue from the newest checkpoint in ``output_dir``; ``False`` when there is none."""
        checkpoints = sorted(Path(self.config.output_dir).glob("checkpoint-*"))
        if not checkpoints:
            return False
        self.load_state(checkpoints[-1])
        return True

    def fit(self, show_progress: bool = True, stop_at: int | None = None,
            on_checkpoint: Callable[[Trainer], Any] | None = None) -> list[float]:
        """Train up to ``max_steps`` (or stop, with a checkpoint, after step ``stop_at`` without changing the
        schedule); returns the losses of the steps run in this call. ``on_checkpoint(trainer)`` replaces the
        local checkpoint (``save``), e.g. with Ray Train's."""
        config = self.config
        end = min(config.optim.max_steps, stop_at or config.optim.max_steps)
        on_checkpoint = on_checkpoint or Trainer.save
        lead = self.rank == 0
        bar = tqdm(total=config.optim.max_steps, initial=self.step, disable=not (show_progress and lead),
                   desc="train", dynamic_ncols=True)
        started, first_step = time.perf_counter(), self.step
        loader = PrefetchingLoader(self.source, self.step, end, config.data.num_workers, config.data.prefetch,
                                   pin_memory=self.device.type == "cuda")
        try:
            while self.step < end:
                loss, grad_norm = self.train_step(loader.get(self.step))
                bar.update(1)
                elapsed = time.perf_counter() - started
                self.data_wait_fraction = loader.wait_seconds / elapsed
                if self.step % config.log_every == 0 and lead:
                    recent = float(np.mean(self.losses[-config.log_every:]))
                    bar.set_postfix(loss=f"{recent:.5f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                    logger.info("step %d loss %.6f grad_norm %.3f lr %.3e elapsed %.0fs steps/s %.3f data_wait "
                                "%.1f%%", self.step, recent, grad_norm, self.scheduler.get_last_lr()[0], elapsed,
                                (self.step - first_step) / elapsed, 100 * self.data_wait_fraction)
                if self.step % config.checkpoint_every == 0 or self.step == end:
                    saved = on_checkpoint(self)
                    if lead and saved:
                        logger.info("saved %s", saved)
        finally:
            loader.close()
            bar.close()
        if lead:
            elapsed = time.perf_counter() - started
            logger.info("%d steps in %.0fs (%.3f steps/s), waiting for data %.1f%% of the time", self.step - first_step,
                        elapsed, (self.step - first_step) / max(elapsed, 1e-9), 100 * self.data_wait_fraction)
        return self.losses[first_step:]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
