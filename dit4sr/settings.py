"""Sampler settings: the official defaults, a model's ``recommended_settings.json``, and how a call resolves them.

Settings left as ``None`` resolve as: caller's value > the model's ``recommended_settings.json`` > the official
default (``OFFICIAL_SETTINGS``). Planners resolve them from the JSON alone, without loading weights, and so know
what a call will run.
"""

from __future__ import annotations

import os
from typing import Any

from .loading import read_json, resolve_root

RECOMMENDED_SETTINGS_FILE = "recommended_settings.json"

OFFICIAL_NEGATIVE_PROMPT = (
    "motion blur, noisy, dotted, bokeh, pointed, CG Style, 3D render, unreal engine, blurring, dirty, messy, "
    "worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, lowres, chaotic"
)
OFFICIAL_ADDED_PROMPT = (
    "Cinematic, hyper sharpness, highly detailed, perfect without deformations, camera, hyper detailed photo - "
    "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing. "
)
OFFICIAL_SETTINGS: dict[str, Any] = {
    "num_inference_steps": 40,
    "guidance_scale": 8.0,
    "start_point": "noise",
    "tile_size": 64,
    "tile_overlap": 24,
    "tile_weighting": "official",
    "color_fix": "adain",
    "process_size": 512,
    "negative_prompt": OFFICIAL_NEGATIVE_PROMPT,
    "added_prompt": OFFICIAL_ADDED_PROMPT,
    "vae_tiling": "auto",
}
START_POINTS = ("noise", "lr")


def compose_prompt(prompt: str, added_prompt: str | None) -> str:
    """The text actually encoded: the official script appends the suffix after a space.

    The suffix decorates a description; an empty prompt stays empty (the null prompt), so upscaling
    without a prompt needs no text encoder.
    """
    return f"{prompt} {added_prompt}" if prompt and added_prompt else prompt


def read_recommended_settings(roots: list[str | os.PathLike],
                              storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The models' ``recommended_settings.json`` merged (later roots win: the DiT4SR root over an SD3.5 base),
    read without loading any weights."""
    settings: dict[str, Any] = {}
    for root in roots:
        settings.update(read_json(resolve_root(root), RECOMMENDED_SETTINGS_FILE, storage_options) or {})
    unknown = set(settings) - set(OFFICIAL_SETTINGS) - {"tile_batch_size"}
    if unknown:
        raise ValueError(f"unknown keys in {RECOMMENDED_SETTINGS_FILE}: {sorted(unknown)}")
    return settings


def effective_settings(recommended: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Settings a call would use: caller's non-None values > ``recommended`` > official defaults."""
    settings = {**OFFICIAL_SETTINGS, "tile_batch_size": None, **recommended}
    unknown = set(overrides) - set(settings)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings
