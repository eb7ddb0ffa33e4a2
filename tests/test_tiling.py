"""Tile grid, blending weights and whole-image noise."""

import math

import numpy as np
import pytest
import torch

from dit4sr.tiling import (
    axis_offsets,
    gaussian_weights,
    normalized_tile_weights,
    plan_tiles,
    whole_image_noise,
)


def official_offsets(size, tile, overlap):
    """The official DiT4SR grid loop, restated: count tiles until the far edge is reached, last one flush."""
    count, reach = 0, 0
    while reach < size:
        reach = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [size - tile if i == count - 1 else max(i * tile - overlap * i, 0) for i in range(count)]


@pytest.mark.parametrize("size", [64, 65, 88, 91, 104, 150, 333])
@pytest.mark.parametrize("tile, overlap", [(64, 24), (64, 8), (32, 0), (48, 47)])
def test_axis_offsets_follow_the_official_grid(size, tile, overlap):
    assert axis_offsets(size, tile, overlap) == official_offsets(size, tile, overlap)


def test_grid_covers_non_square_latents_with_equal_tiles():
    grid = plan_tiles(150, 85, 64, 24)  # 300 x 170 input at x4 with SD3's VAE
    assert (grid.tile_height, grid.tile_width) == (64, 64)
    coverage = np.zeros((150, 85), int)
    for i in range(len(grid)):
        coverage[grid.slices(i)] += 1
    assert coverage.min() >= 1
    assert len(grid) == 4 * 2 and sorted({t for t, _ in grid.offsets}) == [0, 40, 80, 86]
    rect = plan_tiles(100, 300, (32, 96), (8, 16))
    assert (rect.tile_height, rect.tile_width) == (32, 96) and rect.offsets[-1] == (68, 204)


def test_whole_latent_when_its_area_fits_one_tile():
    grid = plan_tiles(32, 128, 64, 24, multiple=2)  # official rule: h * w <= tile * tile
    assert len(grid) == 1 and (grid.tile_height, grid.tile_width) == (32, 128)
    # ...unless the model's positional embedding cannot take a side that long
    assert len(plan_tiles(32, 128, 64, 24, multiple=2, max_side=96)) > 1


def test_short_side_below_the_tile_clips_the_tile_to_the_patch_multiple():
    grid = plan_tiles(63, 200, 64, 24, multiple=2)
    assert grid.tile_height == 62 and sorted({top for top, _ in grid.offsets}) == [0, 1]


@pytest.mark.parametrize("tile, overlap, multiple, match", [
    (64, 64, 1, "smaller than"),
    (16, 20, 1, "smaller than"),
    (15, 4, 2, "multiple of the transformer patch size"),
    (0, 0, 1, "positive"),
    ((8, 8, 8), 0, 1, "pair"),
])
def test_bad_grids_raise(tile, overlap, multiple, match):
    with pytest.raises(ValueError, match=match):
        plan_tiles(100, 100, tile, overlap, multiple=multiple)


def test_official_gaussian_weights():
    # The official formula: exp(-(d^2) / side^2 / (2 * 0.01)) / sqrt(2 * pi * 0.01), centred at (w - 1) / 2
    # horizontally and at h / 2 vertically.
    h, w = 64, 48
    weights = gaussian_weights(h, w, "official")
    norm = math.sqrt(2 * math.pi * 0.01)
    for y, x in [(0, 0), (32, 23), (63, 47), (10, 40)]:
        expected = (math.exp(-((x - (w - 1) / 2) ** 2) / (w * w) / 0.02) / norm
                    * math.exp(-((y - h / 2) ** 2) / (h * h) / 0.02) / norm)
        assert weights[y, x] == pytest.approx(expected, rel=1e-12)
    assert weights[32, 23] == weights.max()


def test_symmetric_weights_are_symmetric():
    weights = gaussian_weights(20, 30, "symmetric")
    np.testing.assert_allclose(weights, weights[::-1, ::-1], rtol=1e-12)
    official = gaussian_weights(20, 30, "official")
    assert not np.allclose(official, official[::-1])
    with pytest.raises(ValueError, match="weighting"):
        gaussian_weights(4, 4, "flat")


def test_normalized_weights_sum_to_one_everywhere():
    grid = plan_tiles(50, 70, (16, 24), (6, 10))
    weights = normalized_tile_weights(grid)
    total = torch.zeros(50, 70, dtype=torch.float64)
    for i in range(len(grid)):
        total[grid.slices(i)] += weights[i, 0].double()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    assert torch.equal(normalized_tile_weights(plan_tiles(8, 8, 16, 4)), torch.ones(1, 1, 8, 8))


def test_whole_image_noise_depends_only_on_seed():
    a = whole_image_noise((1, 4, 20, 30), seed=5)
    assert torch.equal(a, whole_image_noise((1, 4, 20, 30), seed=5))
    assert not torch.equal(a, whole_image_noise((1, 4, 20, 30), seed=6))
    assert a.dtype == torch.float32 and abs(a.std().item() - 1) < 0.05
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, whole_image_noise((1, 4, 20, 30), seed=5))
