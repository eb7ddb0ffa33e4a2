"""Input images (PIL or NumPy, any common mode) to float RGB in [0, 1] plus optional alpha, and back.

Accepted PIL modes: 1, L, LA, La, P (with or without a ``transparency`` entry), PA, RGB, RGBA, RGBa, RGBX,
CMYK, YCbCr, LAB, HSV, I;16 (and its byte orders), I (read as 16-bit) and F (read as [0, 1]).
Accepted arrays: HxW or HxWxC with C in 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA); dtype uint8
(/255), uint16 (/65535), bool, or float in [0, 1]. Gray becomes RGB; alpha is returned separately so
the pipeline can upscale it on its own and re-attach it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Image files the library's tools (CLI, training, evaluation) pick up from folders; HEIF needs pillow-heif's opener.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".heic", ".heif")


def _split_channels(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image array must be HxW or HxWxC with C in 1..4, got shape {array.shape}")
    channels = array.shape[2]
    color = array[:, :, :1] if channels <= 2 else array[:, :, :3]
    alpha = array[:, :, channels - 1] if channels in (2, 4) else None
    if color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    return np.ascontiguousarray(color), None if alpha is None else np.ascontiguousarray(alpha)


def _array_to_float(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or infinite values")
        return np.clip(array, 0.0, 1.0)
    raise ValueError(f"unsupported image array dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1]")


def _pil_to_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale (PNG/TIFF) arrives as I;16 or as 32-bit I holding 0..65535.
        return np.clip(np.asarray(image, dtype=np.float64) / 65535.0, 0.0, 1.0).astype(np.float32)
    if mode == "F":
        return _array_to_float(np.asarray(image, dtype=np.float32))
    if mode in ("RGBA", "LA", "RGB", "L"):
        return np.asarray(image)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    if mode == "La":
        return np.asarray(image.convert("LA"))
    if mode == "RGBa":
        return np.asarray(image.convert("RGBA"))
    # CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversion to RGB.
    return np.asarray(image.convert("RGB"))


def to_float_rgb(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(rgb, alpha)``: float32 HxWx3 and HxW (or ``None``) in [0, 1]."""
    if isinstance(image, Image.Image):
        array = _pil_to_array(image)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"image must be a PIL image or a NumPy array, got {type(image).__name__}")
    if array.ndim < 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image is empty (shape {array.shape})")
    color, alpha = _split_channels(array)
    return _array_to_float(color), None if alpha is None else _array_to_float(alpha)


def resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of an NCHW float tensor to ``(height, width)``.

    Uses PyTorch's antialiased bicubic, which has Pillow's kernel (a = -0.5, widened when downscaling):
    it equals ``PIL.Image.resize(..., BICUBIC)`` on float images to ~1e-6, so it follows the official
    PIL-based preprocessing without the 8-bit rounding Pillow applies between its two passes.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    dtype = x.dtype
    out = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.to(dtype)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_pil(rgb: np.ndarray, alpha: np.ndarray | None = None) -> Image.Image:
    """float HxWx3 (+ HxW alpha) in [0, 1] to an 8-bit RGB or RGBA image."""
    if alpha is not None:
        return Image.fromarray(to_uint8(np.concatenate([rgb, alpha[:, :, None]], axis=2)), mode="RGBA")
    return Image.fromarray(to_uint8(rgb), mode="RGB")
