"""``DiT4SRTransformer2DModel``: the DiT4SR diffusion transformer, checkpoint-compatible with the official releases."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from diffusers.utils import BaseOutput
from safetensors.torch import load_file
from torch import nn

from ..files import local_copy
from .attention import RELEASES, DiT4SRAttention, DiT4SRJointTransformerBlock

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
PREDICTION_TYPES = ("flow", "sample")


@dataclass
class DiT4SRTransformerOutput(BaseOutput):
    sample: torch.Tensor


class DiT4SRTransformer2DModel(ModelMixin, ConfigMixin):
    """SD3.5 MMDiT that attends jointly over noisy-latent tokens, LR-latent tokens and text tokens.

    Takes the official ``SD3Transformer2DModel`` config keys plus:

    * ``release`` — ``"r1"`` (``dit4sr_r1``) or ``"v1"`` (``dit4sr_q``/``dit4sr_f``); see ``DiT4SRAttention``.
    * ``prediction_type`` — what the network output means: ``"flow"`` (the official velocity
      ``noise - x0``) or ``"sample"`` (x0 itself, for small models trained from scratch).
    * ``lr_residual`` — when true, x0 is expressed as a residual over the LR latent (``x0 = lr + out``).

    The last two only matter to samplers and trainers (``dit4sr.parameterization``); the forward pass
    always returns the raw network output.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiT4SRJointTransformerBlock"]
    # diffusers' regional compilation (``compile_repeated_blocks``) compiles these: one graph per block kind.
    _repeated_blocks = ["DiT4SRJointTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 384,
        dual_attention_layers: tuple[int, ...] = tuple(range(13)),
        qk_norm: str | None = "rms_norm",
        release: str = "r1",
        prediction_type: str = "flow",
        lr_residual: bool = False,
    ):
        super().__init__()
        if release not in RELEASES:
            raise ValueError(f"release must be one of {RELEASES}, got {release!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.inner_dim = num_attention_heads * attention_head_dim

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
            pos_embed_max_size=pos_embed_max_size,
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=self.inner_dim, pooled_projection_dim=pooled_projection_dim
        )
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                DiT4SRJointTransformerBlock(
                    dim=self.inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=i == num_layers - 1,
                    qk_norm=qk_norm,
                    use_dual_attention=i in dual_attention_layers,
                    release=release,
                )
                for i in range(num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels, bias=True)
        self.gradient_checkpointing = False
        self.compiled_blocks = None  # what ``dit4sr.compile.compile_transformer`` did, once it has

    # -- forward ---------------------------------------------------------------------------------
    def _check_inputs(self, hidden_states, lr_latents, encoder_hidden_states, pooled_projections, timestep):
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be (batch, {cfg.in_channels}, height, width), got {tuple(hidden_states.shape)}"
            )
        if lr_latents.shape != hidden_states.shape:
            raise ValueError(
                f"lr_latents shape {tuple(lr_latents.shape)} must equal hidden_states shape "
                f"{tuple(hidden_states.shape)}"
            )
        height, width = hidden_states.shape[-2:]
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"latent grid {height}x{width} is not divisible by the patch size {cfg.patch_size}"
            )
        batch = hidden_states.shape[0]
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != batch
            or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim
        ):
            raise ValueError(
                f"encoder_hidden_states must be ({batch}, tokens, {cfg.joint_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        if pooled_projections.shape != (batch, cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must be ({batch}, {cfg.pooled_projection_dim}), "
                f"got {tuple(pooled_projections.shape)}"
            )
        if timestep.ndim != 1 or timestep.shape[0] != batch:
            raise ValueError(f"timestep must be ({batch},), got {tuple(timestep.shape)}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        lr_latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        return_dict: bool = True,
    ) -> DiT4SRTransformerOutput | tuple[torch.Tensor]:
        """Predict for a batch of noisy latents conditioned on LR latents of the same shape.

        ``timestep`` is in the scheduler's scale (0..1000). Any batch size and any grid whose sides
        divide by ``patch_size`` (up to ``pos_embed_max_size`` tokens a side) work.
        """
        self._check_inputs(hidden_states, lr_latents, encoder_hidden_states, pooled_projections, timestep)
        height, width = hidden_states.shape[-2:]
        patch = self.config.patch_size
        grid = (height // patch, width // patch)

        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        # The LR latent goes through the same patch embedding (and positions) as the noisy latent.
        tokens = torch.cat([self.pos_embed(hidden_states), self.pos_embed(lr_latents)], dim=1)

        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                encoder_hidden_states, tokens = self._gradient_checkpointing_func(
                    block, tokens, encoder_hidden_states, temb, grid
                )
            else:
                encoder_hidden_states, tokens = block(tokens, encoder_hidden_states, temb, grid)

        hr_tokens = tokens[:, : grid[0] * grid[1]]
        out = self.proj_out(self.norm_out(hr_tokens, temb))
        batch = out.shape[0]
        out = out.reshape(batch, grid[0], grid[1], patch, patch, self.out_channels)
        sample = torch.einsum("nhwpqc->nchpwq", out).reshape(batch, self.out_channels, height, width)
        if not return_dict:
            return (sample,)
        return DiT4SRTransformerOutput(sample=sample)

    # -- inference-only fusion -------------------------------------------------------------------
    def _attentions(self):
        return [m for m in self.modules() if isinstance(m, DiT4SRAttention)]

    def fuse_control_projections(self) -> None:
        """Fold each ``to_x_control ∘ to_x`` pair (x in q, k, v) into one linear map for inference.

        Saves one ``inner_dim x inner_dim`` matmul per LR projection. Weights saved afterwards are
        unchanged (the fused maps are not part of the state dict); call again after editing weights.
        """
        for attention in self._attentions():
            attention.fuse_control_projections()

    def unfuse_control_projections(self) -> None:
        for attention in self._attentions():
            if attention.control_projections_fused:
                attention.unfuse_control_projections()

    # -- loading ---------------------------------------------------------------------------------
    @staticmethod
    def detect_release(state_dict: dict[str, torch.Tensor]) -> str:
        """The first release never trained ``to_k_control`` (its output was ignored): it stays exactly zero."""
        keys = [k for k in state_dict if k.endswith("to_k_control.weight")]
        if not keys:
            raise ValueError("state dict has no to_k_control weights: not a DiT4SR checkpoint")
        return "v1" if all(torch.count_nonzero(state_dict[k]) == 0 for k in keys) else "r1"

    def load_checked_state_dict(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
        """Strict load that names every missing and unexpected key, casting all tensors to one dtype."""
        expected = set(self.state_dict())
        missing = sorted(expected - state_dict.keys())
        unexpected = sorted(state_dict.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match {type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}"
            )
        dtype = dtype or next(self.parameters()).dtype
        self.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        release: str | None = None,
        storage_options: dict[str, Any] | None = None,
        **config_overrides: Any,
    ) -> "DiT4SRTransformer2DModel":
        """Load ``<root>[/subfolder]/{config.json, diffusion_pytorch_model.safetensors}``.

        ``root`` is a local path or any fsspec URL (``s3://bucket/dit4sr``). The official files mix fp16
        base weights and fp32 control weights; everything is cast to ``torch_dtype``. The official config
        does not name the release: pass ``release=`` or let it be detected from the weights.
        """
        root = local_copy(str(pretrained_model_name_or_path), subfolder, storage_options)
        config_path = os.path.join(root, CONFIG_NAME)
        weights_path = os.path.join(root, WEIGHTS_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {root}")
        if not os.path.isfile(weights_path):
            others = sorted(f for f in os.listdir(root) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
            hint = f" (found {others}; only safetensors weights are loaded, pickled files never are)" if others else ""
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {root}{hint}")
        with open(config_path) as f:
            config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        config.update(config_overrides)

        state_dict = load_file(weights_path)
        detected = cls.detect_release(state_dict)
        if release is None:
            release = config.get("release") or detected
            logger.info("DiT4SR release %r chosen for %s (to_k_control %s)", release, root,
                        "all zero" if detected == "v1" else "trained")
        elif release != detected:
            logger.warning("release=%r requested but the weights look like %r", release, detected)
        config["release"] = release

        # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast, even with none.
        model = torch.nn.Module.to(cls.from_config(config), torch_dtype)
        model.load_checked_state_dict(state_dict, torch_dtype)
        return model.eval()
