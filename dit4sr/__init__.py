"""DiT4SR: diffusion-transformer super-resolution (ICCV 2025), diffusers-style. No Ray, no buckets."""

from .degradation import Degradation, DegradationConfig
from .models import DiT4SRTransformer2DModel, DiT4SRTransformerOutput, PixelUnshuffleAutoencoder
from .pipeline_dit4sr import (
    BUNDLED_MODEL,
    OFFICIAL_ADDED_PROMPT,
    OFFICIAL_NEGATIVE_PROMPT,
    OFFICIAL_SETTINGS,
    SAMPLER_VERSION,
    DiT4SRPipeline,
    DiT4SRPipelineOutput,
    compose_prompt,
)
from .prompt_cache import PromptEmbedding, PromptEmbeddingCache, PromptEncoder

__version__ = "0.1.0"

__all__ = [
    "BUNDLED_MODEL",
    "OFFICIAL_ADDED_PROMPT",
    "OFFICIAL_NEGATIVE_PROMPT",
    "OFFICIAL_SETTINGS",
    "SAMPLER_VERSION",
    "Degradation",
    "DegradationConfig",
    "DiT4SRPipeline",
    "DiT4SRPipelineOutput",
    "PromptEmbedding",
    "PromptEmbeddingCache",
    "PromptEncoder",
    "compose_prompt",
    "DiT4SRTransformer2DModel",
    "DiT4SRTransformerOutput",
    "PixelUnshuffleAutoencoder",
    "__version__",
]
