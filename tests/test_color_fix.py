"""AdaIN and wavelet colour fixes on tensors."""

import pytest
import torch

from dit4sr.color_fix import (
    adain_color_fix,
    apply_color_fix,
    wavelet_color_fix,
    wavelet_decomposition,
)


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 3, 40, 56, generator=g) * 0.5 + 0.3
    source = torch.rand(2, 3, 40, 56, generator=g) ** 2
    return target, source


def test_adain_gives_the_source_mean_and_std_per_channel():
    target, source = images()
    fixed = adain_color_fix(target, source)
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), source.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std(dim=(2, 3)), source.std(dim=(2, 3)), atol=1e-3, rtol=0)
    # the structure of the target is kept: a per-channel affine map of it
    corr = torch.corrcoef(torch.stack([fixed[0, 0].flatten(), target[0, 0].flatten()]))[0, 1]
    assert corr > 0.9999


def test_wavelet_decomposition_is_exact_and_uses_the_dilated_kernel():
    target, _ = images()
    high, low = wavelet_decomposition(target)
    torch.testing.assert_close(high + low, target, atol=1e-6, rtol=0)
    # one level on a delta: [1, 2, 1]^T [1, 2, 1] / 16
    delta = torch.zeros(1, 3, 9, 9)
    delta[:, :, 4, 4] = 16.0
    _, blurred = wavelet_decomposition(delta, levels=1)
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])
    torch.testing.assert_close(blurred[0, 0, 3:6, 3:6], expected)
    assert blurred[0, 0].sum().item() == pytest.approx(16.0)


def test_wavelet_takes_low_frequencies_from_the_source():
    target, source = images()
    fixed = wavelet_color_fix(target, source)
    torch.testing.assert_close(wavelet_color_fix(target, target), target, atol=1e-6, rtol=0)
    # a constant colour shift of the target is removed entirely
    torch.testing.assert_close(wavelet_color_fix(target + 0.2, source), fixed, atol=1e-5, rtol=0)
    assert (fixed.mean(dim=(2, 3)) - source.mean(dim=(2, 3))).abs().max() < 0.02


def test_tiny_images_and_method_names():
    target, source = torch.rand(1, 3, 2, 3), torch.rand(1, 3, 2, 3)
    assert wavelet_color_fix(target, source).shape == (1, 3, 2, 3)  # replicate padding wider than the image
    assert torch.equal(apply_color_fix("none", target, source), target)
    with pytest.raises(ValueError, match="color_fix"):
        apply_color_fix("sepia", target, source)
