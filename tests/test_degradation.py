import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from dit4sr.degradation import (
    Degradation,
    DegradationConfig,
    StageConfig,
    bicubic_downscale,
    bicubic_upscale,
    random_kernel,
    random_sinc_kernel,
    sinc_kernel,
)

CONFIG_FILE = __import__("pathlib").Path(__file__).parents[1] / "configs" / "train" / "degradation.yaml"


def _photo_like(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
    detail = rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(smooth + detail, 0, 255).astype(np.uint8))


def test_bicubic_only_is_exactly_bicubic_downscaling():
    hr = _photo_like()
    lr = Degradation(DegradationConfig(realistic_prob=0.0))(hr, np.random.default_rng(0))
    assert lr.size == (16, 16) and lr.mode == "RGB"
    assert np.array_equal(np.asarray(lr), np.asarray(bicubic_downscale(hr, 4)))


def test_bicubic_downscale_keeps_a_flat_image_flat_and_upscale_restores_size():
    flat = Image.new("RGB", (32, 24), (10, 200, 90))
    lr = bicubic_downscale(flat, 4)
    assert lr.size == (8, 6) and np.all(np.asarray(lr) == (10, 200, 90))
    assert bicubic_upscale(lr, 4).size == (32, 24)
    with pytest.raises(ValueError, match="not divisible"):
        bicubic_downscale(Image.new("RGB", (30, 24)), 4)


@pytest.mark.parametrize("seed", range(12))
def test_second_order_output_shape_range_and_determinism(seed):
    hr = _photo_like(96, seed)
    degradation = Degradation(DegradationConfig.from_yaml(str(CONFIG_FILE)))
    lr = degradation.second_order(hr, np.random.default_rng(seed))
    again = degradation.second_order(hr, np.random.default_rng(seed))
    array = np.asarray(lr)
    assert lr.mode == "RGB" and lr.size == (24, 24) and array.dtype == np.uint8
    assert np.array_equal(array, np.asarray(again))
    # It is a degradation of this image, not noise: close to the clean bicubic LR on average. Over these 12 seeds
    # the mean moves 0.02-0.83 grey levels and the correlation is 0.44-0.88; the bounds leave about 2x margin on
    # the mean (a brightness or contrast slip of a few levels fails) and 0.09 on the correlation.
    clean = np.asarray(bicubic_downscale(hr, 4), dtype=np.float64)
    assert abs(array.mean() - clean.mean()) < 2.0
    assert np.corrcoef(array.ravel(), clean.ravel())[0, 1] > 0.35


def test_realistic_prob_selects_the_second_order_path():
    hr = _photo_like(64, 3)
    always = Degradation(DegradationConfig(realistic_prob=1.0))
    outputs = [np.asarray(always(hr, np.random.default_rng(s))) for s in range(4)]
    clean = np.asarray(bicubic_downscale(hr, 4))
    assert all(not np.array_equal(o, clean) for o in outputs)


@pytest.mark.parametrize("kind", ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                                  "plateau_aniso"])
def test_kernels_are_normalised_nonnegative_and_centred(kind):
    stage = StageConfig(kernel_types=(kind,), kernel_type_probs=(1.0,), kernel_sizes=(11,))
    kernel = random_kernel(stage, np.random.default_rng(1))
    assert kernel.shape == (11, 11) and kernel.dtype == np.float32
    assert kernel.min() >= 0 and kernel.sum() == pytest.approx(1.0, abs=1e-5)
    assert kernel[5, 5] == kernel.max()
    # Point-symmetric: every kernel family here is a function of d^T Sigma^-1 d.
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-7)


def test_isotropic_kernel_is_rotation_invariant_and_anisotropic_is_not():
    iso = random_kernel(StageConfig(kernel_types=("iso",), kernel_type_probs=(1.0,)), np.random.default_rng(2))
    np.testing.assert_allclose(iso, iso.T, atol=1e-7)
    aniso = random_kernel(StageConfig(kernel_types=("aniso",), kernel_type_probs=(1.0,), blur_sigma=(0.5, 3.0)),
                          np.random.default_rng(5))
    assert not np.allclose(aniso, aniso.T, atol=1e-4)


@pytest.mark.parametrize("bad", [
    {"first": {"blur_sigma": [3.0, 1.0]}},
    {"first": {"kernel_sizes": [4]}},
    {"first": {"jpeg_quality": [0, 90]}},
    {"first": {"resize_probs": [0.5, 0.5, 0.5]}},
    {"realistic_prob": 1.5},
    {"unknown_key": 1},
])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValidationError):
        DegradationConfig.model_validate(bad)


def test_non_rgb_input_is_rejected():
    with pytest.raises(ValueError, match="RGB"):
        Degradation(DegradationConfig())(Image.new("L", (16, 16)), np.random.default_rng(0))


@pytest.mark.parametrize("size,cutoff", [(7, np.pi / 3), (13, np.pi / 5), (21, np.pi / 2), (9, np.pi)])
def test_sinc_kernel_is_a_normalised_symmetric_circular_low_pass(size, cutoff):
    kernel = sinc_kernel(size, cutoff)
    assert kernel.shape == (size, size) and kernel.dtype == np.float32
    assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-7)
    np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-7)
    assert kernel[size // 2, size // 2] == kernel.max()
    if cutoff < np.pi:
        assert kernel.min() < 0  # the side lobes that make ringing
    # Frequency response: passes DC, attenuates well beyond the cutoff (spectrum of the zero-padded kernel).
    response = np.abs(np.fft.fftshift(np.fft.fft2(kernel, s=(128, 128))))
    frequencies = np.fft.fftshift(np.fft.fftfreq(128)) * 2 * np.pi
    radius = np.hypot(*np.meshgrid(frequencies, frequencies))
    assert response[64, 64] == pytest.approx(1.0, abs=1e-5)
    if cutoff < np.pi * 0.6:
        assert response[radius > 1.6 * cutoff].mean() < 0.1
        assert response[radius < 0.5 * cutoff].mean() > 0.8


def test_sinc_kernel_reference_values():
    # c * J1(c r) / (2 pi r) at r = 1, 2 for c = pi/2 (J1(pi/2) = 0.566824, J1(pi) = 0.284615), before
    # normalisation; the centre is c^2 / (4 pi).
    raw = sinc_kernel(5, np.pi / 2).astype(np.float64)
    centre = (np.pi / 2) ** 2 / (4 * np.pi)
    scale = raw[2, 2] / centre
    assert raw[2, 3] / scale == pytest.approx(np.pi / 2 * 0.566824 / (2 * np.pi), rel=1e-4)
    assert raw[2, 4] / scale == pytest.approx(np.pi / 2 * 0.284615 / (4 * np.pi), rel=1e-4)


def test_sinc_kernel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        sinc_kernel(8, 1.0)
    with pytest.raises(ValueError, match="cutoff"):
        sinc_kernel(7, 4.0)


def test_random_sinc_kernel_cutoff_follows_the_kernel_size():
    rng = np.random.default_rng(0)
    for _ in range(20):
        kernel = random_sinc_kernel((7, 21), rng)
        assert kernel.shape in ((7, 7), (21, 21)) and kernel.sum() == pytest.approx(1.0, abs=1e-5)


def test_sinc_filters_take_part_in_the_second_order_degradation():
    hr = _photo_like(96, 4)
    with_sinc = Degradation(DegradationConfig(
        realistic_prob=1.0, final_sinc_prob=1.0,
        first=StageConfig(sinc_prob=1.0), second=StageConfig(sinc_prob=1.0)))
    without = Degradation(DegradationConfig(
        realistic_prob=1.0, final_sinc_prob=0.0,
        first=StageConfig(sinc_prob=0.0), second=StageConfig(sinc_prob=0.0)))
    a = np.asarray(with_sinc(hr, np.random.default_rng(3)))
    assert np.array_equal(a, np.asarray(with_sinc(hr, np.random.default_rng(3))))
    assert a.shape == (24, 24, 3)
    assert not np.array_equal(a, np.asarray(without(hr, np.random.default_rng(3))))
    with pytest.raises(ValidationError):
        DegradationConfig.model_validate({"final_sinc_prob": 2})
