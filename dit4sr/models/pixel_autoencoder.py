"""``PixelUnshuffleAutoencoder``: a lossless, parameter-free stand-in for a VAE, for small pixel-space models.

It maps an RGB image in [-1, 1] to a "latent" by pixel-unshuffle (space-to-depth) and back by
pixel-shuffle, behind the same interface the pipeline uses for ``AutoencoderKL``
(``encode(x).latent_dist.{mean,mode(),sample()}``, ``decode(z).sample``, ``config.scaling_factor``,
``config.shift_factor``, ``config.latent_channels``). Every output pixel depends only on its own
latent position, so it runs on any size without tiling and without seams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


class _DeterministicLatent:
    """Quacks like ``DiagonalGaussianDistribution`` with zero variance."""

    def __init__(self, latent: torch.Tensor):
        self.mean = latent

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


@dataclass
class PixelEncoderOutput(BaseOutput):
    latent_dist: _DeterministicLatent


@dataclass
class PixelDecoderOutput(BaseOutput):
    sample: torch.Tensor


class PixelUnshuffleAutoencoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        downscale_factor: int = 4,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        # A parameterless module still needs a tensor to carry its device and dtype.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.downscale_factor**2

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        factor = self.config.downscale_factor
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the downscale factor {factor}")
        latent = _DeterministicLatent(F.pixel_unshuffle(x, factor))
        return PixelEncoderOutput(latent_dist=latent) if return_dict else (latent,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        sample = F.pixel_shuffle(z, self.config.downscale_factor)
        return PixelDecoderOutput(sample=sample) if return_dict else (sample,)
