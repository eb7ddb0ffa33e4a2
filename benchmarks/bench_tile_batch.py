"""Benchmark: time per image vs ``tile_batch_size``, and tiled-VAE peak memory (not a test).

    python benchmarks/bench_tile_batch.py                       # tile batching on 256 -> 1024 (x4)
    python benchmarks/bench_tile_batch.py --vae 2048            # tiled vs untiled VAE decode at 2048 x 2048

The sampler part uses ``--model`` or the bundled model when present (its recommended settings), else a
random pixel-space model of the bundled model's size (6 layers, width 192, 4x pixel-unshuffle), with
``--steps``/``--tile-size``/``--tile-overlap``. The VAE part uses a random AutoencoderKL with Stable
Diffusion 3's architecture and measures each run's peak resident memory in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from dit4sr import (
    BUNDLED_MODEL,
    DiT4SRPipeline,
    DiT4SRTransformer2DModel,
    PixelUnshuffleAutoencoder,
)
from dit4sr.prompt_cache import PromptEmbedding


def sampler_pipeline(model: str | None) -> tuple[DiT4SRPipeline, str]:
    if model is None and os.path.isfile(os.path.join(BUNDLED_MODEL, "model_index.json")):
        model = "bundled"
    if model is not None:
        return DiT4SRPipeline.from_pretrained(model, device="cpu"), model
    torch.manual_seed(0)
    transformer = DiT4SRTransformer2DModel(
        in_channels=48, out_channels=48, patch_size=2, num_layers=6, attention_head_dim=64, num_attention_heads=3,
        joint_attention_dim=64, caption_projection_dim=192, pooled_projection_dim=64, pos_embed_max_size=64,
        dual_attention_layers=(), prediction_type="sample", lr_residual=True).eval()
    pipe = DiT4SRPipeline(transformer=transformer, vae=PixelUnshuffleAutoencoder(downscale_factor=4),
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.null_prompt_embedding = PromptEmbedding(torch.zeros(4, 64), torch.zeros(64))
    return pipe, "random 6-layer width-192 pixel-space model"


def bench_sampler(args) -> None:
    pipe, name = sampler_pipeline(args.model)
    image = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    settings = {k: v for k, v in dict(num_inference_steps=args.steps, tile_size=args.tile_size,
                                      guidance_scale=args.guidance, tile_overlap=args.tile_overlap).items()
                if v is not None}
    effective = pipe.effective_settings(**settings)
    print(f"model: {name}; threads: {torch.get_num_threads()}; settings: "
          f"{ {k: effective[k] for k in ('num_inference_steps', 'guidance_scale', 'tile_size', 'tile_overlap')} }")
    reference = None
    for batch in args.batches:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = pipe(image, tile_batch_size=batch, output_type="np", show_progress=False, **settings).images[0]
            times.append(time.perf_counter() - start)
        reference = out if reference is None else reference
        print(f"tile_batch_size={batch:>3}: {min(times):7.2f} s/image (best of {args.repeats}), "
              f"max |diff| vs first = {np.abs(out - reference).max():.2e} ({np.abs(out - reference).max() * 255:.3f} "
              f"8-bit levels), output {out.shape[1]}x{out.shape[0]}")


def sd3_like_vae(width_divisor: int = 1) -> AutoencoderKL:
    """SD3's VAE layout with random weights; ``width_divisor`` narrows every block for quicker CPU runs."""
    torch.manual_seed(0)
    widths = tuple(c // width_divisor for c in (128, 256, 512, 512))
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                         norm_num_groups=min(32, widths[0]), block_out_channels=widths,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=1.5305, shift_factor=0.0609,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


def vae_child(size: int, tiling: str, tile: int, width_divisor: int) -> None:
    from dit4sr.vae_tiling import decode_latents

    vae = sd3_like_vae(width_divisor)
    z = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        image = decode_latents(vae, z, tiling, tile_size=tile)
    seconds = time.perf_counter() - start
    np.save(f"/tmp/bench_vae_{tiling}_{size}.npy", image[0, :, ::16, ::16].numpy())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"size": size, "tiling": tiling, "vae_width": f"SD3 / {width_divisor}",
                      "seconds": round(seconds, 1), "peak_rss_mib": round(peak_mib)}))


def bench_vae(args) -> None:
    results = {}
    for tiling in (["always", "never"] if not args.skip_untiled else ["always"]):
        proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--vae-child",
                               str(args.vae), tiling, str(args.vae_tile), str(args.vae_width_divisor)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            print(f"{tiling}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode})")
            continue
        results[tiling] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(results[tiling])
    if len(results) == 2:
        a, b = (np.load(f"/tmp/bench_vae_{t}_{args.vae}.npy") for t in ("always", "never"))
        print(f"max |tiled - untiled| on a 1/16 subsample: {np.abs(a - b).max():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model root (default: bundled if present, else a random tiny model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="default: recommended (the random model has no negative "
                        "prompt embedding, so give it 1)")
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--tile-overlap", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae", type=int, help="run the VAE benchmark at this image side instead")
    parser.add_argument("--vae-tile", type=int, default=64, help="decoder tile side in latent pixels")
    parser.add_argument("--vae-width-divisor", type=int, default=1, help="narrow the VAE (1 = SD3's widths)")
    parser.add_argument("--skip-untiled", action="store_true")
    parser.add_argument("--vae-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.vae_child:
        vae_child(int(args.vae_child[0]), args.vae_child[1], int(args.vae_child[2]), int(args.vae_child[3]))
    elif args.vae:
        bench_vae(args)
    else:
        bench_sampler(args)


if __name__ == "__main__":
    main()
