"""The model a training run trains: built from scratch or loaded from a pretrained root, and exported as a
pipeline root ``DiT4SRPipeline.from_pretrained`` loads."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

from ..models import DiT4SRTransformer2DModel, PixelUnshuffleAutoencoder
from ..models.transformer_dit4sr import WEIGHTS_NAME
from ..parameterization import check_parameterization
from ..prompt_cache import PromptEmbedding, save_null_prompt_embedding
from ..settings import RECOMMENDED_SETTINGS_FILE
from .config import ModelConfig, PromptConfig
from .errors import TrainingInputError

logger = logging.getLogger(__name__)


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
        (root / RECOMMENDED_SETTINGS_FILE).write_text(json.dumps(recommended_settings, indent=2) + "\n")


def build_model(config: ModelConfig, seed: int) -> tuple[DiT4SRTransformer2DModel, Any, PromptEmbedding | None,
                                                         list[str]]:
    """The transformer, autoencoder, null prompt (``None`` when a pretrained root has none) and the names of
    the parameters to train."""
    if config.pretrained:
        from ..pipeline_dit4sr import DiT4SRPipeline

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
    from ..prompt_cache import PromptEmbeddingCache, PromptEncoder

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


def architecture(config) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}
