"""Train or fine-tune DiT4SR: ``python -m dit4sr.train --config FILE [--resume]`` (console: ``dit4sr-train``).

The objective is the official one: flow matching (``x_t = (1 - sigma) x0 + sigma noise``) with
logit-normal ``sigma``, the network output turned into an x0 estimate by
``dit4sr.parameterization.predicted_x0`` (the same definition every sampler uses) and an MSE against
x0; AdamW with gradient clipping; prompt embeddings replaced by the null prompt with probability
``null_prompt_prob``. Starting from a pretrained model (``model.pretrained``) only parameters whose
names contain ``control`` train; a model built from ``model.transformer`` trains everything.

Reproducibility: the batch, noise and timesteps of step ``k`` come from generators seeded with
``(seed, k)``, so a resumed run needs only the weights, optimizer, EMA and step to continue exactly.
Every checkpoint is a complete pipeline root (``model_index.json``, ``transformer/`` with the EMA
weights, ``vae/``, ``scheduler/``, ``prompt_embeds/``) plus ``training_state/`` for resuming.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .degradation import Degradation, DegradationConfig, bicubic_upscale
from .image_processing import IMAGE_SUFFIXES
from .models import DiT4SRTransformer2DModel, PixelUnshuffleAutoencoder
from .models.transformer_dit4sr import WEIGHTS_NAME
from .parameterization import check_parameterization, predicted_x0
from .prompt_cache import NULL_EMBEDDING_PATH, PromptEmbedding, save_null_prompt_embedding

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    pretrained: str | None = None  # a pipeline root (transformer/, vae/, prompt_embeds/): fine-tune control params
    transformer: dict[str, Any] | None = None  # DiT4SRTransformer2DModel config: train from scratch
    vae_downscale_factor: int = Field(4, ge=1)  # PixelUnshuffleAutoencoder for models trained from scratch
    null_prompt_tokens: int = Field(4, ge=1)
    zero_init_output: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.pretrained is None) == (self.transformer is None):
            raise ValueError("model: give exactly one of 'pretrained' (fine-tune) or 'transformer' (from scratch)")
        return self


class DataConfig(_Strict):
    roots: list[str]
    holdout_list: str | None = None  # relative paths (as under a root's parent) never trained on
    degradation: str | None = None  # YAML file with a DegradationConfig; default: bicubic only
    crop_size: int = Field(128, ge=8)
    prompt_embeds: str | None = None  # safetensors with the prompt conditioning; default: the null prompt


class OptimConfig(_Strict):
    max_steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)
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


class TrainConfig(_Strict):
    output_dir: str
    seed: int = 0
    num_threads: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    export_dtype: str = "float32"  # dtype of the weights in exported pipeline roots (float16 halves the size)
    recommended_settings: dict[str, Any] = {}  # written to each exported root's recommended_settings.json
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        """Paths inside the file are relative to the file's directory unless absolute."""
        path = Path(path)
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        config = cls.model_validate(raw)
        base = path.parent

        def resolve(p: str | None) -> str | None:
            return None if p is None or "://" in p else str((base / p).resolve())

        config.output_dir = resolve(config.output_dir)
        config.data.roots = [resolve(r) for r in config.data.roots]
        config.data.holdout_list = resolve(config.data.holdout_list)
        config.data.degradation = resolve(config.data.degradation)
        config.data.prompt_embeds = resolve(config.data.prompt_embeds)
        config.model.pretrained = resolve(config.model.pretrained)
        return config


# -- data ----------------------------------------------------------------------------------------
def read_list(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def list_images(roots: list[str], exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``(key, path)`` for each image under the roots, key = ``<root name>/<relative path>``, sorted."""
    found = []
    for root in roots:
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"training data root {root} is not a directory")
        for path in sorted(root_path.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                key = f"{root_path.name}/{path.relative_to(root_path).as_posix()}"
                if key not in exclude:
                    found.append((key, str(path)))
    return sorted(found)


class PairSampler:
    """Random HR crops (flips and 90-degree turns) with their degraded, bicubic-upscaled LR, in [-1, 1]."""

    def __init__(self, images: list[Image.Image], crop_size: int, degradation: Degradation):
        scale = degradation.config.scale
        if crop_size % scale:
            raise ValueError(f"crop_size {crop_size} is not divisible by the scale {scale}")
        small = [i for i, im in enumerate(images) if min(im.size) < crop_size]
        if small:
            raise ValueError(f"{len(small)} training images are smaller than crop_size {crop_size}")
        if not images:
            raise ValueError("no training images")
        self.images = images
        self.crop_size = crop_size
        self.degradation = degradation

    def batch(self, batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        hr, lr = [], []
        scale = self.degradation.config.scale
        for _ in range(batch_size):
            image = self.images[rng.integers(len(self.images))]
            left = int(rng.integers(image.width - self.crop_size + 1))
            top = int(rng.integers(image.height - self.crop_size + 1))
            crop = image.crop((left, top, left + self.crop_size, top + self.crop_size))
            for _turn in range(int(rng.integers(4))):
                crop = crop.transpose(Image.Transpose.ROTATE_90)
            if rng.uniform() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            hr.append(_to_unit_tensor(crop))
            lr.append(_to_unit_tensor(bicubic_upscale(self.degradation(crop, rng), scale)))
        return torch.stack(hr), torch.stack(lr)


def _to_unit_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


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
    save_file({k: v.detach().to(dtype).contiguous() for k, v in transformer.state_dict().items()},
              str(root / "transformer" / WEIGHTS_NAME), metadata={"format": "pt"})
    vae.save_pretrained(root / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(root / "scheduler")
    save_null_prompt_embedding(str(root), null_prompt)
    model_index = {
        "_class_name": "DiT4SRPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["dit4sr", "DiT4SRTransformer2DModel"],
        "vae": ["dit4sr", "PixelUnshuffleAutoencoder"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    if recommended_settings:
        from .pipeline_dit4sr import RECOMMENDED_SETTINGS_FILE

        (root / RECOMMENDED_SETTINGS_FILE).write_text(json.dumps(recommended_settings, indent=2) + "\n")


def build_model(config: ModelConfig, seed: int) -> tuple[DiT4SRTransformer2DModel, PixelUnshuffleAutoencoder,
                                                         PromptEmbedding, list[str]]:
    """The transformer, autoencoder, null prompt and the names of the parameters to train."""
    if config.pretrained:
        from .pipeline_dit4sr import DiT4SRPipeline

        pipe = DiT4SRPipeline.from_pretrained(config.pretrained, torch_dtype=torch.float32, device="cpu")
        transformer, vae, null_prompt = pipe.transformer, pipe.vae, pipe.null_prompt_embedding
        if null_prompt is None:
            raise FileNotFoundError(f"{config.pretrained} has no null-prompt embedding ({NULL_EMBEDDING_PATH})")
        trainable = [n for n, _ in transformer.named_parameters() if "control" in n]
    else:
        torch.manual_seed(seed)
        transformer = DiT4SRTransformer2DModel.from_config(config.transformer)
        vae = PixelUnshuffleAutoencoder(downscale_factor=config.vae_downscale_factor)
        if transformer.config.in_channels != vae.latent_channels:
            raise ValueError(f"transformer in_channels {transformer.config.in_channels} != autoencoder latent "
                             f"channels {vae.latent_channels}")
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
    return transformer.float().train(), vae, null_prompt, trainable


def encode(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Latents as the official trainer makes them (a posterior sample), scaled like the pipeline's."""
    latent = vae.encode(images).latent_dist.sample(generator=generator)
    return (latent - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor


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
    def __init__(self, config: TrainConfig):
        self.config = config
        self.transformer, self.vae, self.null_prompt, trainable = build_model(config.model, config.seed)
        names = set(trainable)
        for name, param in self.transformer.named_parameters():
            param.requires_grad_(name in names)
        self.params = [p for n, p in self.transformer.named_parameters() if n in names]
        self.ema = [p.detach().clone() for p in self.params]
        optim = config.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.learning_rate, betas=optim.betas,
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim))
        if config.data.prompt_embeds:
            with open(config.data.prompt_embeds, "rb") as f:
                self.prompt = PromptEmbedding.from_bytes(f.read())
        else:
            self.prompt = self.null_prompt
        self.step = 0

        exclude = set(read_list(config.data.holdout_list)) if config.data.holdout_list else set()
        files = list_images(config.data.roots, exclude)
        degradation = DegradationConfig.from_yaml(config.data.degradation) if config.data.degradation \
            else DegradationConfig()
        # The whole (small) training set is decoded once; batches are cut from memory.
        images = [Image.open(path).convert("RGB") for _, path in files]
        self.sampler = PairSampler(images, config.data.crop_size, Degradation(degradation))
        self.train_files = [key for key, _ in files]
        logger.info("%d training images, %d held out, %d trainable parameters", len(files), len(exclude),
                    sum(p.numel() for p in self.params))

    # -- one step ------------------------------------------------------------------------------
    def _generators(self, step: int) -> tuple[np.random.Generator, torch.Generator]:
        seed = np.random.SeedSequence([self.config.seed, step])
        torch_gen = torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
        return np.random.default_rng(seed), torch_gen

    def loss(self, step: int) -> torch.Tensor:
        optim = self.config.optim
        rng, gen = self._generators(step)
        hr, lr = self.sampler.batch(optim.batch_size, rng)
        x0, lr_latents = encode(self.vae, hr, gen), encode(self.vae, lr, gen)
        batch = x0.shape[0]
        sigma = torch.sigmoid(optim.logit_mean + optim.logit_std * torch.randn(batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        drop = (torch.rand(batch, generator=gen) < optim.null_prompt_prob).view(-1, 1, 1)
        null, cond = self.null_prompt, self.prompt
        prompt = torch.where(drop, null.prompt_embeds.float(), cond.prompt_embeds.float().expand(batch, -1, -1))
        pooled = torch.where(drop.view(-1, 1), null.pooled_prompt_embeds.float(),
                             cond.pooled_prompt_embeds.float().expand(batch, -1))
        cfg = self.transformer.config
        out = self.transformer(noisy, lr_latents, prompt, pooled, sigma * 1000.0).sample
        x0_hat = predicted_x0(out, noisy, lr_latents, sigma, cfg.prediction_type, cfg.lr_residual)
        return torch.nn.functional.mse_loss(x0_hat.float(), x0.float())

    def train_step(self) -> tuple[float, float]:
        loss = self.loss(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        # Warm-up of the EMA decay so early checkpoints are not dominated by the random init.
        decay = min(self.config.optim.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)
        return loss.item(), float(grad_norm)

    # -- checkpoints ---------------------------------------------------------------------------
    def _ema_transformer(self) -> DiT4SRTransformer2DModel:
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.ema)
        ema_model = DiT4SRTransformer2DModel.from_config(self.transformer.config)
        ema_model.load_state_dict(self.transformer.state_dict())
        with torch.no_grad():
            torch._foreach_copy_(self.params, live)
        return ema_model

    def save(self) -> Path:
        out = Path(self.config.output_dir)
        final = out / f"checkpoint-{self.step:07d}"
        staging = out / f".partial-checkpoint-{self.step:07d}"
        shutil.rmtree(staging, ignore_errors=True)
        write_pipeline_root(staging, self._ema_transformer(), self.vae, self.null_prompt,
                            getattr(torch, self.config.export_dtype), self.config.recommended_settings)
        state = staging / STATE_DIR
        state.mkdir()
        self.transformer.save_pretrained(state / "transformer", safe_serialization=True)
        save_file({f"{i:05d}": t.contiguous() for i, t in enumerate(self.ema)}, str(state / "ema.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   state / "optimizer.pt")
        (state / "state.json").write_text(json.dumps({"step": self.step, "seed": self.config.seed,
                                                      "train_files": self.train_files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)  # a checkpoint is visible only once complete
        for old in sorted(out.glob("checkpoint-*"))[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        return final

    def resume(self) -> bool:
        checkpoints = sorted(Path(self.config.output_dir).glob("checkpoint-*"))
        if not checkpoints:
            return False
        state = checkpoints[-1] / STATE_DIR
        weights = load_file(str(state / "transformer" / WEIGHTS_NAME))
        self.transformer.load_checked_state_dict(weights, torch.float32)
        ema = load_file(str(state / "ema.safetensors"))
        with torch.no_grad():
            torch._foreach_copy_(self.ema, [ema[f"{i:05d}"] for i in range(len(self.ema))])
        saved = torch.load(state / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step = json.loads((state / "state.json").read_text())["step"]
        # The schedule follows the current config (max_steps may have been extended), not the saved rate.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.step)
        logger.info("resumed from %s at step %d", checkpoints[-1], self.step)
        return True

    def fit(self, show_progress: bool = True, stop_at: int | None = None) -> list[float]:
        """Train up to ``max_steps`` (or stop, with a checkpoint, after step ``stop_at`` without changing the
        schedule); returns the losses of the steps run in this call."""
        config = self.config
        end = min(config.optim.max_steps, stop_at or config.optim.max_steps)
        losses = []
        bar = tqdm(total=config.optim.max_steps, initial=self.step, disable=not show_progress,
                   desc="train", dynamic_ncols=True)
        started, first_step = time.monotonic(), self.step
        while self.step < end:
            loss, grad_norm = self.train_step()
            losses.append(loss)
            bar.update(1)
            if self.step % config.log_every == 0:
                recent = float(np.mean(losses[-config.log_every:]))
                bar.set_postfix(loss=f"{recent:.5f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                logger.info("step %d loss %.6f grad_norm %.3f lr %.3e elapsed %.0fs", self.step, recent,
                            grad_norm, self.scheduler.get_last_lr()[0], time.monotonic() - started)
            if self.step % config.checkpoint_every == 0 or self.step == end:
                logger.info("saved %s", self.save())
        bar.close()
        logger.info("%d steps in %.0fs", self.step - first_step, time.monotonic() - started)
        return losses


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit4sr-train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training YAML (see configs/train/dit4sr_tiny.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--max-steps", type=int, help="override optim.max_steps (the length of the LR schedule)")
    parser.add_argument("--stop-at", type=int, help="stop after this step (checkpointed), keeping the schedule")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    config = TrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        config.optim.max_steps = args.max_steps
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config)
    if args.resume:
        trainer.resume()
    elif any(Path(config.output_dir).glob("checkpoint-*")):
        parser.error(f"{config.output_dir} already holds checkpoints: pass --resume or choose another output_dir")
    trainer.fit(show_progress=not args.no_progress, stop_at=args.stop_at)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
