"""Train or fine-tune DiT4SR: ``python -m dit4sr.train --config FILE [--resume]`` (console: ``dit4sr-train``).

One device: ``--device auto|cpu|cuda[:N]`` and ``--precision auto|fp32|bf16`` (auto = bfloat16 autocast on
GPUs that support it, float32 elsewhere; master weights, optimizer and loss stay float32). Many GPUs (or CPU
processes): ``--num-workers N [--gpus-per-worker 1]`` runs data-parallel (DDP) under Ray Train's
``TorchTrainer`` with checkpoints in Ray Train's storage (``--storage``, any local path or fsspec URL); see
``dit4sr.training.distributed``.

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

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .degradation import Degradation, DegradationConfig
from .models import DiT4SRTransformer2DModel, PixelUnshuffleAutoencoder
from .models.transformer_dit4sr import WEIGHTS_NAME
from .parameterization import check_parameterization, predicted_x0
from .prompt_cache import NULL_EMBEDDING_PATH, PromptEmbedding, save_null_prompt_embedding
from .training import TrainingInputError
from .training.data import Batch, PrefetchingLoader, ShardedPairSource, list_images, read_list

__all__ = ["TrainConfig", "Trainer", "TrainingInputError", "build_model", "list_images", "load_config", "main",
           "read_list", "resolve_precision", "resolve_training_device", "write_pipeline_root"]

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    # A pipeline root (local or fsspec URL) to start from: our layout, or an SD3.5 root (VAE, scheduler)
    # combined with `pretrained_transformer`, a DiT4SR root (the official arrangement).
    pretrained: str | None = None
    pretrained_transformer: str | None = None
    release: str | None = None  # official DiT4SR release of `pretrained_transformer` (see DiT4SRPipeline)
    storage_options: dict[str, Any] = {}  # fsspec options for the model URLs (e.g. an S3 endpoint)
    transformer: dict[str, Any] | None = None  # DiT4SRTransformer2DModel config: train from scratch
    # Which parameters train: "control" (the official fine-tuning; default for `pretrained`) or "all"
    # (default from scratch; with `pretrained`, a warm start that continues training every weight).
    trainable: Literal["control", "all"] | None = None
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass: less memory
    vae_downscale_factor: int = Field(4, ge=1)  # PixelUnshuffleAutoencoder for models trained from scratch
    null_prompt_tokens: int = Field(4, ge=1)
    zero_init_output: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.pretrained is None) == (self.transformer is None):
            raise ValueError("model: give exactly one of 'pretrained' (fine-tune) or 'transformer' (from scratch)")
        if self.pretrained_transformer and not self.pretrained:
            raise ValueError("model.pretrained_transformer needs model.pretrained (the SD3.5 root)")
        if self.transformer is not None and self.trainable == "control":
            raise ValueError("model.trainable 'control' needs a 'pretrained' model: a model built from "
                             "'transformer' has no pretrained base weights to keep")
        return self


class DataConfig(_Strict):
    roots: list[str]
    holdout_list: str | None = None  # relative paths (as under a root's parent) never trained on
    degradation: str | None = None  # YAML file with a DegradationConfig; default: bicubic only
    crop_size: int = Field(128, ge=8)
    prompt_embeds: str | None = None  # safetensors with the prompt conditioning; default: the null prompt
    preload: bool = True  # decode the (small) training set once into memory; false: decode per sample
    num_workers: int = Field(2, ge=1)  # threads building batches ahead of the device
    prefetch: int = Field(4, ge=1)  # batches built ahead
    num_shards: int | None = Field(None, ge=1)  # data shards (default: one per worker); see training.data


class PromptConfig(_Strict):
    """SD3.5 conditioning, encoded once by the driver through a ``PromptEmbeddingCache``: workers hold no text
    encoder. With ``encoder_id`` given and both prompts cached, the encoders are not even loaded."""

    text_encoders: str  # an SD3(.5) root with text_encoder{,_2,_3} and tokenizers (local or fsspec URL)
    cache: str  # PromptEmbeddingCache root (local or fsspec URL)
    prompt: str = ""  # the training prompt; null_prompt_prob of the samples get the null ("") prompt
    encoder_id: str | None = None  # PromptEncoder.identity of a previous encoding
    storage_options: dict[str, Any] = {}


class OptimConfig(_Strict):
    max_steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)  # per worker: the global batch is batch_size x workers
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)  # cosine decays to learning_rate * min_lr_ratio
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    null_prompt_prob: float = Field(0.1, ge=0, le=1)


class DistributedConfig(_Strict):
    """Ray Train data-parallel settings (CLI: ``--num-workers``, ``--gpus-per-worker``, ``--storage``)."""

    num_workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    storage: str | None = None  # Ray Train storage (local path or fsspec URL); default: output_dir
    storage_options: dict[str, Any] = {}
    run_name: str = "dit4sr-train"


class TrainConfig(_Strict):
    output_dir: str
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (single-process runs)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_threads: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    export_dtype: str = "float32"  # dtype of the weights in exported pipeline roots (float16 halves the size)
    recommended_settings: dict[str, Any] = {}  # written to each exported root's recommended_settings.json
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    prompts: PromptConfig | None = None
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        """Paths inside the file are relative to the file's directory unless absolute or URLs."""
        path = Path(path)
        if not path.is_file():
            raise TrainingInputError(f"training config {path} does not exist")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise TrainingInputError(f"training config {path} is not valid YAML: {error}") from None
        try:
            config = cls.model_validate(raw)
        except ValidationError as error:
            raise TrainingInputError(describe_validation_error(path, error)) from None
        base = path.parent

        def resolve(p: str | None) -> str | None:
            return p if p is None or "://" in p else str((base / p).resolve())

        config.output_dir = resolve(config.output_dir)
        config.data.roots = [resolve(r) for r in config.data.roots]
        config.data.holdout_list = resolve(config.data.holdout_list)
        config.data.degradation = resolve(config.data.degradation)
        config.data.prompt_embeds = resolve(config.data.prompt_embeds)
        config.model.pretrained = resolve(config.model.pretrained)
        config.model.pretrained_transformer = resolve(config.model.pretrained_transformer)
        if config.prompts:
            config.prompts.text_encoders = resolve(config.prompts.text_encoders)
            config.prompts.cache = resolve(config.prompts.cache)
        config.distributed.storage = resolve(config.distributed.storage)
        return config


def describe_validation_error(path: Path, error: ValidationError) -> str:
    """One line per problem, naming the key: unknown keys, missing keys, bad values."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif item["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:
            lines.append(f"'{key}': {item['msg']}")
    return f"training config {path}: " + "; ".join(lines)


def load_config(path: str | os.PathLike) -> TrainConfig:
    return TrainConfig.from_yaml(path)


# -- device and precision ------------------------------------------------------------------------
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


# -- model roots ---------------------------------------------------------------------------------
def write_pipeline_root(
    root: str | os.PathLike,
    transformer: DiT4SRTransformer2DModel,
    vae: PixelUnshuffleAutoencoder,
    null_prompt: PromptEmbedding,
    dtype: torch.dtype,
    recommended_settings: dict[str, Any] | None = None,
) -> None:
    """A folder ``DiT4SRPipeline.from_pretrained`` loads (weights cast to ``dtype``)."""
    import diffusers

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # The diffusers layout written directly: casting the module with .to() would touch the live model.
    (root / "transformer").mkdir(exist_ok=True)
    transformer.save_config(root / "transformer")
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in transformer.state_dict().items()},
              str(root / "transformer" / WEIGHTS_NAME), metadata={"format": "pt"})
    vae.save_pretrained(root / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(root / "scheduler")
    save_null_prompt_embedding(str(root), null_prompt)
    model_index = {
        "_class_name": "DiT4SRPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["dit4sr", "DiT4SRTransformer2DModel"],
        "vae": [type(vae).__module__.split(".")[0], type(vae).__name__],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    if recommended_settings:
        from .settings import RECOMMENDED_SETTINGS_FILE

        (root / RECOMMENDED_SETTINGS_FILE).write_text(json.dumps(recommended_settings, indent=2) + "\n")


def build_model(config: ModelConfig, seed: int) -> tuple[DiT4SRTransformer2DModel, Any, PromptEmbedding | None,
                                                         list[str]]:
    """The transformer, autoencoder, null prompt (``None`` when a pretrained root has none) and the names of
    the parameters to train."""
    if config.pretrained:
        from .pipeline_dit4sr import DiT4SRPipeline

        # Unfused: the fused control maps are frozen inference buffers that training would bypass.
        pipe = DiT4SRPipeline.from_pretrained(
            config.pretrained, transformer=config.pretrained_transformer, release=config.release,
            torch_dtype=torch.float32, device="cpu", storage_options=config.storage_options or None,
            fuse_control_projections=False)
        transformer, vae, null_prompt = pipe.transformer, pipe.vae, pipe.null_prompt_embedding
        only_control = config.trainable in (None, "control")
        trainable = [n for n, _ in transformer.named_parameters() if "control" in n or not only_control]
    else:
        torch.manual_seed(seed)
        transformer = DiT4SRTransformer2DModel.from_config(config.transformer)
        vae = PixelUnshuffleAutoencoder(downscale_factor=config.vae_downscale_factor)
        if transformer.config.in_channels != vae.latent_channels:
            raise TrainingInputError(f"transformer in_channels {transformer.config.in_channels} != autoencoder "
                                     f"latent channels {vae.latent_channels}")
        if config.zero_init_output:
            # The first prediction is then exactly x0 = LR (residual) or 0: a stable starting point.
            torch.nn.init.zeros_(transformer.proj_out.weight)
            torch.nn.init.zeros_(transformer.proj_out.bias)
        cfg = transformer.config
        # A model without a text encoder is conditioned on one fixed (all-zero) "null prompt".
        null_prompt = PromptEmbedding(torch.zeros(config.null_prompt_tokens, cfg.joint_attention_dim),
                                      torch.zeros(cfg.pooled_projection_dim))
        trainable = [n for n, _ in transformer.named_parameters()]
    check_parameterization(transformer.config.prediction_type, transformer.config.lr_residual)
    vae.requires_grad_(False)
    return transformer.float().train(), vae.float().eval(), null_prompt, trainable


def resolve_prompt_embeddings(config: PromptConfig) -> tuple[PromptEmbedding, PromptEmbedding]:
    """(training prompt, null prompt "") from the cache, encoding whichever is missing (driver side only)."""
    from .prompt_cache import PromptEmbeddingCache, PromptEncoder

    cache = PromptEmbeddingCache(config.cache, config.storage_options or None)
    texts = [config.prompt, ""]
    if config.encoder_id:
        found = [cache.get(text, config.encoder_id) for text in texts]
        if all(e is not None for e in found):
            return found[0], found[1]
    with PromptEncoder.from_pretrained(config.text_encoders, torch_dtype=torch.float32,
                                       storage_options=config.storage_options or None) as encoder:
        if config.encoder_id and config.encoder_id != encoder.identity:
            raise TrainingInputError(f"prompts.encoder_id {config.encoder_id} does not match the text encoders "
                                     f"in {config.text_encoders} ({encoder.identity})")
        embeddings = cache.encode_missing(texts, encoder)
        logger.info("prompt embeddings for encoder %s in %s", encoder.identity, config.cache)
    return embeddings[config.prompt], embeddings[""]


def _architecture(config) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


# -- training ------------------------------------------------------------------------------------
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
        ours, theirs = _architecture(self.transformer.config), _architecture(saved_config)
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _run(args, parser)
    except TrainingInputError as error:
        print(f"dit4sr-train: error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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
        from .training.distributed import train_distributed

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
