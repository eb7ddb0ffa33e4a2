"""``DiT4SRPipeline``: super-resolution of any image size with a DiT4SR transformer.

The method follows the official DiT4SR test script: the input is bicubic-upscaled (short side first raised
to ``process_size // upscale`` when smaller, size then rounded down to the VAE factor), encoded (latent
*mean*, never an unseeded sample), denoised with flow-matching Euler steps conditioned on the LR latent and
a prompt (classifier-free guidance against the official negative prompt), decoded, colour-corrected
against the bicubic image and resized to exactly ``upscale x`` the input size.

Where the official code stops working it keeps going:

* latent tiles (``dit4sr.tiling``) of any shape are batched into few transformer calls, conditional and
  unconditional halves together, blended with the official Gaussian weights;
* noise is drawn for the whole latent from ``generator`` (or ``seed``: a CPU generator seeded with it), so
  results do not depend on the tile grid, the batch or the machine's RNG; bytes repeat exactly for the same
  inputs, settings and software;
* large images go through the VAE in tiles that share GroupNorm statistics (``dit4sr.vae_tiling``);
* text encoders are optional: prompts can be given as embeddings (``dit4sr.prompt_cache``), and the
  model's stored null-prompt embedding stands in for an empty prompt;
* the meaning of the network output (``prediction_type``, ``lr_residual`` in the transformer config) is
  honoured through ``dit4sr.parameterization``, so small x0/residual models share this sampler.

It follows diffusers' pipeline conventions: ``check_inputs``, ``prepare_latents`` (``latents=``), one denoising
loop in ``__call__`` with ``callback_on_step_end`` and ``interrupt``, ``output_type`` ("pil", "np", "latent") and
``return_dict``, ``self.progress_bar``, model offloading hooks (``maybe_free_model_hooks``).

Settings left as ``None`` resolve as: caller's value > the model's ``recommended_settings.json`` > the
official default (``dit4sr.settings.OFFICIAL_SETTINGS``). Inputs smaller than the processing size are scaled up by the
short-side rule (and never below one latent patch), so even a 1x1 image works; empty images raise
``ValueError``.

Deliberate differences from the official script, none of which changes the method: resizes use Pillow's
bicubic kernel in float without 8-bit rounding between steps; guidance is combined per tile batch before
blending (linear, so equal up to rounding); the ``added_prompt`` suffix is appended to non-empty prompts only
(an empty prompt is the null prompt); where a latent side is shorter than the tile, the tile is clipped on
that side instead of shrunk to a square.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from . import vae_tiling
from .color_fix import COLOR_FIXES, apply_color_fix
from .devices import resolve_device, resolve_dtype
from .geometry import SamplingGeometry, plan_geometry, resize_plan
from .image_processing import resize_bicubic, to_float_rgb, to_pil
from .loading import TEXT_COMPONENTS, load_component, read_json, resolve_root
from .models import DiT4SRTransformer2DModel, PixelUnshuffleAutoencoder
from .parameterization import predicted_velocity
from .prompt_cache import PromptEmbedding, load_null_prompt_embedding
from .settings import START_POINTS, compose_prompt, effective_settings, read_recommended_settings
from .tiling import TILE_WEIGHTINGS, TileGrid, normalized_tile_weights

# Bump whenever a sampler change alters output bytes (the catalog folds it into its config fingerprint).
SAMPLER_VERSION = "1"

OUTPUT_TYPES = ("pil", "np", "latent")
# Activation budget per tile batch for the automatic tile_batch_size: tokens x width x this many bytes.
_BYTES_PER_TOKEN_CHANNEL = 24
_CPU_ACTIVATION_BUDGET = 2 << 30
# Share of the GPU memory found free (weights loaded) that tile batches may use; the rest is headroom for the
# VAE, the allocator's fragmentation and whatever else shares the GPU.
_FREE_MEMORY_SHARE = 0.5


@dataclass
class DiT4SRPipelineOutput(BaseOutput):
    """``images``: PIL images, or float32 HxWx3 (HxWx4 with alpha) arrays in [0, 1]; with ``output_type="latent"``
    the sampled latents, one float32 ``(N, C, h, w)`` tensor (``DiT4SRPipeline.decode_latents`` turns them into
    images)."""

    images: list[PIL.Image.Image] | list[np.ndarray] | torch.Tensor


class DiT4SRPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    # What ``callback_on_step_end`` may read and replace: the latents being denoised and the LR latents that
    # condition them, ``(N, C, h, w)`` for the N same-size images sampled together.
    _callback_tensor_inputs = ["latents", "lr_latents"]
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
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._interrupt = False
        self.set_progress_bar_config(desc="DiT4SR", unit="tile")
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

    @property
    def execution_device(self) -> torch.device:
        """Where the models run (with model offloading: where they are moved for each call)."""
        return self._execution_device

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. from ``callback_on_step_end``) to skip the remaining steps: the
        images are then decoded from where their latents are."""
        return self._interrupt

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
        root = resolve_root(pretrained_model_name_or_path)
        device = resolve_device(device)
        dtype = resolve_dtype(torch_dtype, device)
        index = read_json(root, "model_index.json", storage_options)
        if index is None:
            raise FileNotFoundError(f"no model_index.json in {root}")

        roots = [root]
        if isinstance(transformer, (str, os.PathLike)):
            transformer_root = resolve_root(transformer)
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

        components = {name: load_component(root, name, index[name], dtype, storage_options)
                      for name in ("vae", "scheduler")}
        if load_text_encoders:
            for name in TEXT_COMPONENTS:
                if not index.get(name) or index[name][0] is None:
                    raise ValueError(f"load_text_encoders=True but {root} has no {name}")
                components[name] = load_component(root, name, index[name], dtype, storage_options)

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
                *(getattr(self, name) for name in TEXT_COMPONENTS), device=self.execution_device)
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

    def _prompt_embeddings(self, prompt, settings, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                           negative_pooled_prompt_embeds) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                   tuple[torch.Tensor, torch.Tensor] | None]:
        """``(embeds, pooled)`` of the prompt and of the negative prompt (``None`` without guidance), batch 1, on
        the execution device in the transformer's dtype."""
        positive, negative = self.prompt_texts(prompt, settings["negative_prompt"], settings["added_prompt"],
                                               settings["guidance_scale"])
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
        device, dtype = self.execution_device, self.transformer.dtype
        return tuple((e.prompt_embeds[None].to(device, dtype), e.pooled_prompt_embeds[None].to(device, dtype))
                     if e is not None else None for e in (cond, uncond))

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

    def _tile_batch_size(self, requested: int | None, tiles: int, tokens: int, device: torch.device) -> int:
        """Tiles per transformer call. Auto: as many as fit an activation budget of half the GPU memory found free
        at this pipeline's first automatic call on that device (2 GiB on the CPU), kept for the pipeline's life so
        every later call batches alike; the choice is exposed as ``self.tile_batch_size``. Batch size changes
        rounding only."""
        if requested is not None:
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

    # -- the steps of a call ----------------------------------------------------------------------------
    def check_inputs(
        self,
        image_sizes: list[tuple[int, int]],
        upscale: float,
        settings: dict[str, Any],
        output_type: str = "pil",
        prompt: str = "",
        prompt_embeds: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """Raise ``ValueError`` for anything a call cannot run, before any compute. ``image_sizes``: each input's
        (height, width); ``settings``: resolved (``effective_settings``)."""
        if not image_sizes:
            raise ValueError("no images given")
        if isinstance(upscale, bool) or not isinstance(upscale, numbers.Real) or not math.isfinite(upscale) \
                or upscale < 1:
            raise ValueError(f"upscale must be a number >= 1, got {upscale!r}")
        if int(settings["num_inference_steps"]) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {settings['num_inference_steps']}")
        for name, allowed in (("start_point", START_POINTS), ("color_fix", COLOR_FIXES),
                              ("tile_weighting", TILE_WEIGHTINGS), ("vae_tiling", vae_tiling.VAE_TILINGS)):
            if settings[name] not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {settings[name]!r}")
        if int(settings["process_size"]) < 0:
            raise ValueError(f"process_size must be >= 0, got {settings['process_size']}")
        if settings["tile_batch_size"] is not None and int(settings["tile_batch_size"]) < 1:
            raise ValueError(f"tile_batch_size must be >= 1, got {settings['tile_batch_size']}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")
        if prompt and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        for name, given in (("seeds", seed), ("generators", generator)):
            if isinstance(given, (list, tuple)) and len(given) != len(image_sizes):
                raise ValueError(f"got {len(given)} {name} for {len(image_sizes)} images")
        if len(set(image_sizes)) > 1:
            if latents is not None:
                raise ValueError("latents apply to images of one size; pass same-size images (e.g. a clip's frames)")
            if output_type == "latent":
                raise ValueError("output_type='latent' returns one latent batch: pass images of one size")

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator],
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(batch_size, C, h, w)`` float32 starting noise for images sampled at ``height x width`` pixels: the
        caller's ``latents`` (``(C, h, w)`` or ``(1 or batch_size, C, h, w)``), else standard normal noise drawn
        for the whole latent from ``generator`` on its own device — one field shared by every image from a single
        generator, one per image from a list — so a tile's noise depends only on its position, never on the tile
        grid or the batch."""
        shape = (num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            generators = generator if isinstance(generator, list) else [generator]
            fields = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
            noise = torch.stack(fields)
        else:
            noise = latents[None] if latents.ndim == 3 else latents
            if noise.ndim != 4 or tuple(noise.shape[1:]) != shape or noise.shape[0] not in (1, batch_size):
                raise ValueError(f"latents must have shape (1 or {batch_size}, {', '.join(map(str, shape))}) for "
                                 f"these images, got {tuple(latents.shape)}")
        return noise.float().to(device).expand(batch_size, -1, -1, -1)

    def _lr_image(self, rgb: np.ndarray, resizes: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """The input at the model's working size: the official sequence of bicubic resizes."""
        x = torch.from_numpy(rgb).to(self.execution_device).permute(2, 0, 1)[None]
        for size in resizes:
            x = resize_bicubic(x, size).clamp(0.0, 1.0)  # the official PIL resizes clamp to 8 bits each time
        return x

    def _encode_lr(self, lr_image: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        vae_config = self.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        latent_dist_mean = vae_tiling.encode_image(self.vae, lr_image * 2.0 - 1.0, settings["vae_tiling"])
        return (latent_dist_mean.float() - shift) * vae_config.scaling_factor

    def _tiled_velocity(self, latents: torch.Tensor, lr_latents: torch.Tensor, grid: TileGrid, weights: torch.Tensor,
                        batch_size: int, timestep: torch.Tensor, sigma: torch.Tensor, cond, uncond, progress
                        ) -> torch.Tensor:
        """The velocity of every tile of every image, blended with the normalised tile weights. Tiles of all images
        share transformer calls of ``batch_size`` tiles (with guidance, both halves in one call), always in the same
        image-major order: the batch size changes rounding only."""
        config, dtype = self.transformer.config, self.transformer.dtype
        items = [(image, tile) for image in range(latents.shape[0]) for tile in range(len(grid))]
        tiles = torch.cat([latents[(image, slice(None), *grid.slices(tile))][None] for image, tile in items])
        lr_tiles = torch.cat([lr_latents[(image, slice(None), *grid.slices(tile))][None]
                              for image, tile in items]).to(dtype)
        velocity = torch.zeros_like(latents)
        for start in range(0, len(items), batch_size):
            stop = min(start + batch_size, len(items))
            noisy, lr, count = tiles[start:stop], lr_tiles[start:stop], stop - start
            text, pooled = cond[0].expand(count, -1, -1), cond[1].expand(count, -1)
            if uncond is not None:
                noisy, lr = torch.cat([noisy, noisy]), torch.cat([lr, lr])
                text = torch.cat([uncond[0].expand(count, -1, -1), text])
                pooled = torch.cat([uncond[1].expand(count, -1), pooled])
            out = self.transformer(noisy.to(dtype), lr, text, pooled, timestep.expand(noisy.shape[0])).sample.float()
            predicted = predicted_velocity(out, noisy, lr.float(), sigma, config.prediction_type, config.lr_residual)
            if uncond is not None:
                v_uncond, v_cond = predicted.chunk(2)
                predicted = v_uncond + self.guidance_scale * (v_cond - v_uncond)
            for j, (image, tile) in enumerate(items[start:stop]):
                ys, xs = grid.slices(tile)
                velocity[image:image + 1, :, ys, xs].addcmul_(predicted[j:j + 1], weights[tile])
            progress.update(count)
        return velocity

    def _postprocess(self, latents: torch.Tensor, lr_image: torch.Tensor, alpha: np.ndarray | None,
                     target: tuple[int, int], settings: dict[str, Any]) -> np.ndarray:
        """One image from its sampled latents: VAE decode, colour fix against the bicubic input, resize to the
        exact target size, alpha (upscaled bicubic) re-attached; float32 HxWxC in [0, 1]."""
        vae_config = self.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        decoded = vae_tiling.decode_latents(self.vae, latents / vae_config.scaling_factor + shift,
                                            settings["vae_tiling"])
        if not torch.isfinite(decoded).all():
            raise FloatingPointError(f"the VAE decoder produced NaN or infinite values in {self.vae.dtype}")
        restored = (decoded.float() / 2.0 + 0.5).clamp(0.0, 1.0)
        restored = apply_color_fix(settings["color_fix"], restored, lr_image).clamp(0.0, 1.0)
        restored = resize_bicubic(restored, target).clamp(0.0, 1.0)
        if alpha is not None:
            alpha_t = torch.from_numpy(alpha).to(restored.device)[None, None]
            restored = torch.cat([restored, resize_bicubic(alpha_t, target).clamp(0.0, 1.0)], dim=1)
        return restored[0].permute(1, 2, 0).cpu().numpy()

    @staticmethod
    def _output_image(result: np.ndarray, has_alpha: bool, output_type: str) -> PIL.Image.Image | np.ndarray:
        if output_type == "np":
            return result
        return to_pil(result[..., :3], result[..., 3] if has_alpha else None)

    @staticmethod
    def _target_size(height: int, width: int, upscale: float) -> tuple[int, int]:
        return max(1, round(height * upscale)), max(1, round(width * upscale))

    @torch.no_grad()
    def decode_latents(
        self,
        latents: torch.Tensor,
        image: PIL.Image.Image | np.ndarray | list[PIL.Image.Image | np.ndarray],
        upscale: float = 4,
        color_fix: str | None = None,
        process_size: int | None = None,
        vae_tiling: str | None = None,
        output_type: str = "pil",
    ) -> list[PIL.Image.Image] | list[np.ndarray]:
        """The images a call returns, from the latents it returned with ``output_type="latent"``: pass the same
        images, ``upscale`` and settings as that call. VAE decode, colour fix against the bicubic input, resize to
        exactly ``upscale x`` the input, alpha re-attached."""
        settings = self.effective_settings(color_fix=color_fix, process_size=process_size, vae_tiling=vae_tiling)
        inputs = [to_float_rgb(item) for item in (image if isinstance(image, list) else [image])]
        sizes = {rgb.shape[:2] for rgb, _ in inputs}
        if output_type not in ("pil", "np") or len(sizes) != 1 or latents.ndim != 4 \
                or latents.shape[0] != len(inputs):
            raise ValueError(f"decode_latents takes the (N, C, h, w) latents of N same-size images and output_type "
                             f"'pil' or 'np'; got latents {tuple(latents.shape)} for {len(inputs)} image(s) of "
                             f"{len(sizes)} size(s), output_type {output_type!r}")
        height, width = sizes.pop()
        resizes = resize_plan(height, width, upscale, settings["process_size"], self.vae_scale_factor,
                              self.transformer.config.patch_size)
        latents = latents.to(self.execution_device, torch.float32)
        results = [self._output_image(self._postprocess(latents[i:i + 1], self._lr_image(rgb, resizes), alpha,
                                                        self._target_size(height, width, upscale), settings),
                                      alpha is not None, output_type) for i, (rgb, alpha) in enumerate(inputs)]
        self.maybe_free_model_hooks()
        return results

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
        tile_weighting: str | None = None,
        color_fix: str | None = None,
        process_size: int | None = None,
        vae_tiling: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiT4SRPipeline, int, torch.Tensor, dict], dict] | PipelineCallback
        | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        show_progress: bool = True,
    ) -> DiT4SRPipelineOutput | tuple:
        """Upscale ``image`` (PIL or array, or a list of them) by ``upscale``.

        ``tile_size``/``tile_overlap`` are in latent pixels (int or (height, width)); ``tile_batch_size``
        tiles go through the transformer per call (auto by default). ``guidance_scale <= 1`` disables
        classifier-free guidance. ``tile_weighting``: "official" or "symmetric" Gaussian blending.
        ``vae_tiling``: "auto" (tiles only large images), "always" or "never". Images of one size are sampled
        together (their tiles share transformer calls: equal to one call per image up to floating-point
        rounding); each is upscaled as if passed alone.

        Noise: drawn for the whole latent from ``generator`` on its device — a single generator gives every image
        one shared field, a list one field per image — or from ``seed`` (default 0; an int or one per image),
        which means a CPU generator seeded with it: the same noise on every machine. So noise depends only on
        the seed and the position in the image; frames of a clip passed with one seed share one noise field (no
        flicker from noise, whatever the frame index or the batch). ``latents`` (diffusers' convention) is the
        caller's own starting noise, ``(C, h, w)`` or ``(1 or len(image), C, h, w)`` at the latent size of
        ``self.geometry(...)``.

        ``callback_on_step_end(pipe, step, timestep, tensors)`` runs after each step of each size group with the
        tensors named in ``callback_on_step_end_tensor_inputs`` (``latents``, ``lr_latents``) and may return
        replacements; setting ``pipe._interrupt = True`` skips the remaining steps. ``output_type``: "pil", "np"
        (float32 HxWxC in [0, 1]) or "latent" (the sampled latents; ``decode_latents`` finishes them).
        ``show_progress=False`` silences this call's progress bar (``set_progress_bar_config(disable=True)``:
        every call's). Returns a ``DiT4SRPipelineOutput``, or ``(images,)`` with ``return_dict=False``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        settings = self.effective_settings(
            negative_prompt=negative_prompt, added_prompt=added_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, start_point=start_point, tile_size=tile_size, tile_overlap=tile_overlap,
            tile_batch_size=tile_batch_size, color_fix=color_fix, tile_weighting=tile_weighting,
            process_size=process_size, vae_tiling=vae_tiling)
        # 1. Check inputs: every image decoded and every setting validated before any compute.
        inputs = [to_float_rgb(item) for item in (image if isinstance(image, list) else [image])]
        self.check_inputs([rgb.shape[:2] for rgb, _ in inputs], upscale, settings, output_type, prompt,
                          prompt_embeds, generator, seed, latents, callback_on_step_end_tensor_inputs)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (rgb, _) in enumerate(inputs):
            groups.setdefault(rgb.shape[:2], []).append(index)
        geometries = {size: self._geometry(*size, upscale, settings) for size in groups}
        if generator is None:
            seeds = list(seed) if isinstance(seed, (list, tuple)) else [0 if seed is None else seed] * len(inputs)
            generator = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self._guidance_scale = settings["guidance_scale"]
        self._interrupt = False
        device = self.execution_device
        steps = int(settings["num_inference_steps"])

        # 2. Prompt embeddings (text encoders only for prompts without a stored embedding).
        cond, uncond = self._prompt_embeddings(prompt, settings, prompt_embeds, pooled_prompt_embeds,
                                               negative_prompt_embeds, negative_pooled_prompt_embeds)
        patch_size = self.transformer.config.patch_size
        total = steps * sum(len(geometries[size].grid) * len(indices) for size, indices in groups.items())
        results: list[np.ndarray | None] = [None] * len(inputs)
        with self.progress_bar(total=total) if show_progress else tqdm(total=total, disable=True) as progress:
            for size, indices in groups.items():
                geometry, grid = geometries[size], geometries[size].grid
                # 3. LR latents and the starting latents (images of one size: one batch).
                lr_images = [self._lr_image(inputs[i][0], geometry.resizes) for i in indices]
                lr_latents = torch.cat([self._encode_lr(lr_image, settings) for lr_image in lr_images])
                noise = self.prepare_latents(
                    len(indices), self.transformer.config.in_channels, *geometry.resizes[-1], device,
                    [generator[i] for i in indices] if isinstance(generator, list) else generator, latents)
                self.scheduler.set_timesteps(steps, device=device)
                timesteps = self.scheduler.timesteps
                sigmas = self.scheduler.sigmas.to(device=device, dtype=torch.float32)
                self._num_timesteps = len(timesteps)
                group_latents = (1.0 - sigmas[0]) * lr_latents + sigmas[0] * noise \
                    if settings["start_point"] == "lr" else noise.clone()
                weights = normalized_tile_weights(grid, settings["tile_weighting"]).to(device)
                tokens = 2 * grid.tile_height * grid.tile_width // patch_size**2 + cond[0].shape[1]
                batch_size = self._tile_batch_size(settings["tile_batch_size"], len(indices) * len(grid),
                                                   tokens * (2 if uncond is not None else 1), device)
                # 4. The denoising loop: one Euler step over every tile of every image of the group.
                for step, timestep in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    velocity = self._tiled_velocity(group_latents, lr_latents, grid, weights, batch_size, timestep,
                                                    sigmas[step], cond, uncond, progress)
                    group_latents = self.scheduler.step(velocity, timestep, group_latents, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        tensors = {"latents": group_latents, "lr_latents": lr_latents}
                        replaced = callback_on_step_end(
                            self, step, timestep, {name: tensors[name] for name in callback_on_step_end_tensor_inputs})
                        group_latents = (replaced or {}).get("latents", group_latents)
                        lr_latents = (replaced or {}).get("lr_latents", lr_latents)
                if not torch.isfinite(group_latents).all():
                    raise FloatingPointError(
                        "the transformer produced NaN or infinite values; the model weights may be broken or the "
                        f"dtype ({self.transformer.dtype}) may overflow — try torch_dtype='float32' or 'bfloat16'")
                # 5. Decode (VAE one image at a time), or keep the latents.
                if output_type == "latent":
                    sampled = group_latents
                    continue
                target = self._target_size(*size, upscale)
                for j, index in enumerate(indices):
                    results[index] = self._postprocess(group_latents[j:j + 1], lr_images[j], inputs[index][1],
                                                       target, settings)
        images = sampled if output_type == "latent" else [
            self._output_image(result, alpha is not None, output_type) for result, (_, alpha) in zip(results, inputs)]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DiT4SRPipelineOutput(images=images)
