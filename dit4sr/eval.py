"""Evaluate x4 super-resolution against bicubic: ``python -m dit4sr.eval --model bundled --hr-dir DIR``.

Protocol of the SR literature (EDSR/BasicSR conventions): each HR image is cropped to a multiple of
the scale, downscaled with antialiased bicubic (MATLAB ``imresize``'s kernel) to 8-bit LR, and
upscaled back by bicubic and by the model. Metrics are on the Y channel of ITU-R BT.601 YCbCr
(MATLAB ``rgb2ycbcr``: Y in [16, 235]) with ``scale`` pixels of border cropped: PSNR with peak 255,
and SSIM with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, as Wang et al. 2004.
Sharpness is the variance of the Laplacian of Y (higher = more high-frequency detail; the HR value is
the target, not a maximum) and the mean gradient magnitude of Y.

``--lr-degradation`` degrades the 8-bit LR further before both bicubic and the model see it, as real
low-quality inputs are: ``jpeg:Q`` (JPEG at quality Q), ``noise:S`` (Gaussian noise of standard deviation S
on the 0..255 scale, seeded by the image name), chained with ``+`` in order, e.g. ``noise:8+jpeg:40``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2ycbcr
from skimage.metrics import structural_similarity

from .degradation import bicubic_downscale, bicubic_upscale
from .image_processing import IMAGE_SUFFIXES
from .training.data import read_list


def y_channel(image: np.ndarray) -> np.ndarray:
    """Y (float64, 16..235) of an 8-bit RGB array."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    return rgb2ycbcr(image.astype(np.float64) / 255.0)[..., 0]


def _crop(y: np.ndarray, border: int) -> np.ndarray:
    return y[border:-border, border:-border] if border else y


def _pair_y(a: np.ndarray, b: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if min(a.shape[:2]) <= 2 * border:
        raise ValueError(f"image {a.shape[:2]} is too small for a {border}-pixel border crop")
    return _crop(y_channel(a), border), _crop(y_channel(b), border)


def psnr_y(a: np.ndarray, b: np.ndarray, border: int = 4) -> float:
    """PSNR (dB, peak 255) on Y; ``inf`` for identical images."""
    ya, yb = _pair_y(a, b, border)
    mse = float(np.mean((ya - yb) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim_y(a: np.ndarray, b: np.ndarray, border: int = 4) -> float:
    """SSIM on Y with the settings of Wang et al.'s MATLAB reference (1.0 for identical images)."""
    ya, yb = _pair_y(a, b, border)
    return float(structural_similarity(ya, yb, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def laplacian_variance(image: np.ndarray, border: int = 4) -> float:
    return float(ndimage.laplace(_crop(y_channel(image), border)).var())


def gradient_energy(image: np.ndarray, border: int = 4) -> float:
    y = _crop(y_channel(image), border)
    return float(np.hypot(ndimage.sobel(y, axis=0), ndimage.sobel(y, axis=1)).mean())


@dataclass
class ImageScores:
    name: str
    psnr: float
    ssim: float
    laplacian_var: float
    gradient: float


def score(name: str, output: np.ndarray, hr: np.ndarray, border: int) -> ImageScores:
    return ImageScores(name, psnr_y(output, hr, border), ssim_y(output, hr, border),
                       laplacian_variance(output, border), gradient_energy(output, border))


def mean_scores(rows: list[ImageScores]) -> dict[str, float]:
    return {key: float(np.mean([getattr(r, key) for r in rows]))
            for key in ("psnr", "ssim", "laplacian_var", "gradient")}


def degrade_lr(lr: Image.Image, spec: str | None, name: str = "") -> Image.Image:
    """Apply ``jpeg:Q`` / ``noise:S`` steps (``+``-separated) to an 8-bit RGB image; noise seeded by ``name``."""
    for step in filter(None, (spec or "").split("+")):
        kind, _, value = step.partition(":")
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(f"LR degradation step {step!r}: expected jpeg:QUALITY or noise:SIGMA") from None
        if kind == "jpeg":
            if not 1 <= amount <= 100:
                raise ValueError(f"LR degradation {step!r}: JPEG quality must lie in 1..100")
            buffer = io.BytesIO()
            lr.save(buffer, format="JPEG", quality=int(amount))
            lr = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        elif kind == "noise":
            seed = int.from_bytes(hashlib.sha256(f"{name}/{step}".encode()).digest()[:8], "little")
            noise = np.random.default_rng(seed).normal(0.0, amount, (lr.height, lr.width, 3))
            lr = Image.fromarray(np.clip(np.asarray(lr, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8))
        else:
            raise ValueError(f"LR degradation step {step!r}: expected jpeg:QUALITY or noise:SIGMA")
    return lr


def list_hr_images(hr_dir: str, list_file: str | None = None) -> list[Path]:
    """The images named in ``list_file`` (paths relative to ``hr_dir``; ``#`` comments), else all under it."""
    root = Path(hr_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--hr-dir {hr_dir} is not a directory")
    if list_file:
        paths = [root / name for name in read_list(list_file)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed images are missing, e.g. {missing[0]}")
        return paths
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def evaluate(pipe, paths: list[Path], hr_dir: str, scale: int = 4, pipe_kwargs: dict | None = None,
             save_dir: str | None = None, show_progress: bool = True, lr_degradation: str | None = None) -> dict:
    """Scores of bicubic, the model and the HR image itself (sharpness reference) per image and on average."""
    from tqdm.auto import tqdm

    rows: dict[str, list[ImageScores]] = {"bicubic": [], "model": [], "hr": []}
    for path in tqdm(paths, desc="eval", disable=not show_progress):
        name = path.relative_to(hr_dir).as_posix()
        hr = Image.open(path).convert("RGB")
        hr = hr.crop((0, 0, hr.width - hr.width % scale, hr.height - hr.height % scale))
        lr = degrade_lr(bicubic_downscale(hr, scale), lr_degradation, name)
        hr_array = np.asarray(hr)
        bicubic = np.asarray(bicubic_upscale(lr, scale))
        result = pipe(lr, upscale=scale, show_progress=False, output_type="pil", **(pipe_kwargs or {})).images[0]
        if save_dir:
            target = Path(save_dir) / Path(name).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            result.save(target)
        model = np.asarray(result.convert("RGB"))
        border = scale
        rows["bicubic"].append(score(name, bicubic, hr_array, border))
        rows["model"].append(score(name, model, hr_array, border))
        rows["hr"].append(ImageScores(name, math.inf, 1.0, laplacian_variance(hr_array, border),
                                      gradient_energy(hr_array, border)))
    summary = {method: mean_scores(r) for method, r in rows.items()}
    return {"images": len(paths), "mean": summary,
            "per_image": {method: [asdict(r) for r in r_list] for method, r_list in rows.items()}}


def _json_safe(value):
    """Standard JSON has no infinity (the PSNR of identical images): write it as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def format_table(result: dict) -> str:
    lines = [f"{'method':<8} {'PSNR-Y':>8} {'SSIM-Y':>8} {'LapVar':>9} {'Grad':>7}   ({result['images']} images)"]
    for method, m in result["mean"].items():
        psnr = "-" if method == "hr" else f"{m['psnr']:.3f}"
        ssim = "-" if method == "hr" else f"{m['ssim']:.4f}"
        lines.append(f"{method:<8} {psnr:>8} {ssim:>8} {m['laplacian_var']:>9.1f} {m['gradient']:>7.2f}")
    gain = result["mean"]["model"]["psnr"] - result["mean"]["bicubic"]["psnr"]
    lines.append(f"model - bicubic: {gain:+.3f} dB PSNR-Y")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit4sr-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled", help="'bundled', a model folder or an fsspec URL")
    parser.add_argument("--hr-dir", required=True, help="folder of HR images")
    parser.add_argument("--list", help="file of image paths relative to --hr-dir (default: every image)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's recommended)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's recommended)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-degradation", help="further degrade the LR: jpeg:Q, noise:S, chained with +")
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--tile-overlap", type=int)
    parser.add_argument("--color-fix", choices=("adain", "wavelet", "none"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--save-dir", help="also write the model outputs here as PNG")
    parser.add_argument("--json", help="write all scores to this JSON file")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    from .pipeline_dit4sr import DiT4SRPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths = list_hr_images(args.hr_dir, args.list)
        degrade_lr(Image.new("RGB", (8, 8)), args.lr_degradation)  # a bad spec fails before the model loads
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if not paths:
        parser.error(f"no images found under {args.hr_dir}")
    pipe = DiT4SRPipeline.from_pretrained(args.model, device=None if args.device == "auto" else args.device)
    pipe_kwargs = {k: v for k, v in {
        "num_inference_steps": args.steps, "guidance_scale": args.guidance, "seed": args.seed,
        "tile_size": args.tile_size, "tile_overlap": args.tile_overlap, "color_fix": args.color_fix,
    }.items() if v is not None}
    result = evaluate(pipe, paths, args.hr_dir, args.scale, pipe_kwargs, args.save_dir,
                      lr_degradation=args.lr_degradation)
    result["settings"] = {"model": args.model, "scale": args.scale, "lr_degradation": args.lr_degradation,
                          **pipe_kwargs}
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
