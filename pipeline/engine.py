"""Upscaling engines behind one small interface, chosen by ``model.path``.

* ``bundled`` or a checkpoint root (path / fsspec URL): DiT4SR through ``dit4sr.DiT4SRPipeline``.
* ``bicubic``: a plain bicubic resize, for tests and plumbing runs only (fast, deterministic, no model).
* ``package.module:factory``: any importable factory ``factory(settings) -> Engine`` (plug-in engines).

Engines run from the run spec (``pipeline.spec``): the resolved values the config fingerprint hashes, so what was
fingerprinted is exactly what runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .spec import RunSpec, plugin_factory

NEGATIVE = "\x00negative"  # key of the negative prompt's embedding (never a row's prompt)


class Engine(Protocol):
    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        """float32 HxWxC (C=3 or 4) in [0, 1] -> float32 (scale*H)x(scale*W)xC in [0, 1]."""

    def upscale_frames(self, frames: list[np.ndarray], *, seeds: list[int], prompt: str) -> list[np.ndarray]:
        """Frames of one clip (same size; float32 HxWx3) with a seed each — all equal for a clip's one noise
        field. Optional: engines without it get their ``upscale`` called frame by frame."""


def upscale_frames(engine: Engine, frames: list[np.ndarray], *, seeds: list[int], prompt: str) -> list[np.ndarray]:
    if hasattr(engine, "upscale_frames"):
        return engine.upscale_frames(frames, seeds=seeds, prompt=prompt)
    return [engine.upscale(frame, seed=seed, prompt=prompt) for frame, seed in zip(frames, seeds)]


def output_size_error(spec: RunSpec, width: int, height: int) -> str | None:
    """Why a ``width x height`` image or frame exceeds ``limits.max_output_pixels``, or None. DiT4SR samples a
    canvas whose short side is at least its process size, so a very thin input (3x2000) samples far more pixels
    than it outputs: the limit applies to the larger of the two."""
    scale, limit = spec.scale, spec.limits.max_output_pixels
    output = width * height * scale * scale
    if output > limit:
        return f"{width}x{height} at x{scale} is {output} output pixels, above limits.max_output_pixels={limit}"
    if spec.sampler is None:
        return None
    from dit4sr.geometry import resize_plan

    process_size = spec.sampler.process_size
    sampled_height, sampled_width = resize_plan(height, width, scale, process_size, spec.geometry.vae_scale_factor,
                                                spec.geometry.patch_size)[-1]
    if sampled_width * sampled_height > limit:
        return (f"{width}x{height} at x{scale} is sampled on a {sampled_width}x{sampled_height} canvas "
                f"(process size {process_size}), above limits.max_output_pixels={limit}")
    return None


def tiles_per_frame(spec: RunSpec, width: int, height: int) -> int:
    """Sampler tiles for one image or frame, as ``DiT4SRPipeline`` will run it (other engines: one "tile")."""
    if spec.sampler is None:
        return 1
    from dit4sr.geometry import plan_geometry

    sampler, geometry = spec.sampler, spec.geometry
    max_side = geometry.pos_embed_max_size
    return plan_geometry(height, width, upscale=spec.scale, process_size=sampler.process_size,
                         vae_scale_factor=geometry.vae_scale_factor, patch_size=geometry.patch_size,
                         tile_size=sampler.tile_size, tile_overlap=sampler.tile_overlap,
                         max_latent_side=max_side * geometry.patch_size if max_side else None).tiles


def tile_steps(spec: RunSpec, width: int, height: int, frames: int = 1) -> int:
    """Sampler work of ``frames`` frames of ``width x height``: tiles per frame x frames x steps — what the dry run
    estimates and the run's metrics count."""
    return tiles_per_frame(spec, width, height) * frames * spec.steps_per_tile


def bicubic(image: np.ndarray, scale: int) -> np.ndarray:
    """Pillow's bicubic resize of each channel of a float32 HxWxC array by ``scale``, unclipped (it also resizes
    differences of frames: ``upscaler.FlickerMeter``)."""
    height, width, channels = image.shape
    size = (width * scale, height * scale)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c]), mode="F")
                                .resize(size, Image.Resampling.BICUBIC)) for c in range(channels)], axis=-1)


class BicubicEngine:
    """Bicubic resize per channel in float32 (deterministic, size exact); not a super-resolution model. Built like a
    plug-in engine, from the fingerprinted settings (``RunSpec.fingerprint_fields``), so plug-ins may wrap it."""

    def __init__(self, settings: Mapping[str, Any]):
        self.scale = settings["scale"]

    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        return np.clip(bicubic(image, self.scale), 0.0, 1.0).astype(np.float32)


class DiT4SREngine:
    """One ``DiT4SRPipeline`` per actor, without text encoders: prompts arrive as embeddings, looked up by their
    exact text in ``prompt_embeds`` (any mapping; pipeline.captions.PromptEmbeddings fetches them as needed); the
    empty prompt is the model's stored null prompt."""

    def __init__(self, spec: RunSpec, *, device: str, prompt_embeds: Mapping[str, Any]):
        import torch

        import dit4sr

        model = spec.model
        torch.set_num_threads(model.torch_threads)
        self.scale, self.sampler = spec.scale, spec.sampler.call_arguments()
        negative = prompt_embeds.get(NEGATIVE)
        self.negative = {} if negative is None else {"negative_prompt_embeds": negative.prompt_embeds,
                                                      "negative_pooled_prompt_embeds": negative.pooled_prompt_embeds}
        self.prompt_embeds = prompt_embeds
        self.pipe = dit4sr.DiT4SRPipeline.from_pretrained(
            model.path, transformer=model.transformer, release=model.release, torch_dtype=getattr(torch, model.dtype),
            device=device, storage_options=model.options)
        if model.compile:
            self.pipe.enable_compile()

    @property
    def run_settings(self) -> dict[str, Any]:
        """What this actor chose that changes rounding only (kept out of the fingerprint; the run summary
        records it so a run can be reproduced)."""
        return {"tile_batch_size": self.pipe.tile_batch_size}

    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        return self.upscale_frames([image], seeds=[seed], prompt=prompt)[0]

    def upscale_frames(self, frames: list[np.ndarray], *, seeds: list[int], prompt: str) -> list[np.ndarray]:
        embedding = self.prompt_embeds.get(prompt) if prompt else None
        if prompt and embedding is None:  # never fall back to the null prompt silently
            raise RuntimeError(f"no embedding reached this actor for the prompt {prompt[:80]!r}")
        embeds = {} if embedding is None else {"prompt_embeds": embedding.prompt_embeds,
                                               "pooled_prompt_embeds": embedding.pooled_prompt_embeds}
        result = self.pipe(frames, upscale=self.scale, seed=seeds, output_type="np",
                           show_progress=False, **self.sampler, **embeds, **self.negative)
        return [np.asarray(image, dtype=np.float32) for image in result.images]


def engine_run_settings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The actors' own choices (``run_settings``) found on finished rows, per key: the value, or the sorted
    distinct values where actors chose differently (e.g. GPUs of different memory)."""
    seen: dict[str, set] = {}
    for text in {row.get("engine_settings") for row in rows} - {None}:
        for key, value in json.loads(text).items():
            seen.setdefault(key, set()).add(value)
    return {key: next(iter(values)) if len(values) == 1 else sorted(values, key=str)
            for key, values in seen.items()}


def load_engine(spec: RunSpec, *, device: str, prompt_embeds: Mapping[str, Any] | None = None) -> Engine:
    if spec.model.kind == "bicubic":
        return BicubicEngine(spec.fingerprint_fields())
    if spec.model.kind == "plugin":
        return plugin_factory(spec.model.path)(spec.fingerprint_fields())
    return DiT4SREngine(spec, device=device, prompt_embeds=prompt_embeds or {})
