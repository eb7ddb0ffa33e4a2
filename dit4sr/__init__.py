"""DiT4SR: diffusion-transformer super-resolution (ICCV 2025), diffusers-style.

The model library: it knows nothing of catalogs or manifests (``pipeline``) and imports Ray only inside its
distributed training (``dit4sr.training.distributed``), when that runs.

The public names load on first use (PEP 562), so ``import dit4sr.<module>`` — the command-line tools' ``--help``,
the catalog's storage helpers — does not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "ImageCaptioner": "captioning",
    "OFFICIAL_CAPTION_QUESTION": "captioning",
    "remove_focus_sentences": "captioning",
    "Degradation": "degradation",
    "DegradationConfig": "degradation",
    "DiT4SRTransformer2DModel": "models",
    "DiT4SRTransformerOutput": "models",
    "PixelUnshuffleAutoencoder": "models",
    "BUNDLED_MODEL": "loading",
    "TEXT_COMPONENTS": "loading",
    "SAMPLER_VERSION": "pipeline_dit4sr",
    "DiT4SRPipeline": "pipeline_dit4sr",
    "DiT4SRPipelineOutput": "pipeline_dit4sr",
    "OFFICIAL_ADDED_PROMPT": "settings",
    "OFFICIAL_NEGATIVE_PROMPT": "settings",
    "OFFICIAL_SETTINGS": "settings",
    "compose_prompt": "settings",
    "effective_settings": "settings",
    "read_recommended_settings": "settings",
    "PromptEmbedding": "prompt_cache",
    "PromptEmbeddingCache": "prompt_cache",
    "PromptEncoder": "prompt_cache",
}

__all__ = [
    "BUNDLED_MODEL",
    "OFFICIAL_ADDED_PROMPT",
    "OFFICIAL_CAPTION_QUESTION",
    "OFFICIAL_NEGATIVE_PROMPT",
    "OFFICIAL_SETTINGS",
    "SAMPLER_VERSION",
    "TEXT_COMPONENTS",
    "Degradation",
    "DegradationConfig",
    "DiT4SRPipeline",
    "DiT4SRPipelineOutput",
    "ImageCaptioner",
    "PromptEmbedding",
    "PromptEmbeddingCache",
    "PromptEncoder",
    "compose_prompt",
    "effective_settings",
    "read_recommended_settings",
    "remove_focus_sentences",
    "DiT4SRTransformer2DModel",
    "DiT4SRTransformerOutput",
    "PixelUnshuffleAutoencoder",
    "__version__",
]

if TYPE_CHECKING:
    from .captioning import OFFICIAL_CAPTION_QUESTION, ImageCaptioner, remove_focus_sentences
    from .degradation import Degradation, DegradationConfig
    from .loading import BUNDLED_MODEL, TEXT_COMPONENTS
    from .models import DiT4SRTransformer2DModel, DiT4SRTransformerOutput, PixelUnshuffleAutoencoder
    from .pipeline_dit4sr import SAMPLER_VERSION, DiT4SRPipeline, DiT4SRPipelineOutput
    from .prompt_cache import PromptEmbedding, PromptEmbeddingCache, PromptEncoder
    from .settings import (
        OFFICIAL_ADDED_PROMPT,
        OFFICIAL_NEGATIVE_PROMPT,
        OFFICIAL_SETTINGS,
        compose_prompt,
        effective_settings,
        read_recommended_settings,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
