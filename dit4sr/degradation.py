"""LR/HR pair synthesis for training: plain bicubic, or a Real-ESRGAN-style second-order degradation.

The second-order model (Wang et al., "Real-ESRGAN", 2021) applies two rounds of
blur -> random resize -> Gaussian/Poisson noise -> JPEG, then resizes to the target LR size. This
implementation covers its isotropic/anisotropic Gaussian, generalised Gaussian and plateau kernels and
its sinc filter (an ideal circular low-pass: the ringing and overshoot artefacts of sharpened and
resampled images), both as a blur kernel of a stage (``sinc_prob``) and as the final filter applied
with the last resize (``final_sinc_prob``). Every random draw comes from the ``numpy`` generator
passed in, so a pair is a pure function of (HR image, generator state, config).
"""

from __future__ import annotations

import io
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

KernelType = Literal["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
ResizeMode = Literal["area", "bilinear", "bicubic"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_range(value: tuple[float, float], name: str) -> None:
    if value[0] > value[1]:
        raise ValueError(f"{name}: lower bound {value[0]} exceeds upper bound {value[1]}")


class StageConfig(_Strict):
    """One round of blur, resize, noise and JPEG (the ranges of Real-ESRGAN's defaults)."""

    blur_prob: float = Field(1.0, ge=0, le=1)
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[KernelType, ...] = ("iso", "aniso", "generalized_iso", "generalized_aniso",
                                            "plateau_iso", "plateau_aniso")
    kernel_type_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    generalized_beta: tuple[float, float] = (0.5, 4.0)
    plateau_beta: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[ResizeMode, ...] = ("area", "bilinear", "bicubic")
    gaussian_noise_prob: float = Field(0.5, ge=0, le=1)  # otherwise Poisson
    noise_sigma: tuple[float, float] = (1.0, 30.0)  # on the 0..255 scale
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = Field(0.4, ge=0, le=1)
    jpeg_quality: tuple[int, int] = (30, 95)
    sinc_prob: float = Field(0.1, ge=0, le=1)  # of the blurs, the share that is a sinc filter

    @model_validator(mode="after")
    def _validate(self) -> StageConfig:
        if any(k % 2 == 0 or k < 3 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd and >= 3, got {self.kernel_sizes}")
        if len(self.kernel_types) != len(self.kernel_type_probs) or not math.isclose(sum(self.kernel_type_probs), 1):
            raise ValueError("kernel_type_probs must give one probability per kernel type, summing to 1")
        if not math.isclose(sum(self.resize_probs), 1):
            raise ValueError("resize_probs (up, down, keep) must sum to 1")
        for name in ("blur_sigma", "generalized_beta", "plateau_beta", "resize_range", "noise_sigma",
                     "poisson_scale", "jpeg_quality"):
            _check_range(getattr(self, name), name)
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in 1..100, got {self.jpeg_quality}")
        return self


class DegradationConfig(_Strict):
    """``realistic_prob`` of the pairs get the second-order degradation, the rest plain bicubic downscaling."""

    scale: int = Field(4, ge=1)
    realistic_prob: float = Field(0.0, ge=0, le=1)
    final_sinc_prob: float = Field(0.8, ge=0, le=1)  # a sinc filter with the final resize (Real-ESRGAN: 0.8)
    first: StageConfig = StageConfig()
    second: StageConfig = StageConfig(
        blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
        noise_sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5), jpeg_quality=(30, 95),
    )

    @classmethod
    def from_yaml(cls, path: str) -> DegradationConfig:
        with open(path) as f:
            return cls.model_validate(yaml.safe_load(f) or {})


def bicubic_downscale(image: Image.Image, scale: int) -> Image.Image:
    """Antialiased bicubic (a = -0.5, as MATLAB ``imresize``): the standard LR of SR benchmarks."""
    width, height = image.size
    if width % scale or height % scale:
        raise ValueError(f"image size {width}x{height} is not divisible by the scale {scale}")
    return image.resize((width // scale, height // scale), Image.BICUBIC)


def bicubic_upscale(image: Image.Image, scale: int) -> Image.Image:
    """The LR image the transformer is conditioned on: bicubic-upscaled to the output size (as in DiT4SR)."""
    return image.resize((image.width * scale, image.height * scale), Image.BICUBIC)


# -- kernels -----------------------------------------------------------------------------------
def _mahalanobis(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """``d^T Sigma^-1 d`` over a ``size x size`` grid for a Gaussian rotated by ``theta``."""
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    covariance = rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T
    radius = size // 2
    ax = np.arange(-radius, radius + 1, dtype=np.float64)
    grid = np.stack(np.meshgrid(ax, ax, indexing="xy"), axis=-1)
    return np.einsum("...i,ij,...j->...", grid, np.linalg.inv(covariance), grid)


def random_kernel(stage: StageConfig, rng: np.random.Generator) -> np.ndarray:
    """A normalised blur kernel of a random type, size, spread and orientation (float32, sums to 1)."""
    kind = stage.kernel_types[rng.choice(len(stage.kernel_types), p=stage.kernel_type_probs)]
    size = int(rng.choice(stage.kernel_sizes))
    sigma_x = rng.uniform(*stage.blur_sigma)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y, theta = rng.uniform(*stage.blur_sigma), rng.uniform(-math.pi, math.pi)
    distance = _mahalanobis(size, sigma_x, sigma_y, theta)
    if kind.startswith("generalized"):
        kernel = np.exp(-0.5 * distance ** rng.uniform(*stage.generalized_beta))
    elif kind.startswith("plateau"):
        kernel = 1.0 / (1.0 + distance ** rng.uniform(*stage.plateau_beta))
    else:
        kernel = np.exp(-0.5 * distance)
    return (kernel / kernel.sum()).astype(np.float32)


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Ideal circular low-pass of angular ``cutoff`` (radians/pixel, up to pi): ``c J1(c r) / (2 pi r)``,
    normalised (float32, sums to 1). Its negative side lobes are what make ringing."""
    if size % 2 == 0 or size < 3:
        raise ValueError(f"sinc kernel size must be odd and >= 3, got {size}")
    if not 0 < cutoff <= math.pi:
        raise ValueError(f"sinc cutoff must lie in (0, pi], got {cutoff}")
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    r = torch.hypot(ax[None, :], ax[:, None])
    kernel = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r.clamp_min(1e-12))
    kernel[size // 2, size // 2] = cutoff**2 / (4 * math.pi)  # the limit at r = 0
    return (kernel / kernel.sum()).numpy().astype(np.float32)


def random_sinc_kernel(kernel_sizes: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Real-ESRGAN's draw: small kernels cut off in [pi/3, pi], large ones (>= 13) down to pi/5."""
    size = int(rng.choice(kernel_sizes))
    low = math.pi / 3 if size < 13 else math.pi / 5
    return sinc_kernel(size, rng.uniform(low, math.pi))


# -- stage operations on (3, H, W) float tensors in [0, 1] ---------------------------------------
def _blur(image: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    pad = kernel.shape[0] // 2
    weight = torch.from_numpy(kernel)[None, None].expand(3, 1, *kernel.shape)
    mode = "reflect" if pad < min(image.shape[-2:]) else "replicate"
    return F.conv2d(F.pad(image[None], (pad,) * 4, mode=mode), weight, groups=3)[0]


def _resize(image: torch.Tensor, size: tuple[int, int], mode: ResizeMode) -> torch.Tensor:
    if mode == "area":
        return F.interpolate(image[None], size=size, mode="area")[0]
    return F.interpolate(image[None], size=size, mode=mode, align_corners=False, antialias=True)[0]


def _noise(image: torch.Tensor, stage: StageConfig, rng: np.random.Generator) -> torch.Tensor:
    gray = rng.uniform() < stage.gray_noise_prob
    shape = (1, *image.shape[1:]) if gray else image.shape
    if rng.uniform() < stage.gaussian_noise_prob:
        noise = rng.standard_normal(shape, dtype=np.float32) * (rng.uniform(*stage.noise_sigma) / 255.0)
    else:
        # Shot noise: counts ~ Poisson(intensity * levels); levels set by the number of distinct values.
        source = image.mean(0, keepdim=True) if gray else image
        clipped = source.clamp(0, 1).numpy()
        levels = 2 ** np.ceil(np.log2(len(np.unique(np.round(clipped * 255))))) if clipped.size else 1.0
        shot = rng.poisson(clipped * levels).astype(np.float32) / levels
        noise = (shot - clipped) * rng.uniform(*stage.poisson_scale)
    return image + torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32))


def _jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return _to_tensor(Image.open(buffer).convert("RGB"))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


class Degradation:
    """``Degradation(config)(hr, rng)`` -> the LR image (``hr`` size divided by ``config.scale``)."""

    def __init__(self, config: DegradationConfig):
        self.config = config

    def __call__(self, hr: Image.Image, rng: np.random.Generator) -> Image.Image:
        if hr.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {hr.mode!r}")
        if rng.uniform() >= self.config.realistic_prob:
            return bicubic_downscale(hr, self.config.scale)
        return self.second_order(hr, rng)

    def second_order(self, hr: Image.Image, rng: np.random.Generator) -> Image.Image:
        cfg = self.config
        if hr.width % cfg.scale or hr.height % cfg.scale:
            raise ValueError(f"image size {hr.width}x{hr.height} is not divisible by the scale {cfg.scale}")
        target = (hr.height // cfg.scale, hr.width // cfg.scale)
        image = _to_tensor(hr)
        image = self._stage(image, cfg.first, rng, reference=hr.size[::-1], scale=1.0)
        image = self._stage(image, cfg.second, rng, reference=hr.size[::-1], scale=1.0 / cfg.scale, jpeg=False)
        # As in Real-ESRGAN, the final resize-to-target and the last JPEG come in random order.
        final_mode = cfg.second.resize_modes[rng.choice(len(cfg.second.resize_modes))]
        quality = int(rng.integers(cfg.second.jpeg_quality[0], cfg.second.jpeg_quality[1] + 1))
        final_sinc = (random_sinc_kernel(cfg.second.kernel_sizes, rng) if rng.uniform() < cfg.final_sinc_prob
                      else None)

        def resize_and_filter(x: torch.Tensor) -> torch.Tensor:
            x = _resize(x, target, final_mode)
            return x if final_sinc is None else _blur(x, final_sinc)

        if rng.uniform() < 0.5:
            image = _jpeg(resize_and_filter(image.clamp(0, 1)).clamp(0, 1), quality)
        else:
            image = resize_and_filter(_jpeg(image.clamp(0, 1), quality))
        return _to_pil(image)

    @staticmethod
    def _stage(
        image: torch.Tensor,
        stage: StageConfig,
        rng: np.random.Generator,
        reference: tuple[int, int],
        scale: float,
        jpeg: bool = True,
    ) -> torch.Tensor:
        """Blur, resize (relative to ``reference * scale``), add noise, optionally JPEG."""
        if rng.uniform() < stage.blur_prob:
            sinc = rng.uniform() < stage.sinc_prob
            image = _blur(image, random_sinc_kernel(stage.kernel_sizes, rng) if sinc else random_kernel(stage, rng))
        direction = rng.choice(3, p=stage.resize_probs)
        factor = (rng.uniform(1.0, stage.resize_range[1]) if direction == 0
                  else rng.uniform(stage.resize_range[0], 1.0) if direction == 1 else 1.0)
        size = tuple(max(1, round(side * scale * factor)) for side in reference)
        if size != tuple(image.shape[-2:]):
            image = _resize(image, size, stage.resize_modes[rng.choice(len(stage.resize_modes))])
        image = _noise(image, stage, rng).clamp(0, 1)
        if jpeg:
            image = _jpeg(image, int(rng.integers(stage.jpeg_quality[0], stage.jpeg_quality[1] + 1)))
        return image
