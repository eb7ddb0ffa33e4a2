"""Benchmark: the DiT4SR transformer and pipeline on one device — eager, fused, compiled, SDPA backends (not a test).

    python benchmarks/gpu_transformer.py --json benchmarks/results/gpu_transformer-<gpu>.json   # full size, CUDA
    python benchmarks/gpu_transformer.py --tiny --json benchmarks/results/gpu_transformer-tiny-cpu.json

Full size is the official DiT4SR layout (SD3.5 Medium MMDiT, 24 blocks, width 1536, 2.7B parameters) with random
weights built directly on the device — no downloads — in bf16 on CUDA (float32 on the CPU); a 64x64 latent tile is
1024 image + 1024 LR + 333 text tokens. ``--tiny`` shrinks the widths, the depth, the text (16 tokens) and the tile
(32, overlap 12) — same code paths — so the script runs on a CPU. Sections of the JSON:

* ``peak``: a plain square matmul's rate on this device (8192^3 bf16 on CUDA), the reference for "fraction of peak".
* ``transformer``: seconds per call and per tile-step (one tile with guidance = two samples), TFLOP/s (FLOPs counted
  by ``torch.utils.flop_counter`` on one sample), fraction of peak, peak memory — for the official-style baseline
  (unfused control projections, one tile with guidance per call: batch 2), ours unfused and fused at several tile
  batches, fused under each SDPA backend this device runs, and compiled (``DiT4SRPipeline.enable_compile``:
  regional, dynamic shapes) with its compile time.
* ``compile_shapes``: graphs compiled for a stream of images of 1-9 tiles under three batch-shape policies —
  dynamic shapes (what ``dit4sr.compile`` does), padding the last batch of each image to its batch size with static
  shapes, and torch's default (automatic dynamic after a second shape) — counted with dynamo's counters.
* ``pipeline``: end to end (VAE encode, sampling, decode, colour fix) at 512^2 and 1024^2 outputs (x4, official
  steps and guidance on CUDA; 2 steps with ``--tiny``) with the automatic tile batch, tile batch 1 and compiled,
  beside the official per-tile loop's sampling alone (``tiled_sampling.official_loop``) on the same latent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiled_sampling import official_loop  # noqa: E402

from dit4sr import DiT4SRPipeline, DiT4SRTransformer2DModel  # noqa: E402
from dit4sr.compile import compile_transformer  # noqa: E402
from dit4sr.prompt_cache import PromptEmbedding  # noqa: E402
from dit4sr.tiling import plan_tiles, whole_image_noise  # noqa: E402

FULL = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY = {**FULL, "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 64,
        "caption_projection_dim": 64, "pooled_projection_dim": 32, "dual_attention_layers": (0,)}
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak resident set (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> dict:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats)
    return {"size": size, "dtype": str(dtype), "seconds": seconds, "tflops": 2 * size**3 / seconds / 1e12}


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiT4SRTransformer2DModel(**config)
    return torch.nn.Module.to(model, dtype).eval()


def transformer_inputs(config: dict, batch: int, tile: int, text_tokens: int, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    channels = config["in_channels"]
    return (randn(batch, channels, tile, tile), randn(batch, channels, tile, tile),
            randn(batch, text_tokens, config["joint_attention_dim"]), randn(batch, config["pooled_projection_dim"]),
            torch.full((batch,), 500.0, device=device, dtype=dtype))


def flops_per_sample(model, config, tile, text_tokens, device, dtype) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*transformer_inputs(config, 1, tile, text_tokens, device, dtype))
    return counter.get_total_flops()


def bench_transformer(args, config, device, dtype, peak_tflops) -> dict:
    model = build_transformer(config, device, dtype)
    flops = flops_per_sample(model, config, args.tile, args.text_tokens, device, dtype)
    results: dict = {"flops_per_sample": flops, "tile": args.tile, "text_tokens": args.text_tokens, "runs": []}

    def measure(name, batch, sdpa=None, **extra):
        inputs = transformer_inputs(config, batch, args.tile, args.text_tokens, device, dtype)
        reset_peak(device)
        context = torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, sdpa)) if sdpa \
            else nullcontext()
        try:
            with torch.no_grad(), context:
                seconds = timed(lambda: model(*inputs), device, args.repeats)
        except RuntimeError as exc:  # a backend this device or dtype lacks
            results["runs"].append({"name": name, "batch": batch, "sdpa": sdpa, "unavailable": str(exc)[:200]})
            return
        per_sample = seconds / batch
        tflops = flops / per_sample / 1e12
        run = {"name": name, "batch": batch, "sdpa": sdpa or "default", "seconds_per_call": seconds,
               "seconds_per_sample": per_sample, "seconds_per_tile_step": 2 * per_sample, "tflops": tflops,
               "fraction_of_peak": tflops / peak_tflops, "peak_memory_gib": peak_memory_gib(device), **extra}
        results["runs"].append(run)
        print(f"  {name:<28} batch {batch:>3} sdpa {run['sdpa']:<20} {per_sample * 1e3:9.2f} ms/sample "
              f"{tflops:8.4g} TFLOP/s ({run['fraction_of_peak']:.0%} of peak) {run['peak_memory_gib']:.2f} GiB",
              flush=True)

    measure("official-style (unfused)", 2)
    for batch in args.batches:
        measure("ours unfused", batch)
    model.fuse_control_projections()
    for batch in args.batches:
        measure("ours fused", batch)
    for backend in SDPA_BACKENDS:
        measure("ours fused", max(args.batches), sdpa=backend)
    if not args.no_compile:
        start = time.perf_counter()
        record = compile_transformer(model, mode=args.compile_mode)
        with torch.no_grad():
            model(*transformer_inputs(config, 2, args.tile, args.text_tokens, device, dtype))
        synchronize(device)
        results["compile_seconds"] = time.perf_counter() - start
        results["compile"] = {k: v for k, v in record.items() if k != "cache_dir"}
        print(f"  compiled in {results['compile_seconds']:.1f} s", flush=True)
        for batch in args.batches:
            measure("ours fused compiled", batch)
    return results


def graphs_compiled(model, calls, dynamic) -> int:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(backend="eager", dynamic=dynamic)  # capture only: counts graphs, fast
    with torch.no_grad():
        for inputs in calls:
            model(*inputs)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs


def bench_compile_shapes(args, config) -> dict:
    """Graphs per policy for images of these tile counts, guidance on (2 samples per tile), tile batch 4."""
    tile_counts, batch_size = [1, 4, 9, 6, 9, 2, 3], 4
    model = build_transformer({**config, "num_layers": 3, "dual_attention_layers": (0,)}, torch.device("cpu"),
                              torch.float32)

    def calls(pad: bool):
        shapes, padded = [], 0
        for tiles in tile_counts:
            size = min(batch_size, tiles)
            for start in range(0, tiles, batch_size):
                real = min(batch_size, tiles - start)
                shapes.append(size if pad else real)
                padded += (size - real) if pad else 0
        inputs = [transformer_inputs(config, 2 * n, 8, 5, "cpu", torch.float32) for n in shapes]
        return inputs, shapes, padded

    dynamic_calls, dynamic_shapes, _ = calls(pad=False)
    pad_calls, pad_shapes, padded = calls(pad=True)
    result = {
        "tile_counts": tile_counts, "tile_batch_size": batch_size, "block_kinds": 3,
        "dynamic": {"graphs": graphs_compiled(model, dynamic_calls, True), "tile_batches": dynamic_shapes,
                    "padded_tiles": 0},
        "pad_last_batch_static": {"graphs": graphs_compiled(model, pad_calls, False), "tile_batches": pad_shapes,
                                  "padded_tiles": padded},
        "torch_default": {"graphs": graphs_compiled(model, dynamic_calls, None), "tile_batches": dynamic_shapes,
                          "padded_tiles": 0},
    }
    print("  graphs compiled: " + ", ".join(f"{k} {v['graphs']}" for k, v in result.items() if isinstance(v, dict))
          + f" (padding wastes {padded} of {sum(tile_counts)} tiles)", flush=True)
    return result


def sd35_vae(device, dtype, tiny: bool) -> AutoencoderKL:
    torch.manual_seed(0)
    widths = (16, 16, 16, 16) if tiny else (128, 256, 512, 512)
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1 if tiny else 2,
                            norm_num_groups=min(32, widths[0]), block_out_channels=widths,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                            use_post_quant_conv=False)
    return torch.nn.Module.to(vae, dtype).eval()


def bench_pipeline(args, config, device, dtype) -> dict:
    transformer = build_transformer(config, device, dtype)
    official = build_transformer(config, device, dtype)  # same seed: same weights, never fused
    transformer.fuse_control_projections()
    pipe = DiT4SRPipeline(transformer=transformer, vae=sd35_vae(device, dtype, args.tiny),
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(2)
    null = PromptEmbedding(torch.randn(args.text_tokens, config["joint_attention_dim"], generator=g),
                           torch.randn(config["pooled_projection_dim"], generator=g))
    pipe.null_prompt_embedding = null
    settings = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "negative_prompt": "",
                "added_prompt": "", "tile_size": args.tile, "tile_overlap": args.overlap, "output_type": "np",
                "show_progress": False}
    results: dict = {"steps": args.steps, "guidance": args.guidance, "runs": []}
    cond = (null.prompt_embeds[None].to(device, dtype), null.pooled_prompt_embeds[None].to(device, dtype))
    for side in args.pipeline_sizes:
        image = (np.random.default_rng(side).random((side // 4, side // 4, 3)) * 255).astype(np.uint8)
        geometry = pipe.geometry(side // 4, side // 4, 4, tile_size=args.tile, tile_overlap=args.overlap)
        reference = None
        for name, extra in (("auto tile batch", {}), ("tile batch 1", {"tile_batch_size": 1}),
                            ("compiled", {})):
            if name == "compiled":
                if args.no_compile:
                    continue
                pipe.enable_compile(mode=args.compile_mode)
                pipe(image, upscale=4, **settings)  # compile before timing (shape-dynamic: once for all sizes)
            reset_peak(device)
            start = time.perf_counter()
            out = pipe(image, upscale=4, **settings, **extra).images[0]
            synchronize(device)
            seconds = time.perf_counter() - start
            difference = None if reference is None else float(np.abs(out - reference).max())
            reference = out if reference is None else reference
            run = {"output": side, "name": name, "seconds": seconds, "tiles": geometry.tiles,
                   "tile_batch_size": pipe.tile_batch_size, "peak_memory_gib": peak_memory_gib(device),
                   "max_abs_difference_vs_auto": difference}
            results["runs"].append(run)
            print(f"  {side}^2 {name:<16} {seconds:8.2f} s  tiles {geometry.tiles} tile batch {pipe.tile_batch_size} "
                  f"peak {run['peak_memory_gib']:.2f} GiB" + (f" max|diff| {difference:.1e}" if difference is not None
                                                              else ""), flush=True)
        # The official per-tile loop's sampling alone on the same latent size (no VAE): its transformer calls.
        latent = geometry.latent_height
        lr_latent = torch.randn(1, config["in_channels"], latent, latent, generator=g).to(device)
        noise = whole_image_noise((config["in_channels"], latent, latent), 0)[None].to(device)
        grid = plan_tiles(latent, latent, args.tile, args.overlap, multiple=2)
        with torch.no_grad():
            start = time.perf_counter()
            official_loop(_Cast(official, dtype), FlowMatchEulerDiscreteScheduler(shift=3.0), noise, lr_latent,
                          cond, cond, args.steps, args.guidance, grid.tile_height, args.overlap)
            synchronize(device)
        seconds = time.perf_counter() - start
        results["runs"].append({"output": side, "name": "official loop (sampling only)", "seconds": seconds,
                                "tiles": len(grid)})
        print(f"  {side}^2 {'official loop sampling':<16} {seconds:8.2f} s", flush=True)
    return results


class _Cast:
    """The official loop feeds float32 latents; the model runs in its own dtype (as the official code casts)."""

    def __init__(self, model, dtype):
        self.model, self.dtype = model, dtype

    def __call__(self, hidden, control, text, pooled, timestep):
        out = self.model(hidden.to(self.dtype), control.to(self.dtype), text, pooled,
                         timestep.to(hidden.device, self.dtype))
        return type(out)(sample=out.sample.float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths and depth, runs on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", help="tile-sample batches (default 2 8 18 32; tiny 2 6)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10; tiny 2)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor's default)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--pipeline-sizes", type=int, nargs="*", default=[512, 1024], help="output sides")
    parser.add_argument("--steps", type=int, help="pipeline steps (default 40, the official; tiny 2)")
    parser.add_argument("--guidance", type=float, default=8.0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = TINY if args.tiny else FULL
    # Latent tile and overlap: the official 64/24 (1024 image tokens); tiny: 32/12, so a loaded CPU finishes.
    args.tile, args.overlap = (32, 12) if args.tiny else (64, 24)
    args.text_tokens = 16 if args.tiny else 333
    args.batches = args.batches or ([2, 6] if args.tiny else [2, 8, 18, 32])
    args.repeats = args.repeats or (2 if args.tiny else 10)
    args.steps = args.steps or (2 if args.tiny else 40)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}" \
        f", {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})"
    figures: dict = {"device": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "torch": torch.__version__, "dtype": str(dtype), "tiny": args.tiny,
                     "config": {k: v for k, v in config.items() if k != "dual_attention_layers"}}
    print(f"{'tiny' if args.tiny else 'full-size'} DiT4SR on {name}, {dtype}", flush=True)

    def save() -> None:  # after every section: a run cut short (a device lease's time limit) keeps what it measured
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as handle:
                json.dump(figures, handle, indent=2, default=str)

    size = 8192 if device.type == "cuda" else 1024
    figures["peak"] = matmul_peak(device, dtype, size, args.repeats)
    print(f"  matmul {size}^3: {figures['peak']['tflops']:.4g} TFLOP/s", flush=True)
    figures["transformer"] = bench_transformer(args, config, device, dtype, figures["peak"]["tflops"])
    save()
    figures["compile_shapes"] = bench_compile_shapes(args, config)
    save()
    if args.pipeline_sizes:
        figures["pipeline"] = bench_pipeline(args, config, device, dtype)
        save()
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
