"""The DiT4SR joint-attention block: an SD3.5 MMDiT block with a second (LR) image-token stream.

The HR tokens (noisy latent) and LR tokens (low-resolution latent) travel through the block as one
sequence ``[HR; LR]`` of shape ``(B, 2N, D)``: they share ``norm1`` modulation, the frozen q/k/v/out
projections and the feed-forward, exactly as in the official implementation. Only the LR stream gets
extra ``*_control`` projections and the feed-forward gets a depthwise 3x3 convolution from LR to HR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from torch import nn

RELEASES = ("r1", "v1")

# The official feed-forward scales the LR-to-HR depthwise convolution by this factor.
CONTROL_CONV_SCALE = 1.2


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, heads, inner // heads).transpose(1, 2)


class DiT4SRAttention(Attention):
    """diffusers ``Attention`` plus the LR-stream projections ``to_{q,k,v}_control`` and ``to_out_control``.

    ``release`` selects the keys of the LR stream: ``"v1"`` (the first release) replaced them with the
    HR keys after their normalisation (``key_control = norm_k(key)`` run after ``key = norm_k(key)``,
    so the HR keys are normalised twice), ``"r1"`` normalises the LR keys (``norm_k(key_control)``).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_pre_only: bool, qk_norm: str | None, release: str):
        super().__init__(
            query_dim=dim,
            cross_attention_dim=None,
            added_kv_proj_dim=dim,
            dim_head=dim_head,
            heads=heads,
            out_dim=dim,
            context_pre_only=context_pre_only,
            bias=True,
            qk_norm=qk_norm,
            eps=1e-6,
        )
        self.release = release
        self.to_q_control = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_k_control = nn.Linear(dim, self.inner_kv_dim, bias=True)
        self.to_v_control = nn.Linear(dim, self.inner_kv_dim, bias=True)
        self.to_out_control = nn.Linear(self.inner_dim, dim, bias=True)
        self.control_projections_fused = False

    # -- inference-only fusion of to_*_control ∘ to_* --------------------------------------------
    def fuse_control_projections(self) -> None:
        """Fold ``to_x_control(to_x(·))`` into one linear map per x in {q, k, v} (inference only).

        The fused weights are non-persistent buffers: the state dict keeps the official keys.
        """
        for name in ("q", "k", "v"):
            base, control = getattr(self, f"to_{name}"), getattr(self, f"to_{name}_control")
            with torch.no_grad():  # fold in float32: half-precision products would round twice
                c_weight, b_weight = control.weight.float(), base.weight.float()
                weight = (c_weight @ b_weight).to(base.weight.dtype)
                bias = (c_weight @ base.bias.float() + control.bias.float()).to(base.bias.dtype)
            self.register_buffer(f"_fused_{name}_weight", weight, persistent=False)
            self.register_buffer(f"_fused_{name}_bias", bias, persistent=False)
        self.control_projections_fused = True

    def unfuse_control_projections(self) -> None:
        for name in ("q", "k", "v"):
            for part in ("weight", "bias"):
                delattr(self, f"_fused_{name}_{part}")
        self.control_projections_fused = False

    def _control_projection(self, name: str, lr: torch.Tensor) -> torch.Tensor:
        if self.control_projections_fused:
            return F.linear(lr, getattr(self, f"_fused_{name}_weight"), getattr(self, f"_fused_{name}_bias"))
        return getattr(self, f"to_{name}_control")(getattr(self, f"to_{name}")(lr))

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states`` is ``[HR; LR]`` (B, 2N, D); returns the same layout (and the text stream)."""
        hr, lr = hidden_states.chunk(2, dim=1)
        n_image = hidden_states.shape[1]

        query, key, value = (_heads(getattr(self, f"to_{x}")(hr), self.heads) for x in ("q", "k", "v"))
        query_lr, key_lr, value_lr = (_heads(self._control_projection(x, lr), self.heads) for x in ("q", "k", "v"))
        if self.norm_q is not None:
            query_lr = self.norm_q(query_lr)
            query = self.norm_q(query)
        if self.norm_k is not None:
            key = self.norm_k(key)
            # v1 overwrote the LR keys with the (already normalised) HR keys, normalised once more.
            key_lr = self.norm_k(key if self.release == "v1" else key_lr)

        queries, keys, values = [query, query_lr], [key, key_lr], [value, value_lr]
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (
                _heads(getattr(self, f"add_{x}_proj")(encoder_hidden_states), self.heads) for x in ("q", "k", "v")
            )
            if self.norm_added_q is not None:
                text_q = self.norm_added_q(text_q)
            if self.norm_added_k is not None:
                text_k = self.norm_added_k(text_k)
            queries.append(text_q)
            keys.append(text_k)
            values.append(text_v)

        out = F.scaled_dot_product_attention(torch.cat(queries, 2), torch.cat(keys, 2), torch.cat(values, 2))
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        image_out, text_out = out[:, :n_image], out[:, n_image:]

        hr_out, lr_out = image_out.chunk(2, dim=1)
        # The LR stream is residual over its (modulated) input before its own output projection.
        lr_out = self.to_out_control(lr_out + lr)
        image_out = torch.cat([self.to_out[1](self.to_out[0](hr_out)), lr_out], dim=1)

        if encoder_hidden_states is None:
            return image_out
        text_out = None if self.context_pre_only else self.to_add_out(text_out)
        return image_out, text_out


class DiT4SRFeedForward(FeedForward):
    """GELU(tanh) feed-forward shared by HR and LR tokens; after the activation the HR half receives
    ``CONTROL_CONV_SCALE * depthwise_conv3x3(LR half)`` on the token grid."""

    def __init__(self, dim: int):
        super().__init__(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        inner_dim = self.net[2].in_features
        self.control_conv = nn.Conv2d(inner_dim, inner_dim, 3, padding=1, groups=inner_dim)

    def forward(self, hidden_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        hidden_states = self.net[1](self.net[0](hidden_states))
        hr, lr = hidden_states.chunk(2, dim=1)
        batch, tokens, channels = lr.shape
        height, width = grid
        lr_map = lr.transpose(1, 2).reshape(batch, channels, height, width)
        hr = hr + CONTROL_CONV_SCALE * self.control_conv(lr_map).flatten(2).transpose(1, 2)
        hidden_states = torch.cat([hr, lr], dim=1)
        for module in self.net[2:]:
            hidden_states = module(hidden_states)
        return hidden_states


class DiT4SRJointTransformerBlock(nn.Module):
    """SD3.5 MMDiT block over ``[HR; LR]`` image tokens and text tokens (``context_pre_only`` for the last)."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        context_pre_only: bool,
        qk_norm: str | None,
        use_dual_attention: bool,
        release: str,
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = SD35AdaLayerNormZeroX(dim) if use_dual_attention else AdaLayerNormZero(dim)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(
                dim, dim, elementwise_affine=False, eps=1e-6, bias=True, norm_type="layer_norm"
            )
        else:
            self.norm1_context = AdaLayerNormZero(dim)

        def attention(pre_only: bool) -> DiT4SRAttention:
            return DiT4SRAttention(dim, num_attention_heads, attention_head_dim, pre_only, qk_norm, release)

        self.attn = attention(context_pre_only)
        # attn2 only mixes image tokens; its text projections exist (and are in the checkpoints) but are unused.
        self.attn2 = attention(context_pre_only) if use_dual_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = DiT4SRFeedForward(dim)
        if context_pre_only:
            self.norm2_context = None
            self.ff_context = None
        else:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        grid: tuple[int, int],
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.use_dual_attention:
            norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden2, gate_msa2 = self.norm1(
                hidden_states, emb=temb
            )
        else:
            norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)

        if self.context_pre_only:
            norm_encoder = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_encoder, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                encoder_hidden_states, emb=temb
            )

        attn_out, context_attn_out = self.attn(norm_hidden, norm_encoder)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
        if self.use_dual_attention:
            hidden_states = hidden_states + gate_msa2.unsqueeze(1) * self.attn2(norm_hidden2)

        norm_hidden = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm_hidden, grid)

        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_out
        norm_encoder = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(norm_encoder)
        return encoder_hidden_states, hidden_states
