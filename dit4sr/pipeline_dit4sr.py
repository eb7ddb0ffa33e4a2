"""``DiT4SRPipeline``: super-resolution of any image size with a DiT4SR transformer.

The method follows the official DiT4SR test script: the input is bicubic-upscaled (short side first raised
to ``process_size // upscale`` when smaller, size then rounded down to the VAE factor), encoded (latent
*mean*, never an unseeded sample), denoised with flow-matching Euler steps conditioned on the LR latent and
a prompt (classifier-free guidance against the official negative prompt), decoded, colour-corrected
against the bicubic image and resized to exactly ``upscale x`` the input size.

Where the official code stops working it keeps going:

* latent tiles (``dit4sr.tiling``) of any shape are batched into few transformer calls, conditional and
  unconditional halves together, blended with the official Gaussian weights;
* noise is drawn for the whole latent from ``seed`` on the CPU, so results do not depend on the tile grid,
  the batch or the machine's RNG; bytes repeat exactly for the same inputs, settings and software;
* large images go through the VAE in tiles that share GroupNorm statistics (``dit4sr.vae_tiling``);
* text encoders are optional: prompts can be given as embeddings (``dit4sr.prompt_cache``), and the
  model's stored null-prompt embedding stands in for an empty prompt;
* the meaning of the network output (``prediction_type``, ``lr_residual`` in the transformer config) is
  honoured through ``dit4sr.parameterization``, so small x0/residual models share this sampler.

Settings left as ``None`` resolve as: caller's value > the model's ``recommended_settings.json`` > the
official default (``OFFICIAL_SETTINGS``). Inputs smaller than the processing size are scaled up by the
short-side rule (and never below one latent patch), so even a 1x1 image works; empty images raise
``ValueError``.

Deliberate differences from the official script, none of which changes the method: resizes use Pillow's
bicubic kernel in float without 8-bit rounding between steps; guidance is combined per tile batch before
blending (linear, so equal up to rounding); the ``added_prompt`` suffix is appended to non-empty prompts only
(an empty prompt is the null prompt); where a latent side is shorter than the tile, the tile is clipped on
that side instead of shrunk to a square.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .color_fix import COLOR_FIXES, apply_color_fix
from .devices import resolve_device, resolve_dtype
from .image_processing import resize_bicubic, to_float_rgb, to_pil
from .models import DiT4SRTransformer2DModel, PixelUnshuffleAutoencoder
from .parameterization import predicted_velocity
from .prompt_cache import PromptEmbedding, load_null_prompt_embedding
from .storage import local_copy
from .geometry import SamplingGeometry, plan_geometry, resize_plan
from .tiling import TILE_WEIGHTINGS, normalized_tile_weights, whole_image_noise
from .vae_tiling import VAE_TILINGS, decode_latents, encode_image

# Bump whenever a sampler change alters output bytes (the catalog folds it into its config fingerprint).
SAMPLER_VERSION = "1"

BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "dit4sr-tiny")
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
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
# Activation budget per tile batch for the automatic tile_batch_size: tokens x width x this many bytes.
_BYTES_PER_TOKEN_CHANNEL = 24
_CPU_ACTIVATION_BUDGET = 2 << 30
# Share of the GPU memory found free (weights loaded) that tile batches may use; the rest is headroom for the
# VAE, the allocator's fragmentation and whatever else shares the GPU.
_FREE_MEMORY_SHARE = 0.5


@dataclass
class DiT4SRPipelineOutput(BaseOutput):
    """``images``: PIL images, or float32 HxWx3 (HxWx4 with alpha) arrays in [0, 1]."""

    images: list[PIL.Image.Image] | list[np.ndarray]


def compose_prompt(prompt: str, added_prompt: str | None) -> str:
    """The text actually encoded: the official script appends the suffix after a space.

    The suffix decorates a description; an empty prompt stays empty (the null prompt), so upscaling
    without a prompt needs no text encoder.
    """
    return f"{prompt} {added_prompt}" if prompt and added_prompt else prompt


def _resolve_root(location: str | os.PathLike) -> str:
    return BUNDLED_MODEL if str(location) == "bundled" else str(location)


def _read_json(root: str, name: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    try:
        return json.loads(fs.cat_file(f"{path.rstrip('/')}/{name}"))
    except FileNotFoundError:
        return None


def read_recommended_settings(roots: list[str | os.PathLike],
                              storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The models' ``recommended_settings.json`` merged (later roots win: the DiT4SR root over an SD3.5 base),
    read without loading any weights — planners use it to know what a call will run."""
    settings: dict[str, Any] = {}
    for root in roots:
        settings.update(_read_json(_resolve_root(root), RECOMMENDED_SETTINGS_FILE, storage_options) or {})
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


def _component_class(library: str, name: str):
    import diffusers
    import transformers

    import dit4sr

    modules = {"dit4sr": dit4sr, "diffusers": diffusers, "transformers": transformers}
    library = library.split(".")[0]  # save_pretrained records custom classes by module path
    if library not in modules or not hasattr(modules[library], name):
        raise ValueError(f"unknown component class {library}.{name} in model_index.json")
    return getattr(modules[library], name)


def _load_component(root: str, name: str, spec: list, dtype: torch.dtype, storage_options) -> Any:
    cls = _component_class(*spec)
    folder = local_copy(root, name, storage_options)
    if not issubclass(cls, torch.nn.Module):  # tokenizers, schedulers
        return cls.from_pretrained(folder)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder))
    if not has_weights:  # parameter-free modules such as PixelUnshuffleAutoencoder
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast, even with none.
        return torch.nn.Module.to(cls.from_config(cls.load_config(folder)), dtype)
    return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)  # never unpickle weights


class DiT4SRPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = list(TEXT_COMPONENTS)

    def __init__(
        self,
        transformer: DiT4SRTransformer2DModel,
        vae: AutoencoderKL | PixelUnshuffleAutoencoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, vae=vae, scheduler=scheduler,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        )
        self.recommended_settings: dict[str, Any] = {}
        self.null_prompt_embedding: PromptEmbedding | None = None
        self._prompt_encoder = None
        self._activation_budget: dict[torch.device, int] = {}
        # The tile batch of the latest call (tiles per transformer call before limiting to the tiles there are;
        # automatic or requested): pass it as ``tile_batch_size`` to batch alike elsewhere.
        self.tile_batch_size: int | None = None

    # -- model facts --------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        config = self.vae.config
        if getattr(config, "downscale_factor", None):
            return int(config.downscale_factor)
        return 2 ** (len(config.block_out_channels) - 1)

    @property
    def has_text_encoders(self) -> bool:
        return all(getattr(self, name, None) is not None for name in TEXT_COMPONENTS)

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        transformer: str | os.PathLike | DiT4SRTransformer2DModel | None = None,
        release: str | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        storage_options: dict[str, Any] | None = None,
        load_text_encoders: bool = False,
        fuse_control_projections: bool = True,
    ) -> DiT4SRPipeline:
        """Load a pipeline from a local path or fsspec URL (or ``"bundled"``, the model shipped in the package).

        * Our layout: one root with ``model_index.json`` and ``transformer/``, ``vae/``, ``scheduler/``.
        * The official arrangement: a Stable Diffusion 3.5 Medium root (vae, scheduler, text encoders) plus
          ``transformer=`` a DiT4SR root or URL (its ``transformer/`` subfolder), ``release=`` passed through.

        Text encoders are loaded only with ``load_text_encoders=True``. ``recommended_settings.json`` and the
        null-prompt embedding are read from the DiT4SR root (and the main root). Device and dtype default to
        CUDA bfloat16 (float16 without bf16 support) when a GPU is present, else CPU float32. A transformer
        loaded here gets its ``to_*_control ∘ to_*`` pairs folded into single projections (inference only;
        ``fuse_control_projections=False`` keeps them apart); one passed in as a model is left as it is.
        """
        root = _resolve_root(pretrained_model_name_or_path)
        device = resolve_device(device)
        dtype = resolve_dtype(torch_dtype, device)
        index = _read_json(root, "model_index.json", storage_options)
        if index is None:
            raise FileNotFoundError(f"no model_index.json in {root}")

        roots = [root]
        if isinstance(transformer, (str, os.PathLike)):
            transformer_root = _resolve_root(transformer)
            roots.append(transformer_root)
            transformer = DiT4SRTransformer2DModel.from_pretrained(
                transformer_root, subfolder="transformer", torch_dtype=dtype, release=release,
                storage_options=storage_options)
        elif transformer is None:
            spec = index.get("transformer") or [None, None]
            if spec[1] != DiT4SRTransformer2DModel.__name__:
                raise ValueError(f"{root} holds a {spec[1]} transformer; pass transformer=<DiT4SR root> "
                                 "to combine it with a DiT4SR transformer")
            transformer = DiT4SRTransformer2DModel.from_pretrained(
                root, subfolder="transformer", torch_dtype=dtype, release=release, storage_options=storage_options)
        else:
            transformer = torch.nn.Module.to(transformer, dtype)
            fuse_control_projections = False
        if fuse_control_projections:
            transformer.fuse_control_projections()

        components = {name: _load_component(root, name, index[name], dtype, storage_options)
                      for name in ("vae", "scheduler")}
        if load_text_encoders:
            for name in TEXT_COMPONENTS:
                if not index.get(name) or index[name][0] is None:
                    raise ValueError(f"load_text_encoders=True but {root} has no {name}")
                components[name] = _load_component(root, name, index[name], dtype, storage_options)

        pipe = cls(transformer=transformer, **components)
        pipe.recommended_settings = read_recommended_settings(roots, storage_options)
        for model_root in roots:  # the DiT4SR root (last) wins over the base root
            pipe.null_prompt_embedding = (load_null_prompt_embedding(model_root, storage_options)
                                          or pipe.null_prompt_embedding)
        return pipe.to(device)

    # -- settings and prompts -----------------------------------------------------------------------
    def effective_settings(self, **overrides: Any) -> dict[str, Any]:
        """Settings a call would use: caller's non-None values > ``recommended_settings`` > official defaults."""
        return effective_settings(self.recommended_settings, **overrides)

    def prompt_texts(self, prompt: str = "", negative_prompt: str | None = None, added_prompt: str | None = None,
                     guidance_scale: float | None = None) -> tuple[str, str | None]:
        """The (positive, negative) texts a call would encode; negative is ``None`` without guidance.

        This is what to put through a ``PromptEmbeddingCache`` for workers without text encoders.
        """
        settings = self.effective_settings(negative_prompt=negative_prompt, added_prompt=added_prompt,
                                           guidance_scale=guidance_scale)
        positive = compose_prompt(prompt, settings["added_prompt"])
        return positive, settings["negative_prompt"] if settings["guidance_scale"] > 1 else None

    def encode_prompt(self, prompts: list[str]) -> list[PromptEmbedding]:
        """Encode with this pipeline's own text encoders (loaded with ``load_text_encoders=True``)."""
        if not self.has_text_encoders:
            raise ValueError("this pipeline has no text encoders; load them with load_text_encoders=True "
                             "or pass prompt embeddings (see dit4sr.prompt_cache)")
        if self._prompt_encoder is None:
            from .prompt_cache import PromptEncoder

            self._prompt_encoder = PromptEncoder(
                *(getattr(self, name) for name in TEXT_COMPONENTS), device=self._execution_device)
        return self._prompt_encoder.encode(prompts)

    def _embedding_for(self, text: str, embeds: torch.Tensor | None, pooled: torch.Tensor | None,
                       what: str) -> PromptEmbedding:
        if embeds is not None or pooled is not None:
            if embeds is None or pooled is None:
                raise ValueError(f"{what}: pass both the token embeddings and the pooled embeddings")
            return PromptEmbedding.from_tensors(embeds, pooled)
        # The stored null embedding serves the empty prompt even when text encoders are loaded, so the
        # output never depends on whether they are.
        if text == "" and self.null_prompt_embedding is not None:
            return self.null_prompt_embedding
        if self.has_text_encoders:
            return self.encode_prompt([text])[0]
        if text == "":
            raise ValueError(f"{what}: the model has no stored null-prompt embedding and no text encoders; "
                             "pass prompt embeddings")
        alternative = "guidance_scale <= 1 (no negative prompt)" if what == "negative prompt" else "an empty prompt"
        raise ValueError(
            f"{what} {text!r} needs text encoders, which are not loaded: pass its embeddings "
            f"(see dit4sr.prompt_cache.PromptEmbeddingCache), use load_text_encoders=True, or {alternative}")

    def _conditioning(self, prompt, negative_prompt, added_prompt, guidance_scale,
                      prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds):
        if prompt and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        positive, negative = self.prompt_texts(prompt, negative_prompt, added_prompt, guidance_scale)
        cond = self._embedding_for(positive, prompt_embeds, pooled_prompt_embeds, "prompt")
        uncond = None
        if negative is not None:
            uncond = self._embedding_for(negative, negative_prompt_embeds, negative_pooled_prompt_embeds,
                                         "negative prompt")
        config = self.transformer.config
        for embedding in filter(None, (cond, uncond)):
            if (embedding.prompt_embeds.shape[-1] != config.joint_attention_dim
                    or embedding.pooled_prompt_embeds.shape[-1] != config.pooled_projection_dim):
                raise ValueError(
                    f"prompt embeddings of width {embedding.prompt_embeds.shape[-1]}/"
                    f"{embedding.pooled_prompt_embeds.shape[-1]} do not fit the transformer "
                    f"({config.joint_attention_dim}/{config.pooled_projection_dim})")
        if uncond is not None and uncond.prompt_embeds.shape != cond.prompt_embeds.shape:
            raise ValueError(f"negative prompt embeddings {tuple(uncond.prompt_embeds.shape)} and prompt embeddings "
                             f"{tuple(cond.prompt_embeds.shape)} must have the same shape")
        return cond, uncond

    # -- geometry -----------------------------------------------------------------------------------
    def geometry(self, height: int, width: int, upscale: float, **settings: Any) -> SamplingGeometry:
        """Resizes, latent size and tile grid a call would use for a ``height x width`` input (settings as in a
        call; ``None`` values resolve as there). See ``dit4sr.geometry``."""
        return self._geometry(height, width, upscale, self.effective_settings(**settings))

    def _geometry(self, height: int, width: int, upscale: float, settings: dict[str, Any]) -> SamplingGeometry:
        config = self.transformer.config
        return plan_geometry(height, width, upscale=upscale, process_size=settings["process_size"],
                             vae_scale_factor=self.vae_scale_factor, patch_size=config.patch_size,
                             tile_size=settings["tile_size"], tile_overlap=settings["tile_overlap"],
                             max_latent_side=config.pos_embed_max_size * config.patch_size)

    def resize_plan(self, height: int, width: int, upscale: float, process_size: int) -> list[tuple[int, int]]:
        """The official sequence of bicubic resizes as (height, width) targets; the last is the working size."""
        return list(resize_plan(height, width, upscale, process_size, self.vae_scale_factor,
                                self.transformer.config.patch_size))

    def _tile_batch_size(self, requested: int | None, tiles: int, tokens: int, device: torch.device) -> int:
        """Tiles per transformer call. Auto: as many as fit an activation budget of half the GPU memory found free
        at this pipeline's first automatic call on that device (2 GiB on the CPU), kept for the pipeline's life so
        every later call batches alike; the choice is exposed as ``self.tile_batch_size``. Batch size changes
        rounding only."""
        if requested is not None:
            if int(requested) < 1:
                raise ValueError(f"tile_batch_size must be >= 1, got {requested}")
            self.tile_batch_size = int(requested)
            return min(self.tile_batch_size, tiles)
        width = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        per_tile = tokens * width * _BYTES_PER_TOKEN_CHANNEL
        if device not in self._activation_budget:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                self._activation_budget[device] = int(free * _FREE_MEMORY_SHARE)
            else:
                self._activation_budget[device] = _CPU_ACTIVATION_BUDGET
        self.tile_batch_size = max(1, self._activation_budget[device] // per_tile)
        return min(tiles, self.tile_batch_size)

    # -- compiled inference -------------------------------------------------------------------------
    def enable_compile(self, **compile_options: Any) -> dict[str, Any]:
        """``torch.compile`` the transformer's repeated blocks (regional, dynamic batch: one compile serves
        every tile batch, image and frame); ``compile_options`` go to ``torch.compile`` (e.g. ``mode=
        "max-autotune-no-cudagraphs"``). Outputs match eager up to rounding. See ``dit4sr.compile``."""
        from .compile import compile_transformer

        return compile_transformer(self.transformer, **compile_options)

    # -- sampling -----------------------------------------------------------------------------------
    def _velocity(self, tiles, lr_tiles, timestep, sigma, cond, uncond, guidance_scale):
        """Velocity for a batch of tiles; with guidance, both halves go through one transformer call."""
        config = self.transformer.config
        dtype = self.transformer.dtype
        batch = tiles.shape[0]
        hidden = tiles.to(dtype)
        text, pooled = cond
        if uncond is not None:
            hidden, lr_tiles = torch.cat([hidden, hidden]), torch.cat([lr_tiles, lr_tiles])
            text = torch.cat([uncond[0].expand(batch, -1, -1), text.expand(batch, -1, -1)])
            pooled = torch.cat([uncond[1].expand(batch, -1), pooled.expand(batch, -1)])
        else:
            text, pooled = text.expand(batch, -1, -1), pooled.expand(batch, -1)
        out = self.transformer(hidden, lr_tiles, text, pooled, timestep.expand(hidden.shape[0])).sample.float()
        noisy = tiles if uncond is None else torch.cat([tiles, tiles])
        velocity = predicted_velocity(out, noisy, lr_tiles.float(), sigma, config.prediction_type,
                                      config.lr_residual)
        if uncond is None:
            return velocity
        v_uncond, v_cond = velocity.chunk(2)
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def _step(self, latents, lr_tiles, items, grid, weights, batch_size, step, timestep, sigmas, cond, uncond,
              guidance_scale, progress) -> torch.Tensor:
        """One Euler step over every tile of every image: gather, predict in batches, blend, step the latents."""
        tiles = torch.cat([latents[(image, slice(None), *grid.slices(tile))][None] for image, tile in items])
        velocity = torch.zeros_like(latents)
        for start in range(0, len(items), batch_size):
            stop = min(start + batch_size, len(items))
            predicted = self._velocity(tiles[start:stop], lr_tiles[start:stop], timestep, sigmas[step],
                                       cond, uncond, guidance_scale)
            # Fixed item order, whatever the batching: batch size only changes rounding in the model.
            for j, (image, tile) in enumerate(items[start:stop]):
                ys, xs = grid.slices(tile)
                velocity[image:image + 1, :, ys, xs].addcmul_(predicted[j:j + 1], weights[tile])
            progress.update(stop - start)
        return self.scheduler.step(velocity, timestep, latents, return_dict=False)[0]

    def _denoise(self, lr_latents, grid, settings, cond, uncond, noise, show_progress) -> torch.Tensor:
        """Sample a batch of same-size latents together: the tiles of all images share transformer calls.

        ``noise``: the starting noise, ``(1 or images, C, H, W)``; one field shared by all images is what makes
        the frames of a clip consistent.
        """
        device = lr_latents.device
        config = self.transformer.config
        images = lr_latents.shape[0]
        weights = normalized_tile_weights(grid, settings["tile_weighting"]).to(device)
        tokens = 2 * grid.tile_height * grid.tile_width // config.patch_size**2 + cond[0].shape[1]
        items = [(image, tile) for image in range(images) for tile in range(len(grid))]  # image-major
        batch_size = self._tile_batch_size(settings["tile_batch_size"], len(items),
                                           tokens * (2 if uncond is not None else 1), device)
        lr_tiles = torch.cat([lr_latents[(image, slice(None), *grid.slices(tile))][None]
                              for image, tile in items]).to(self.transformer.dtype)

        scheduler = self.scheduler
        scheduler.set_timesteps(settings["num_inference_steps"], device=device)
        sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
        noise = noise.to(device).expand(images, -1, -1, -1)
        if settings["start_point"] == "lr":
            latents = (1.0 - sigmas[0]) * lr_latents + sigmas[0] * noise
        else:
            latents = noise.clone()
        with tqdm(total=len(scheduler.timesteps) * len(items), desc="DiT4SR", unit="tile",
                  disable=not show_progress) as progress:
            for step, timestep in enumerate(scheduler.timesteps):
                latents = self._step(latents, lr_tiles, items, grid, weights, batch_size, step, timestep, sigmas,
                                     cond, uncond, settings["guidance_scale"], progress)
        if not torch.isfinite(latents).all():
            raise FloatingPointError(
                "the transformer produced NaN or infinite values; the model weights may be broken or the dtype "
                f"({self.transformer.dtype}) may overflow — try torch_dtype='float32' or 'bfloat16'")
        return latents

    def _initial_noise(self, geometry: SamplingGeometry, count: int, seeds: list[int],
                       latents: torch.Tensor | None) -> torch.Tensor:
        """``(1 or count, C, H, W)`` starting noise: the caller's ``latents``, else drawn from the seed(s)."""
        shape = (self.transformer.config.in_channels, geometry.latent_height, geometry.latent_width)
        if latents is None:
            if len(set(seeds)) == 1:  # one field shared by every image
                return whole_image_noise(shape, seeds[0])[None]
            return torch.stack([whole_image_noise(shape, seed) for seed in seeds])
        noise = latents[None] if latents.ndim == 3 else latents
        if noise.ndim != 4 or tuple(noise.shape[1:]) != shape or noise.shape[0] not in (1, count):
            raise ValueError(f"latents must have shape (1 or {count}, {', '.join(map(str, shape))}) for these "
                             f"images, got {tuple(latents.shape)}")
        return noise.float()

    def _encode_lr(self, lr_image: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        vae_config = self.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        latent_dist_mean = encode_image(self.vae, lr_image * 2.0 - 1.0, settings["vae_tiling"])
        return (latent_dist_mean.float() - shift) * vae_config.scaling_factor

    def _decode(self, latents, lr_image, alpha, target, settings) -> np.ndarray:
        vae_config = self.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        decoded = decode_latents(self.vae, latents / vae_config.scaling_factor + shift, settings["vae_tiling"])
        if not torch.isfinite(decoded).all():
            raise FloatingPointError(f"the VAE decoder produced NaN or infinite values in {self.vae.dtype}")
        restored = (decoded.float() / 2.0 + 0.5).clamp(0.0, 1.0)
        restored = apply_color_fix(settings["color_fix"], restored, lr_image).clamp(0.0, 1.0)
        restored = resize_bicubic(restored, target).clamp(0.0, 1.0)
        if alpha is not None:
            alpha_t = torch.from_numpy(alpha).to(restored.device)[None, None]
            restored = torch.cat([restored, resize_bicubic(alpha_t, target).clamp(0.0, 1.0)], dim=1)
        return restored[0].permute(1, 2, 0).cpu().numpy()

    def _upscale_group(self, inputs, upscale, settings, cond, uncond, seeds, latents, show_progress
                       ) -> list[np.ndarray]:
        """Upscale same-size images together: VAE one image at a time, the transformer over all their tiles."""
        device = self._execution_device
        height, width = inputs[0][0].shape[:2]
        target = (max(1, round(height * upscale)), max(1, round(width * upscale)))
        geometry = self._geometry(height, width, upscale, settings)
        lr_images = []
        for rgb, _ in inputs:
            x = torch.from_numpy(rgb).to(device).permute(2, 0, 1)[None]
            for size in geometry.resizes:
                x = resize_bicubic(x, size).clamp(0.0, 1.0)  # the official PIL resizes clamp to 8 bits each time
            lr_images.append(x)
        lr_latents = torch.cat([self._encode_lr(lr_image, settings) for lr_image in lr_images])
        noise = self._initial_noise(geometry, len(inputs), seeds, latents)
        sampled = self._denoise(lr_latents, geometry.grid, settings, cond, uncond, noise, show_progress)
        return [self._decode(sampled[i:i + 1], lr_images[i], alpha, target, settings)
                for i, (_, alpha) in enumerate(inputs)]

    @staticmethod
    def _check_settings(upscale, settings, output_type):
        if isinstance(upscale, bool) or not isinstance(upscale, numbers.Real) or not math.isfinite(upscale) \
                or upscale < 1:
            raise ValueError(f"upscale must be a number >= 1, got {upscale!r}")
        if int(settings["num_inference_steps"]) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {settings['num_inference_steps']}")
        if settings["start_point"] not in START_POINTS:
            raise ValueError(f"start_point must be one of {START_POINTS}, got {settings['start_point']!r}")
        if settings["color_fix"] not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {settings['color_fix']!r}")
        if settings["tile_weighting"] not in TILE_WEIGHTINGS:
            raise ValueError(f"tile_weighting must be one of {TILE_WEIGHTINGS}, got {settings['tile_weighting']!r}")
        if settings["vae_tiling"] not in VAE_TILINGS:
            raise ValueError(f"vae_tiling must be one of {VAE_TILINGS}, got {settings['vae_tiling']!r}")
        if int(settings["process_size"]) < 0:
            raise ValueError(f"process_size must be >= 0, got {settings['process_size']}")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | np.ndarray | list[PIL.Image.Image | np.ndarray],
        upscale: float = 4,
        prompt: str = "",
        negative_prompt: str | None = None,
        added_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        start_point: str | None = None,
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: int | tuple[int, int] | None = None,
        tile_batch_size: int | None = None,
        color_fix: str | None = None,
        seed: int | list[int] = 0,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        show_progress: bool = True,
        tile_weighting: str | None = None,
        process_size: int | None = None,
        vae_tiling: str | None = None,
    ) -> DiT4SRPipelineOutput:
        """Upscale ``image`` (PIL or array, or a list of them) by ``upscale``.

        ``tile_size``/``tile_overlap`` are in latent pixels (int or (height, width)); ``tile_batch_size``
        tiles go through the transformer per call (auto by default). ``guidance_scale <= 1`` disables
        classifier-free guidance. ``tile_weighting``: "official" or "symmetric" Gaussian blending.
        ``vae_tiling``: "auto" (tiles only large images), "always" or "never". Every image in a list is
        upscaled with ``seed`` (or its own entry of a list of seeds) as if passed alone, except that images of
        one size share transformer calls (tiles batched across images: equal up to floating-point rounding).

        Noise is drawn on the CPU for the whole latent from the seed, so it depends only on the seed and the
        position in the image; ``latents`` (diffusers' convention) replaces it with the caller's own starting
        noise, ``(C, H, W)`` or ``(1 or len(image), C, H, W)`` at the latent size of ``self.geometry(...)``.
        Frames of a clip passed with one seed (or one ``latents`` field) share one noise field: no flicker
        from noise, whatever the frame index or the batch.
        """
        settings = self.effective_settings(
            negative_prompt=negative_prompt, added_prompt=added_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, start_point=start_point, tile_size=tile_size, tile_overlap=tile_overlap,
            tile_batch_size=tile_batch_size, color_fix=color_fix, tile_weighting=tile_weighting,
            process_size=process_size, vae_tiling=vae_tiling)
        self._check_settings(upscale, settings, output_type)
        images = image if isinstance(image, list) else [image]
        if not images:
            raise ValueError("no images given")
        inputs = [to_float_rgb(item) for item in images]  # validate every input before any compute

        device = self._execution_device
        cond, uncond = self._conditioning(
            prompt, settings["negative_prompt"], settings["added_prompt"], settings["guidance_scale"],
            prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)
        dtype = self.transformer.dtype
        cond, uncond = ((e.prompt_embeds[None].to(device, dtype), e.pooled_prompt_embeds[None].to(device, dtype))
                        if e is not None else None for e in (cond, uncond))

        seeds = [int(seed)] * len(inputs) if isinstance(seed, numbers.Integral) else [int(s) for s in seed]
        if len(seeds) != len(inputs):
            raise ValueError(f"got {len(seeds)} seeds for {len(inputs)} images")
        if latents is not None and len({rgb.shape[:2] for rgb, _ in inputs}) > 1:
            raise ValueError("latents apply to images of one size; pass same-size images (e.g. a clip's frames)")
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (rgb, _) in enumerate(inputs):
            groups.setdefault(rgb.shape[:2], []).append(index)
        results: list[np.ndarray | None] = [None] * len(inputs)
        for indices in groups.values():
            group_latents = latents if latents is None or latents.ndim == 3 or latents.shape[0] == 1 \
                else latents[indices]
            upscaled = self._upscale_group([inputs[i] for i in indices], upscale, settings, cond, uncond,
                                           [seeds[i] for i in indices], group_latents, show_progress)
            for i, result in zip(indices, upscaled):
                results[i] = result
        outputs = [to_pil(result[..., :3], result[..., 3] if alpha is not None else None)
                   if output_type == "pil" else result for result, (_, alpha) in zip(results, inputs)]
        return DiT4SRPipelineOutput(images=outputs)
