"""Where an image's pixels go through the sampler: its bicubic resizes, its latent size and its tile grid.

One function owns this so that every caller agrees with what ``DiT4SRPipeline`` will actually run — the
pipeline itself, and planners that estimate cost from image headers without loading weights (the catalog's
dry run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .tiling import TileGrid, plan_tiles


@dataclass(frozen=True)
class SamplingGeometry:
    resizes: tuple[tuple[int, int], ...]  # bicubic targets (height, width); the last is the model's working size
    latent_height: int
    latent_width: int
    grid: TileGrid

    @property
    def tiles(self) -> int:
        return len(self.grid)


def resize_plan(height: int, width: int, upscale: float, process_size: int, vae_scale_factor: int,
                patch_size: int) -> tuple[tuple[int, int], ...]:
    """The official sequence of bicubic resizes: short side raised to ``process_size // upscale`` when smaller
    (and never below one latent patch), times ``upscale``, rounded down to the VAE factor."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    min_side = max(process_size // upscale, math.ceil(vae_scale_factor * patch_size / upscale))
    plan = []
    if min(height, width) < min_side:
        scale = min_side / min(height, width)
        height, width = int(scale * height), int(scale * width)
        plan.append((height, width))
    height, width = int(height * upscale), int(width * upscale)
    plan += [(height, width), (height // vae_scale_factor * vae_scale_factor,
                               width // vae_scale_factor * vae_scale_factor)]
    return tuple(plan)


def plan_geometry(height: int, width: int, *, upscale: float, process_size: int, vae_scale_factor: int,
                  patch_size: int, tile_size: int | tuple[int, int], tile_overlap: int | tuple[int, int],
                  max_latent_side: int | None = None) -> SamplingGeometry:
    """Resizes, latent size and tile grid for a ``height x width`` input (``max_latent_side``: the transformer's
    positional-embedding extent in latent pixels)."""
    resizes = resize_plan(height, width, upscale, process_size, vae_scale_factor, patch_size)
    work_height, work_width = resizes[-1]
    latent_height, latent_width = work_height // vae_scale_factor, work_width // vae_scale_factor
    grid = plan_tiles(latent_height, latent_width, tile_size, tile_overlap, multiple=patch_size,
                      max_side=max_latent_side)
    return SamplingGeometry(resizes, latent_height, latent_width, grid)
