"""DiT4SR: diffusion-transformer super-resolution (ICCV 2025), diffusers-style. No Ray, no buckets."""

from .models import DiT4SRTransformer2DModel, DiT4SRTransformerOutput, PixelUnshuffleAutoencoder

__version__ = "0.1.0"

__all__ = [
    "DiT4SRTransformer2DModel",
    "DiT4SRTransformerOutput",
    "PixelUnshuffleAutoencoder",
    "__version__",
]
