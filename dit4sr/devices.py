"""Automatic device and dtype choice: CUDA in bfloat16 (float16 where the GPU lacks bf16), else CPU float32.

Everything is overridable: ``resolve_device("cpu")``, ``resolve_dtype("float16", device)``. Names accepted for
dtypes: ``auto``, ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16`` (or a ``torch.dtype``).
"""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: the current CUDA device when one is present, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> torch.dtype:
    """``None``/``"auto"``: bfloat16 on CUDA (float16 on GPUs without bf16), float32 elsewhere.

    Half precision on the CPU is slow and poorly supported, so "auto" never picks it there.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        device = resolve_device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None
