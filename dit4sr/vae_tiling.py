"""Encode and decode with an ``AutoencoderKL`` at any image size, in tiles that share GroupNorm statistics.

Tiling a VAE naively (as ``AutoencoderKL.enable_tiling`` does) normalises every tile with its own
GroupNorm statistics, which shifts colours from tile to tile and leaves seams. Here, as in the well-known
tiled-VAE approach, all tiles advance through the network in lockstep and every GroupNorm normalises each
tile with the statistics of the *whole* activation:

* Only the high-resolution part of each network is tiled (encoder: ``conv_in`` and the down blocks;
  decoder: the up blocks and output layers). The latent-resolution part — the mid block with its global
  self-attention — runs on the whole latent exactly as untiled; it is small.
* The tiled part is run as a list of layer operations split at its GroupNorms. Between two GroupNorms each
  tile is processed in turn; its activation (and pending residual) is then parked — on the CPU when the
  parked activations would crowd the GPU — while the next GroupNorm's statistics accumulate over the tile
  *cores* (each pixel counted once, merged exactly in float64).
* Tiles are disjoint cores plus a halo at least as wide as the tiled part's receptive field, so a core
  never sees a tile border; cores are pasted, not blended.

Tiled results therefore equal untiled ones up to floating-point rounding, with GPU memory bounded by one
tile. The latent is the *mean* of the posterior, never a sample. Other autoencoders
(``PixelUnshuffleAutoencoder``) act per pixel and are never tiled.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

VAE_TILINGS = ("auto", "always", "never")
ENCODER_TILE_PIXELS = 1024  # tile side in image pixels
DECODER_TILE_LATENTS = 128  # tile side in latent pixels
# On CUDA, parked tile activations stay on the GPU while they need less than this share of its memory.
_GPU_PARKING_SHARE = 0.25


# -- the tiled part as a list of operations ----------------------------------------------------------
@dataclass(frozen=True)
class _Op:
    kind: str  # "module" (x = module(x)), "norm", "save" (residual = x), "residual" (x = (shortcut(res) + x) / s)
    module: nn.Module | None = None
    scale: float = 1.0


def _resnet_ops(resnet: nn.Module) -> list[_Op]:
    if (not isinstance(resnet, ResnetBlock2D) or resnet.upsample is not None or resnet.downsample is not None
            or resnet.time_emb_proj is not None):
        raise ValueError(f"tiled VAE supports plain ResnetBlock2D layers, not {resnet!r}")
    return [_Op("save"), _Op("norm", resnet.norm1), _Op("module", resnet.nonlinearity), _Op("module", resnet.conv1),
            _Op("norm", resnet.norm2), _Op("module", resnet.nonlinearity), _Op("module", resnet.dropout),
            _Op("module", resnet.conv2), _Op("residual", resnet.conv_shortcut, resnet.output_scale_factor)]


def _block_ops(block: nn.Module, samplers: str) -> list[_Op]:
    if getattr(block, "attentions", None):
        raise ValueError(f"tiled VAE cannot tile attention blocks ({type(block).__name__})")
    ops = [op for resnet in block.resnets for op in _resnet_ops(resnet)]
    return ops + [_Op("module", sampler) for sampler in (getattr(block, samplers) or [])]


def _encoder_ops(vae: AutoencoderKL) -> list[_Op]:
    encoder = vae.encoder
    return [_Op("module", encoder.conv_in)] + [op for b in encoder.down_blocks for op in _block_ops(b, "downsamplers")]


def _decoder_ops(vae: AutoencoderKL) -> list[_Op]:
    decoder = vae.decoder
    ops = [op for block in decoder.up_blocks for op in _block_ops(block, "upsamplers")]
    if not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        raise ValueError("tiled VAE needs a GroupNorm output norm in the decoder")
    return ops + [_Op("norm", decoder.conv_norm_out), _Op("module", decoder.conv_act), _Op("module", decoder.conv_out)]


# -- shared statistics ----------------------------------------------------------------------------------
class _GroupStats:
    """Per-group count, mean and sum of squared deviations, merged exactly across tiles (Chan et al.)."""

    def __init__(self):
        self.count = 0
        self.mean = self.m2 = None

    def add(self, grouped: torch.Tensor) -> None:  # (batch, groups, values)
        values = grouped.float().transpose(0, 1).reshape(grouped.shape[1], -1)
        var, mean = torch.var_mean(values, dim=1, unbiased=False)
        count, mean, m2 = values.shape[1], mean.double(), var.double() * values.shape[1]
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta * delta * self.count * count / total
        self.count = total

    def normalize(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean.float()[None, :, None]
        inv_std = torch.rsqrt((self.m2 / self.count).float() + norm.eps)[None, :, None]
        out = ((x.float().reshape(x.shape[0], norm.num_groups, -1) - mean) * inv_std).reshape(x.shape)
        if norm.affine:
            out = out * norm.weight.float()[None, :, None, None] + norm.bias.float()[None, :, None, None]
        return out.to(x.dtype)


# -- lockstep tiled execution ----------------------------------------------------------------------------
def _cores(size: int, tile: int, align: int) -> list[tuple[int, int]]:
    count = math.ceil(size / tile)
    step = math.ceil(size / count / align) * align
    return list(itertools.pairwise([*range(0, size, step), size]))


@dataclass
class _Tile:
    core: tuple[int, int, int, int]  # top, bottom, left, right in input pixels
    crop: tuple[int, int, int, int]
    current: torch.Tensor
    residual: torch.Tensor | None = None

    def core_of(self, x: torch.Tensor) -> torch.Tensor:
        """The core region of an activation of this tile, at the activation's own resolution."""
        (top, bottom, left, right), (y0, y1, x0, x1) = self.core, self.crop
        sy, sx = x.shape[-2] / (y1 - y0), x.shape[-1] / (x1 - x0)
        rows = slice(round((top - y0) * sy), round((bottom - y0) * sy))
        return x[:, :, rows, round((left - x0) * sx):round((right - x0) * sx)]


def _segments(ops: list[_Op]) -> list[tuple[nn.GroupNorm | None, list[_Op]]]:
    segments: list[tuple[nn.GroupNorm | None, list[_Op]]] = [(None, [])]
    for op in ops:
        if op.kind == "norm":
            segments.append((op.module, []))
        else:
            segments[-1][1].append(op)
    return segments


def _apply(op: _Op, x: torch.Tensor, residual: torch.Tensor | None):
    if op.kind == "module":
        return op.module(x), residual
    if op.kind == "save":
        return x, x
    shortcut = residual if op.module is None else op.module(residual)
    return (shortcut + x) / op.scale, None


def run_tiled(ops: list[_Op], x: torch.Tensor, scale: tuple[int, int], tile: int, halo: int, align: int,
              park: torch.device) -> torch.Tensor:
    """Run ``ops`` over ``x`` (1 x C x H x W) in tiles sharing GroupNorm statistics; output scaled by num/den."""
    height, width = x.shape[-2:]
    device = x.device
    tiles = []
    for top, bottom in _cores(height, tile, align):
        for left, right in _cores(width, tile, align):
            crop = (max(0, top - halo), min(height, bottom + halo), max(0, left - halo), min(width, right + halo))
            tiles.append(_Tile((top, bottom, left, right), crop, x[:, :, crop[0]:crop[1], crop[2]:crop[3]].to(park)))

    segments = _segments(ops)
    stats = None
    for index, (norm, segment_ops) in enumerate(segments):
        next_norm = segments[index + 1][0] if index + 1 < len(segments) else None
        accumulated = _GroupStats() if next_norm is not None else None
        for t in tiles:
            h = t.current.to(device)
            residual = None if t.residual is None else t.residual.to(device)
            if norm is not None:
                h = stats.normalize(norm, h)
            for op in segment_ops:
                h, residual = _apply(op, h, residual)
            if accumulated is not None:
                core = t.core_of(h)
                accumulated.add(core.reshape(core.shape[0], next_norm.num_groups, -1))
            parked = h.to(park)
            # Right after a "save" the residual is the activation itself: park it once.
            t.current, t.residual = parked, parked if residual is h else None if residual is None else residual.to(park)
        stats = accumulated

    num, den = scale
    first = tiles[0].current
    out = torch.empty(x.shape[0], first.shape[1], height * num // den, width * num // den,
                      dtype=first.dtype, device=device)
    for t in tiles:
        top, bottom, left, right = (v * num // den for v in t.core)
        out[:, :, top:bottom, left:right] = t.core_of(t.current.to(device))
    return out


# -- geometry --------------------------------------------------------------------------------------------
def encoder_halo(vae: AutoencoderKL) -> int:
    """Receptive-field radius (image pixels) of conv_in + down blocks, rounded up to the downsampling factor."""
    layers, blocks = vae.config.layers_per_block, len(vae.config.block_out_channels)
    radius = 1 + sum(2 * layers * 2**i + (2 * 2**i if i < blocks - 1 else 0) for i in range(blocks))
    align = 2 ** (blocks - 1)
    return math.ceil(radius / align) * align


def decoder_halo(vae: AutoencoderKL) -> int:
    """Receptive-field radius (latent pixels) of the up blocks and output layers, plus one for upsampling."""
    layers, blocks = vae.config.layers_per_block, len(vae.config.block_out_channels)
    radius = sum(2 * (layers + 1) / 2**i + (1 / 2 ** (i + 1) if i < blocks - 1 else 0) for i in range(blocks))
    return math.ceil(radius + 1 / 2 ** (blocks - 1)) + 1


def _should_tile(tiling: str, pixels: int, tile: int) -> bool:
    if tiling not in VAE_TILINGS:
        raise ValueError(f"vae_tiling must be one of {VAE_TILINGS}, got {tiling!r}")
    return tiling == "always" or (tiling == "auto" and pixels > tile * tile)


def _parking(x: torch.Tensor, channels: int, pixels: int, offload: bool | None) -> torch.device:
    """Where tile activations wait between GroupNorms: the GPU unless they (two full activations) would
    take more than a quarter of its memory, or as forced by ``offload``."""
    if x.device.type != "cuda" or offload is False:
        return x.device
    if offload:
        return torch.device("cpu")
    needed = 2 * channels * pixels * x.element_size()
    budget = torch.cuda.get_device_properties(x.device).total_memory * _GPU_PARKING_SHARE
    return x.device if needed <= budget else torch.device("cpu")


def encode_image(vae, x: torch.Tensor, tiling: str = "auto", tile_size: int = ENCODER_TILE_PIXELS,
                 offload: bool | None = None) -> torch.Tensor:
    """Posterior mean for an NCHW image in [-1, 1] (tiled for ``AutoencoderKL`` when large or asked).

    ``tile_size``: tile side in image pixels. ``offload``: park tile activations on the CPU (None: auto).
    """
    x = x.to(vae.dtype)
    if not isinstance(vae, AutoencoderKL):
        return vae.encode(x).latent_dist.mean
    encoder = vae.encoder
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    ops = _encoder_ops(vae)
    if _should_tile(tiling, x.shape[-2] * x.shape[-1], tile_size):
        park = _parking(x, vae.config.block_out_channels[0], x.shape[-2] * x.shape[-1], offload)
        h = run_tiled(ops, x, (1, factor), tile=max(factor, tile_size // factor * factor),
                      halo=encoder_halo(vae), align=factor, park=park)
    else:
        h = encoder.conv_in(x)
        for block in encoder.down_blocks:
            h = block(h)
    h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(h))))
    if vae.quant_conv is not None:
        h = vae.quant_conv(h)
    return h.chunk(2, dim=1)[0]


def decode_latents(vae, z: torch.Tensor, tiling: str = "auto", tile_size: int = DECODER_TILE_LATENTS,
                   offload: bool | None = None) -> torch.Tensor:
    """Image in [-1, 1] for (unnormalised) latents (tiled for ``AutoencoderKL`` when large or asked).

    ``tile_size``: tile side in latent pixels. ``offload`` as for ``encode_image``.
    """
    z = z.to(vae.dtype)
    if not isinstance(vae, AutoencoderKL):
        return vae.decode(z).sample
    if not _should_tile(tiling, z.shape[-2] * z.shape[-1], tile_size):
        return vae.decoder(z if vae.post_quant_conv is None else vae.post_quant_conv(z))
    decoder = vae.decoder
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    h = decoder.mid_block(decoder.conv_in(z), None)
    park = _parking(h, vae.config.block_out_channels[0], z.shape[-2] * z.shape[-1] * factor**2, offload)
    return run_tiled(_decoder_ops(vae), h, (factor, 1), tile=tile_size, halo=decoder_halo(vae), align=1, park=park)
