"""The training configuration: a YAML file validated by pydantic (unknown keys and bad values are named)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..validation import validation_problems
from .errors import TrainingInputError


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
            problems = "; ".join(validation_problems(error))
            raise TrainingInputError(f"training config {path}: {problems}") from None
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


def load_config(path: str | os.PathLike) -> TrainConfig:
    return TrainConfig.from_yaml(path)
