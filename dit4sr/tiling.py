"""Latent tile grids, blending weights and whole-image noise for tiled sampling.

The grid follows the official DiT4SR sampler: along each axis tiles start at ``i * (tile - overlap)``
and the last tile is flush with the far edge, so every tile has the same shape and the tiles can be
stacked into one batch. Where the official code needs square tiles (it shrinks them to the short side),
tiles here are ``(tile_h, tile_w)``, each side clipped to the latent. As in the official code, a latent
whose area fits in one tile is processed whole.

Blending weights are the official Gaussian (variance 0.01 on coordinates normalised by the tile side).
The official weights put the vertical centre at ``h / 2`` but the horizontal one at ``(w - 1) / 2``;
``"official"`` reproduces that, ``"symmetric"`` centres both at ``(side - 1) / 2``.

Noise is drawn once for the whole latent from a CPU ``torch.Generator`` seeded with ``seed`` and then
sliced, so a tile's noise depends only on the seed and its position in the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

GAUSSIAN_VARIANCE = 0.01
TILE_WEIGHTINGS = ("official", "symmetric")


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def axis_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: ``0, s, 2s, ...`` with ``s = tile - overlap``, the last at ``size - tile``."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    count = 1 + math.ceil((size - tile) / stride)
    return [i * stride for i in range(count - 1)] + [size - tile]


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile_height: int
    tile_width: int
    offsets: tuple[tuple[int, int], ...]  # (top, left) of each tile, row-major

    def __len__(self) -> int:
        return len(self.offsets)

    def slices(self, index: int) -> tuple[slice, slice]:
        top, left = self.offsets[index]
        return slice(top, top + self.tile_height), slice(left, left + self.tile_width)


def plan_tiles(
    height: int,
    width: int,
    tile_size: int | tuple[int, int],
    tile_overlap: int | tuple[int, int],
    multiple: int = 1,
    max_side: int | None = None,
) -> TileGrid:
    """Tile grid for a ``height x width`` latent.

    ``multiple``: tile sides must divide by it (the transformer's patch size). ``max_side``: the largest
    side the model accepts (its positional-embedding extent); a latent is only processed whole if both
    sides fit. Raises ``ValueError`` for overlaps not smaller than the tile or tiles the model cannot take.
    """
    tile_h, tile_w = _pair(tile_size, "tile_size")
    overlap_h, overlap_w = _pair(tile_overlap, "tile_overlap")
    if height < 1 or width < 1:
        raise ValueError(f"latent size must be positive, got {height}x{width}")
    if min(tile_h, tile_w) < 1 or min(overlap_h, overlap_w) < 0:
        raise ValueError(f"tile_size must be positive and tile_overlap non-negative, got {tile_size}, {tile_overlap}")
    if overlap_h >= tile_h or overlap_w >= tile_w:
        raise ValueError(f"tile_overlap {tile_overlap} must be smaller than tile_size {tile_size}")
    if tile_h % multiple or tile_w % multiple:
        raise ValueError(f"tile_size {tile_size} must be a multiple of the transformer patch size {multiple}")
    if max_side is not None and max(tile_h, tile_w) > max_side:
        raise ValueError(f"tile_size {tile_size} exceeds the {max_side} latent pixels the transformer's "
                         "positional embedding covers")

    whole_fits = (
        height * width <= tile_h * tile_w
        and height % multiple == 0 and width % multiple == 0
        and (max_side is None or max(height, width) <= max_side)
    )
    if whole_fits:
        return TileGrid(height, width, height, width, ((0, 0),))

    def clip(size: int, tile: int) -> int:
        if tile <= size:
            return tile
        clipped = size - size % multiple
        if clipped == 0:
            raise ValueError(f"latent side {size} is smaller than the transformer patch size {multiple}")
        return clipped

    tile_h, tile_w = clip(height, tile_h), clip(width, tile_w)
    rows = axis_offsets(height, tile_h, min(overlap_h, tile_h - 1))
    cols = axis_offsets(width, tile_w, min(overlap_w, tile_w - 1))
    return TileGrid(height, width, tile_h, tile_w, tuple((r, c) for r in rows for c in cols))


def gaussian_weights(height: int, width: int, weighting: str = "official") -> np.ndarray:
    """``(height, width)`` float64 Gaussian tile weights (see module docstring for the two variants)."""
    if weighting not in TILE_WEIGHTINGS:
        raise ValueError(f"tile weighting must be one of {TILE_WEIGHTINGS}, got {weighting!r}")

    def profile(size: int, midpoint: float) -> np.ndarray:
        d = np.arange(size, dtype=np.float64) - midpoint
        return np.exp(-d * d / (size * size) / (2 * GAUSSIAN_VARIANCE)) / np.sqrt(2 * np.pi * GAUSSIAN_VARIANCE)

    y_mid = height / 2 if weighting == "official" else (height - 1) / 2
    return np.outer(profile(height, y_mid), profile(width, (width - 1) / 2))


def normalized_tile_weights(grid: TileGrid, weighting: str = "official") -> torch.Tensor:
    """``(tiles, 1, tile_h, tile_w)`` float32 weights divided by their per-pixel sum over all tiles.

    Blending is then ``sum_i w_i * pred_i`` with no per-step division. A single tile gets weight 1.
    """
    if len(grid) == 1:
        return torch.ones(1, 1, grid.tile_height, grid.tile_width)
    weights = gaussian_weights(grid.tile_height, grid.tile_width, weighting)
    total = np.zeros((grid.height, grid.width))
    for i in range(len(grid)):
        total[grid.slices(i)] += weights
    normalized = np.stack([weights / total[grid.slices(i)] for i in range(len(grid))])
    return torch.from_numpy(normalized[:, None]).float()


def whole_image_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` drawn on the CPU from ``seed`` (same on every device)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)
