"""Upscaling engines behind one small interface, chosen by ``model.path``.

* ``bundled`` or a checkpoint root (path / fsspec URL): DiT4SR through ``dit4sr.DiT4SRPipeline``.
* ``bicubic``: a plain bicubic resize, for tests and plumbing runs only (fast, deterministic, no model).
* ``package.module:factory``: any importable factory ``factory(settings) -> Engine`` (plug-in engines).

``resolve_settings`` turns the config into the concrete values that decide output bytes (model defaults filled
in), which is what the config fingerprint hashes; engines run from those same values, so what was fingerprinted
is exactly what runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .config import ConfigError, JobConfig
from .spec import RunSpec
from .storage import Location

BICUBIC_VERSION = "pil-bicubic-1"
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


def engine_kind(path: str) -> str:
    if path == "bicubic":
        return "bicubic"
    module, sep, _ = path.partition(":")
    if sep and "://" not in path and module.replace(".", "").replace("_", "").isalnum():
        return "plugin"
    return "dit4sr"


def _output_settings(cfg: JobConfig) -> dict[str, Any]:
    quality = cfg.output.quality if cfg.output.format in ("jpeg", "webp", "avif", "heic", "same") else None
    return {"scale": cfg.upscale.scale, "output_format": cfg.output.format, "quality": quality}


def resolve_settings(cfg: JobConfig) -> dict[str, Any]:
    """Everything that changes output bytes, with model defaults resolved (the fingerprint's input). With
    ``upscale.caption`` on, the caption settings (``caption``) are part of it: they decide each input's prompt."""
    from .captions import caption_settings

    kind = engine_kind(cfg.model.path)
    if kind == "bicubic":
        if cfg.upscale.prompt or cfg.upscale.prompts_uri or cfg.upscale.caption.model:
            raise ConfigError("upscale.prompt / prompts_uri / caption.model: the bicubic engine takes no prompt")
        return {"engine": BICUBIC_VERSION, **_output_settings(cfg)}
    caption = caption_settings(cfg)  # a caption model that cannot work fails the job here, before any input
    if kind == "plugin":
        factory = _import(cfg.model.path)
        return {"engine": cfg.model.path, "version": getattr(factory, "version", None),
                "seed": cfg.upscale.seed, "prompt": cfg.upscale.prompt, **_output_settings(cfg),
                **({"caption": caption} if caption else {})}
    return {**_dit4sr_settings(cfg), **({"caption": caption} if caption else {})}


def _import(path: str) -> Any:
    module, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.path: cannot import engine factory {path!r}: {exc}") from exc


def model_root(cfg: JobConfig) -> Location:
    import dit4sr

    return Location(dit4sr.BUNDLED_MODEL if cfg.model.path == "bundled" else cfg.model.path,
                    cfg.model.storage_options)


def transformer_root(cfg: JobConfig) -> Location:
    """Where the DiT4SR transformer (and its recommended settings) live: ``model.transformer`` or the main root."""
    return Location(cfg.model.transformer, cfg.model.storage_options) if cfg.model.transformer else model_root(cfg)


def _read_json(root: Location, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(root.read(key))
    except FileNotFoundError:
        return None


# What ``compute.compile`` folds into the fingerprint when on: the compile scheme (dit4sr.compile). Eager runs
# carry no key, so their fingerprints are those of runs made before compiling existed.
COMPILE_SCHEME = "regional-dynamic-batch"


def compile_enabled(cfg: JobConfig) -> bool:
    """``compute.compile`` resolved at plan time: auto is on exactly when actors get GPUs and run on CUDA."""
    if cfg.compute.compile != "auto":
        return cfg.compute.compile == "on"
    device = cfg.model.device
    return cfg.compute.gpus_per_actor > 0 and (device is None or device.startswith("cuda"))


def _dit4sr_settings(cfg: JobConfig) -> dict[str, Any]:
    """Resolve the settings exactly as the pipeline will (config > recommended_settings.json > official
    defaults) from the model's small JSON files only, so planning and dry runs never load weights."""
    import dit4sr
    from dit4sr import TEXT_COMPONENTS, effective_settings, read_recommended_settings

    root = model_root(cfg)
    index = _read_json(root, "model_index.json")
    if index is None:
        raise ConfigError(f"model.path {cfg.model.path!r}: no model_index.json at {root.uri}")
    dit_root = transformer_root(cfg)
    transformer = _read_json(dit_root, "transformer/config.json")
    if transformer is None:
        raise ConfigError(f"no transformer/config.json at {dit_root.uri}"
                          + ("" if cfg.model.transformer else ": set model.transformer to a DiT4SR root"))
    vae = _read_json(root, "vae/config.json") or {}
    try:
        recommended = read_recommended_settings(list(dict.fromkeys([root.uri, dit_root.uri])), root.storage_options)
    except ValueError as exc:
        raise ConfigError(f"model {cfg.model.path!r}: {exc}") from exc
    upscale = cfg.upscale
    sampler = effective_settings(recommended, num_inference_steps=upscale.steps,
                                 guidance_scale=upscale.guidance_scale, tile_size=upscale.tile_size,
                                 tile_overlap=upscale.tile_overlap, color_fix=upscale.color_fix)
    sampler.pop("tile_batch_size")  # changes rounding only, like batch sizes: not part of the fingerprint
    # The model's identity without downloading weights: its JSON files, and every file's name and size.
    files = [sorted((e.relative, e.size) for e in location.list() if not e.relative.startswith("."))
             for location in {root.uri: root, dit_root.uri: dit_root}.values()]
    identity = hashlib.sha256(json.dumps([index, transformer, vae, recommended, files], sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]
    settings = {
        "engine": "dit4sr", "sampler_version": dit4sr.SAMPLER_VERSION, "model": cfg.model.path,
        "transformer": cfg.model.transformer,
        "model_identity": identity, "release": cfg.model.release, "dtype": cfg.model.dtype,
        "seed": upscale.seed, "prompt": upscale.prompt, **sampler, **_output_settings(cfg),
        "vae_scale_factor": int(vae.get("downscale_factor") or 2 ** (len(vae.get("block_out_channels", [0])) - 1)),
        "patch_size": int(transformer.get("patch_size", 2)),
        **({"compile": COMPILE_SCHEME} if compile_enabled(cfg) else {}),
    }
    has_text_encoders = all(index.get(name) and index[name][0] for name in TEXT_COMPONENTS)
    prompts = upscale.prompt or ("<per-source prompt>" if upscale.prompts_uri else "") \
        or ("<caption>" if upscale.caption.model else "")
    wanted = [text for text in (prompt_text(settings, prompts), negative_text(settings)) if text]
    if wanted and not has_text_encoders:
        raise ConfigError(
            f"model {cfg.model.path!r} has no text encoders, so it cannot encode {wanted[0]!r}: leave "
            "upscale.prompt, prompts_uri and caption.model unset, and keep guidance_scale <= 1 unless the model "
            "ships text encoders")
    return settings


def prompt_text(settings: dict[str, Any], prompt: str) -> str:
    """The exact text a prompt conditions the model with (the manifest's ``prompt``): DiT4SR appends its
    ``added_prompt`` to non-empty prompts; other engines take the prompt as it is."""
    if settings.get("engine") != "dit4sr":  # specs built in tests may carry the output settings only
        return prompt
    from dit4sr import compose_prompt

    return compose_prompt(prompt, settings["added_prompt"])


def negative_text(settings: dict[str, Any]) -> str | None:
    """DiT4SR's negative prompt where guidance uses it (its embedding is keyed ``NEGATIVE``), else None."""
    if settings["engine"] != "dit4sr" or settings["guidance_scale"] <= 1:
        return None
    return settings["negative_prompt"] or None


def output_size_error(spec: RunSpec, width: int, height: int) -> str | None:
    """Why a ``width x height`` image or frame exceeds ``limits.max_output_pixels``, or None. DiT4SR samples a
    canvas whose short side is at least its process size, so a very thin input (3x2000) samples far more pixels
    than it outputs: the limit applies to the larger of the two."""
    scale, limit, settings = spec.scale, spec.max_output_pixels, spec.settings
    output = width * height * scale * scale
    if output > limit:
        return f"{width}x{height} at x{scale} is {output} output pixels, above limits.max_output_pixels={limit}"
    if settings["engine"] != "dit4sr":
        return None
    from dit4sr.geometry import resize_plan

    sampled_height, sampled_width = resize_plan(height, width, scale, settings["process_size"],
                                                settings["vae_scale_factor"], settings["patch_size"])[-1]
    if sampled_width * sampled_height > limit:
        return (f"{width}x{height} at x{scale} is sampled on a {sampled_width}x{sampled_height} canvas "
                f"(process size {settings['process_size']}), above limits.max_output_pixels={limit}")
    return None


def tiles_per_frame(cfg: JobConfig, settings: dict[str, Any], width: int, height: int) -> int:
    """Sampler tiles for one image or frame, as ``DiT4SRPipeline`` will run it (other engines: one "tile")."""
    if settings["engine"] != "dit4sr":
        return 1
    from dit4sr.geometry import plan_geometry

    transformer = _transformer_config(cfg)
    max_side = transformer.get("pos_embed_max_size")
    return plan_geometry(height, width, upscale=settings["scale"], process_size=settings["process_size"],
                         vae_scale_factor=settings["vae_scale_factor"], patch_size=settings["patch_size"],
                         tile_size=settings["tile_size"], tile_overlap=settings["tile_overlap"],
                         max_latent_side=max_side * settings["patch_size"] if max_side else None).tiles


def sampler_steps(settings: dict[str, Any]) -> int:
    """Denoising steps per tile (engines without steps: one)."""
    return settings.get("num_inference_steps") or 1


def tile_steps(cfg: JobConfig, settings: dict[str, Any], width: int, height: int, frames: int = 1) -> int:
    """Sampler work of ``frames`` frames of ``width x height``: tiles per frame x frames x steps — what the dry run
    estimates and the run's metrics count."""
    return tiles_per_frame(cfg, settings, width, height) * frames * sampler_steps(settings)


@functools.cache
def _transformer_config_at(uri: str, options: str) -> dict[str, Any]:
    return _read_json(Location(uri, json.loads(options)), "transformer/config.json") or {}


def _transformer_config(cfg: JobConfig) -> dict[str, Any]:
    root = transformer_root(cfg)
    return _transformer_config_at(root.uri, json.dumps(root.storage_options, sort_keys=True, default=str))


def bicubic(image: np.ndarray, scale: int) -> np.ndarray:
    """Pillow's bicubic resize of each channel of a float32 HxWxC array by ``scale``, unclipped (it also resizes
    differences of frames: ``upscaler.FlickerMeter``)."""
    height, width, channels = image.shape
    size = (width * scale, height * scale)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c]), mode="F")
                                .resize(size, Image.Resampling.BICUBIC)) for c in range(channels)], axis=-1)


class BicubicEngine:
    """Bicubic resize per channel in float32 (deterministic, size exact); not a super-resolution model."""

    def __init__(self, settings: dict[str, Any]):
        self.scale = settings["scale"]

    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        return np.clip(bicubic(image, self.scale), 0.0, 1.0).astype(np.float32)


SAMPLER_KEYS = ("num_inference_steps", "guidance_scale", "start_point", "tile_size", "tile_overlap",
                "tile_weighting", "color_fix", "process_size", "negative_prompt", "added_prompt", "vae_tiling")


class DiT4SREngine:
    """One ``DiT4SRPipeline`` per actor, without text encoders: prompts arrive as embeddings, looked up by their
    exact text in ``prompt_embeds`` (any mapping; pipeline.captions.PromptEmbeddings fetches them as needed); the
    empty prompt is the model's stored null prompt."""

    def __init__(self, spec: RunSpec, *, device: str, prompt_embeds: Mapping[str, Any]):
        import torch

        import dit4sr

        torch.set_num_threads(spec.torch_threads)
        self.settings = spec.settings
        self.sampler = {key: self.settings[key] for key in SAMPLER_KEYS}
        negative = prompt_embeds.get(NEGATIVE)
        self.negative = {} if negative is None else {"negative_prompt_embeds": negative.prompt_embeds,
                                                      "negative_pooled_prompt_embeds": negative.pooled_prompt_embeds}
        self.prompt_embeds = prompt_embeds
        self.pipe = dit4sr.DiT4SRPipeline.from_pretrained(
            spec.model_path, transformer=spec.model_transformer, release=spec.model_release,
            torch_dtype=getattr(torch, self.settings["dtype"]), device=device, storage_options=spec.storage_options)
        if spec.compile:
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
        result = self.pipe(frames, upscale=self.settings["scale"], seed=seeds, output_type="np",
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
    kind = engine_kind(spec.model_path)
    if kind == "bicubic":
        return BicubicEngine(spec.settings)
    if kind == "plugin":
        return _import(spec.model_path)(spec.settings)
    return DiT4SREngine(spec, device=device, prompt_embeds=prompt_embeds or {})
