"""Input conversion for every common image mode and array type, and the PIL-compatible bicubic resize."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dit4sr.image_processing import resize_bicubic, to_float_rgb, to_pil

RGB = (np.arange(4 * 6 * 3).reshape(4, 6, 3) * 3).astype(np.uint8)


def test_rgb_and_rgba():
    rgb, alpha = to_float_rgb(Image.fromarray(RGB))
    np.testing.assert_allclose(rgb, RGB / 255.0, atol=1e-7)
    assert rgb.dtype == np.float32 and alpha is None
    rgba = np.dstack([RGB, np.full((4, 6), 128, np.uint8)])
    rgb, alpha = to_float_rgb(Image.fromarray(rgba, "RGBA"))
    np.testing.assert_allclose(alpha, 128 / 255.0, atol=1e-7)


def test_grayscale_and_gray_alpha_become_rgb():
    gray = RGB[:, :, 0]
    rgb, alpha = to_float_rgb(Image.fromarray(gray, "L"))
    assert rgb.shape == (4, 6, 3) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]) and alpha is None
    rgb, alpha = to_float_rgb(Image.fromarray(np.dstack([gray, gray // 2]), "LA"))
    np.testing.assert_allclose(alpha, (gray // 2) / 255.0, atol=1e-7)
    rgb, _ = to_float_rgb(Image.fromarray(gray > 100))  # mode "1"
    assert set(np.unique(rgb)) <= {0.0, 1.0}


def test_palette_with_and_without_transparency():
    palette = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    rgb, alpha = to_float_rgb(palette)
    assert alpha is None
    np.testing.assert_allclose(rgb, np.asarray(palette.convert("RGB")) / 255.0, atol=1e-7)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    rgb, alpha = to_float_rgb(Image.open(buffer))
    assert alpha is not None and alpha.min() == 0.0 and alpha.max() == 1.0


def test_cmyk_uses_pillow_conversion():
    cmyk = Image.fromarray(RGB).convert("CMYK")
    rgb, _ = to_float_rgb(cmyk)
    np.testing.assert_allclose(rgb, np.asarray(cmyk.convert("RGB")) / 255.0, atol=1e-7)


def test_sixteen_bit_images_keep_their_precision():
    values = np.array([[0, 1, 257, 65535]], np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    image = Image.open(buffer)
    assert image.mode in ("I;16", "I")
    rgb, _ = to_float_rgb(image)
    np.testing.assert_allclose(rgb[0, :, 0], values[0] / 65535.0, rtol=1e-6)
    rgb, alpha = to_float_rgb(np.dstack([values] * 4))
    np.testing.assert_allclose(rgb[0, :, 1], values[0] / 65535.0, rtol=1e-6)
    np.testing.assert_allclose(alpha[0], values[0] / 65535.0, rtol=1e-6)


def test_arrays_of_every_channel_count_and_float_bool():
    assert to_float_rgb(np.zeros((3, 5), np.uint8))[0].shape == (3, 5, 3)
    assert to_float_rgb(np.zeros((3, 5, 1), np.uint8))[0].shape == (3, 5, 3)
    rgb, alpha = to_float_rgb(np.zeros((3, 5, 2), np.uint8))
    assert rgb.shape == (3, 5, 3) and alpha.shape == (3, 5)
    rgb, _ = to_float_rgb(np.full((2, 2, 3), 1.5, np.float64))
    assert rgb.max() == 1.0 and rgb.dtype == np.float32
    rgb, _ = to_float_rgb(np.ones((2, 2), bool))
    assert rgb.min() == 1.0


@pytest.mark.parametrize("bad, match", [
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((4, 0), np.uint8), "empty"),
    (np.zeros((4,), np.uint8), "empty"),
    (np.zeros((4, 4, 6), np.uint8), "shape"),
    (np.zeros((4, 4, 3), np.int64), "dtype"),
    (np.array([[np.inf]], np.float32), "NaN or infinite"),
])
def test_bad_arrays(bad, match):
    with pytest.raises(ValueError, match=match):
        to_float_rgb(bad)


def test_non_images_are_type_errors():
    with pytest.raises(TypeError, match="PIL image or a NumPy array"):
        to_float_rgb("photo.png")


def test_bicubic_matches_pillow_on_float_images():
    plane = np.random.default_rng(0).random((37, 53)).astype(np.float32)
    for size in [(148, 212), (20, 30), (150, 211)]:
        pil = np.asarray(Image.fromarray(plane, mode="F").resize(size[::-1], Image.BICUBIC))
        ours = resize_bicubic(torch.from_numpy(plane)[None, None], size)[0, 0].numpy()
        assert np.abs(pil - ours).max() < 1e-5


def test_to_pil_rounds_and_attaches_alpha():
    rgb = np.full((2, 3, 3), 0.5, np.float32)
    image = to_pil(rgb, np.ones((2, 3), np.float32))
    assert image.mode == "RGBA" and np.asarray(image)[0, 0].tolist() == [128, 128, 128, 255]
    assert to_pil(rgb).mode == "RGB"
