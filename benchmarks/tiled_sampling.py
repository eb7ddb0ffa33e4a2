"""Benchmark: our tiled sampler against a re-creation of the official DiT4SR per-tile loop (not a test).

    python benchmarks/tiled_sampling.py                   # mid-size random transformer, 56x56 latent = 9 tiles
    python benchmarks/tiled_sampling.py --json out.json

Both start from the same noise, LR latent, prompt embeddings and scheduler and run the same Euler steps with
classifier-free guidance; the transformer weights are the same (ours with its LR control projections fused, as
``DiT4SRPipeline.from_pretrained`` loads it; the official code never fuses). The official loop, as in its
``pipeline_dit4sr.py``: every step it rebuilds the Gaussian tile weights element by element in Python, walks the
tile grid, calls the transformer once per tile (the unconditional and conditional halves as a batch of two),
stitches the predictions with a running ``contributors`` sum, divides, then applies guidance. Ours
(``DiT4SRPipeline``'s denoising loop, run through a call with ``output_type="latent"``): weights normalised once,
all tiles of the latent batched into few calls, guidance per batch, blending by one ``addcmul`` per tile.

Prints the final-latent max difference and ``speedup=<x>`` (median official time / median ours, the two run
alternately so drifting machine load hits both alike).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dit4sr import DiT4SRPipeline, DiT4SRTransformer2DModel, PixelUnshuffleAutoencoder
from dit4sr.tiling import whole_image_noise

MID_SIZE = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
                pooled_projection_dim=128, pos_embed_max_size=96, dual_attention_layers=(0, 1))


def official_gaussian_weights(tile_width: int, tile_height: int, channels: int, device=None) -> torch.Tensor:
    """The official ``_gaussian_weights``: Python loops over pixels, x centred at (w-1)/2 and y at h/2."""
    var = 0.01
    midpoint = (tile_width - 1) / 2
    x_probs = [math.exp(-(x - midpoint) * (x - midpoint) / (tile_width * tile_width) / (2 * var))
               / math.sqrt(2 * math.pi * var) for x in range(tile_width)]
    midpoint = tile_height / 2
    y_probs = [math.exp(-(y - midpoint) * (y - midpoint) / (tile_height * tile_height) / (2 * var))
               / math.sqrt(2 * math.pi * var) for y in range(tile_height)]
    weights = torch.tensor([[y * x for x in x_probs] for y in y_probs], dtype=torch.float64, device=device)
    return torch.tile(weights, (1, channels, 1, 1))


def official_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """The official grid walk: tiles at ``i * (tile - overlap)`` while short of the edge, the last flush with it."""
    count, end = 0, 0
    while end < size:
        end = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [max(i * tile - overlap * i, 0) for i in range(count - 1)] + [size - tile]


def official_loop(transformer, scheduler, noise, lr_latent, cond, uncond, steps, guidance, tile, overlap):
    """One tile per transformer call, tile weights rebuilt every step, stitched with a contributors sum."""
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise.clone()
    _, channels, height, width = latents.shape
    text = torch.cat([uncond[0], cond[0]])
    pooled = torch.cat([uncond[1], cond[1]])
    control = torch.cat([lr_latent, lr_latent])
    for timestep in scheduler.timesteps:
        model_input = torch.cat([latents, latents])
        tile_weights = official_gaussian_weights(tile, tile, channels, latents.device)
        predictions, places = [], []
        for top in official_offsets(height, tile, overlap):
            for left in official_offsets(width, tile, overlap):
                window = (slice(None), slice(None), slice(top, top + tile), slice(left, left + tile))
                out = transformer(model_input[window], control[window], text, pooled,
                                  timestep.expand(2)).sample
                predictions.append(out)
                places.append(window)
        noise_pred = torch.zeros(model_input.shape, device=latents.device)
        contributors = torch.zeros(model_input.shape, device=latents.device)
        for out, window in zip(predictions, places):
            noise_pred[window] += out * tile_weights
            contributors[window] += tile_weights
        noise_pred /= contributors
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, timestep, latents, return_dict=False)[0]
    return latents


def our_loop(pipe, image, noise, cond, uncond, steps, guidance, tile, overlap):
    """The pipeline's own call on ``image`` (at the working size: ``upscale=1``, no short-side raise) from
    ``noise``, stopping at the sampled latents."""
    return pipe(image, upscale=1, process_size=0, latents=noise, num_inference_steps=steps, guidance_scale=guidance,
                tile_size=tile, tile_overlap=overlap, prompt_embeds=cond[0], pooled_prompt_embeds=cond[1],
                negative_prompt_embeds=uncond[0], negative_pooled_prompt_embeds=uncond[1], output_type="latent",
                show_progress=False).images


def lr_latents_of(pipe, image):
    """The LR latents a call conditions on (read by a step callback in a one-step call)."""
    seen = []
    pipe(image, upscale=1, process_size=0, num_inference_steps=1, guidance_scale=1.0, output_type="latent",
         show_progress=False, callback_on_step_end=lambda pipe, step, t, tensors: seen.append(tensors["lr_latents"]),
         callback_on_step_end_tensor_inputs=["lr_latents"])
    return seen[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=56, help="latent side (56 with tile 24/overlap 8: 3x3 tiles)")
    parser.add_argument("--tile", type=int, default=24)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--text-tokens", type=int, default=77)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    torch.manual_seed(0)
    official = DiT4SRTransformer2DModel(**MID_SIZE).eval()
    ours = DiT4SRTransformer2DModel(**MID_SIZE).eval()
    ours.load_state_dict(official.state_dict())
    ours.fuse_control_projections()
    pipe = DiT4SRPipeline(transformer=ours, vae=PixelUnshuffleAutoencoder(downscale_factor=4),
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))

    side = args.latent
    g = torch.Generator().manual_seed(1)
    pixels = side * pipe.vae_scale_factor
    image = torch.rand(pixels, pixels, 3, generator=g).numpy()
    lr_latent = lr_latents_of(pipe, image)
    cond = (torch.randn(1, args.text_tokens, MID_SIZE["joint_attention_dim"], generator=g),
            torch.randn(1, MID_SIZE["pooled_projection_dim"], generator=g))
    uncond = (torch.randn(1, args.text_tokens, MID_SIZE["joint_attention_dim"], generator=g),
              torch.randn(1, MID_SIZE["pooled_projection_dim"], generator=g))
    noise = whole_image_noise((MID_SIZE["in_channels"], side, side), seed=0)[None]
    tiles = len(official_offsets(side, args.tile, args.overlap)) ** 2

    runs = {"official": lambda: official_loop(official, FlowMatchEulerDiscreteScheduler(shift=3.0), noise,
                                              lr_latent, cond, uncond, args.steps, args.guidance, args.tile,
                                              args.overlap),
            "ours": lambda: our_loop(pipe, image, noise, cond, uncond, args.steps, args.guidance, args.tile,
                                     args.overlap)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    with torch.no_grad():
        for name, run in runs.items():  # warm-up (allocator, thread pool)
            results[name] = run()
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    difference = (results["ours"] - results["official"]).abs().max().item()
    medians = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        "transformer": {k: v for k, v in MID_SIZE.items() if k != "dual_attention_layers"},
        "latent": side, "tile": args.tile, "overlap": args.overlap, "tiles": tiles, "steps": args.steps,
        "guidance": args.guidance, "text_tokens": args.text_tokens, "threads": torch.get_num_threads(),
        "tile_batch_size": pipe.tile_batch_size, "seconds": times, "median_seconds": medians,
        "max_abs_difference": difference, "latent_std": results["official"].std().item(),
        "speedup": medians["official"] / medians["ours"],
    }
    print(f"{tiles} tiles x {args.steps} steps, guidance {args.guidance}; official loop "
          f"{medians['official']:.2f} s, ours {medians['ours']:.2f} s (tile batch {pipe.tile_batch_size}); "
          f"final latents max |difference| {difference:.2e} (latent std {figures['latent_std']:.2f})")
    print(f"speedup={figures['speedup']:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
