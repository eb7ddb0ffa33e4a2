"""Before/after strip and sharpness figures of x4 models on real-degraded crops of held-out photos.

    python benchmarks/bundled_model_figures.py --model v1=runs/dit4sr-tiny-v1 --model v2=bundled \\
        --out dit4sr/bundled/dit4sr-tiny/figures

Each held-out photo gives a centred HR crop (``--crop`` x4 pixels a side); its LR is the bicubic downscale
further degraded as real low-quality inputs are (each ``--degradation``, see ``dit4sr.eval.degrade_lr``:
JPEG compression, sensor-like noise). Every LR is upscaled by bicubic and by each model (recommended settings).
Writes ``strip.png`` (rows: the first ``--strip-rows`` crops per degradation; columns: LR shown with nearest
neighbour, bicubic, each model, HR) and ``sharpness.json``: per method and degradation the mean PSNR-Y and
SSIM-Y against the HR crop and the no-reference sharpness (variance of the Laplacian, mean gradient of Y).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dit4sr.degradation import bicubic_downscale, bicubic_upscale
from dit4sr.eval import degrade_lr, gradient_energy, laplacian_variance, psnr_y, ssim_y
from dit4sr.pipeline_dit4sr import DiT4SRPipeline
from dit4sr.training import read_list

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "photos"
HOLDOUT = REPO / "configs" / "train" / "holdout_photos.txt"


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def label(image: Image.Image, text: str) -> Image.Image:
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, 8 + 7 * len(text), 14), fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=ROOT ('bundled' or a folder)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--crop", type=int, default=64, help="LR crop side (HR side = 4x)")
    parser.add_argument("--degradation", action="append", help="LR degradation (default: jpeg:30, noise:12+jpeg:60)")
    parser.add_argument("--strip-rows", type=int, default=3, help="crops per degradation shown in the strip")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    degradations = args.degradation or ["jpeg:30", "noise:12+jpeg:60"]
    models = {name: DiT4SRPipeline.from_pretrained(root, device="cpu")
              for name, root in (spec.split("=", 1) for spec in args.model)}
    names = read_list(str(HOLDOUT))
    scale, size = 4, args.crop * 4
    scores: dict[str, dict[str, list[dict]]] = {}
    rows = []
    for degradation in degradations:
        for index, name in enumerate(names):
            hr = centre_crop(Image.open(PHOTOS / name).convert("RGB"), size)
            lr = degrade_lr(bicubic_downscale(hr, scale), degradation, name)
            outputs = {"bicubic": bicubic_upscale(lr, scale)}
            for model_name, pipe in models.items():
                outputs[model_name] = pipe(lr, upscale=scale, show_progress=False).images[0]
            hr_array = np.asarray(hr)
            for method, image in {**outputs, "hr": hr}.items():
                array = np.asarray(image.convert("RGB"))
                scores.setdefault(degradation, {}).setdefault(method, []).append({
                    "name": name, "psnr": None if method == "hr" else psnr_y(array, hr_array, scale),
                    "ssim": None if method == "hr" else ssim_y(array, hr_array, scale),
                    "laplacian_var": laplacian_variance(array, scale), "gradient": gradient_energy(array, scale)})
            if index < args.strip_rows:
                cells = [label(lr.resize((size, size), Image.NEAREST), f"LR {degradation}")]
                cells += [label(image, method) for method, image in outputs.items()]
                cells.append(label(hr, "HR"))
                rows.append(cells)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    strip = Image.new("RGB", (size * len(rows[0]), size * len(rows)), (255, 255, 255))
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            strip.paste(cell, (c * size, r * size))
    strip.save(out / "strip.png", optimize=True)

    summary = {degradation: {method: {key: float(np.mean([row[key] for row in rows_]))
                                      for key in ("psnr", "ssim", "laplacian_var", "gradient")
                                      if rows_[0][key] is not None}
                             for method, rows_ in by_method.items()}
               for degradation, by_method in scores.items()}
    (out / "sharpness.json").write_text(json.dumps({"crops_per_degradation": len(names), "lr_crop": args.crop,
                                                    "models": args.model, "mean": summary}, indent=1) + "\n")
    for degradation, by_method in summary.items():
        print(degradation)
        for method, values in by_method.items():
            print(f"  {method:<8} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))


if __name__ == "__main__":
    main()
