"""Helpers for the training tests: a tiny photo folder and a training config over it (tiny transformer)."""

import pathlib

import numpy as np
import yaml
from PIL import Image

from dit4sr.training import TrainConfig
from support.tiny_components import TINY_SETTINGS, TINY_TRANSFORMER


def images(folder: pathlib.Path, count: int = 3, size: int = 48) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        # Sharp edges on top of the smooth field: detail that bicubic downscaling loses.
        array = np.asarray(image).copy()
        array[:, ::8] = 255 - array[:, ::8]
        Image.fromarray(array).save(folder / f"img{i}.png")
    return folder


def train_config(tmp_path: pathlib.Path, count: int = 3, extra: dict | None = None, **optim) -> TrainConfig:
    """Writes ``tmp_path/train.yaml`` (``img2.png`` held out) and loads it; ``extra`` sections are merged in."""
    data = images(tmp_path / "photos" / "set", count=count)
    (tmp_path / "holdout.txt").write_text("set/img2.png\n")
    raw = {
        "output_dir": str(tmp_path / "run"), "seed": 3, "checkpoint_every": 3, "keep_checkpoints": 5,
        "log_every": 1, "recommended_settings": TINY_SETTINGS,
        "model": {"transformer": TINY_TRANSFORMER},
        "data": {"roots": [str(data)], "holdout_list": str(tmp_path / "holdout.txt"), "crop_size": 32},
        "optim": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 2, **optim},
    }
    for section, values in (extra or {}).items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return TrainConfig.from_yaml(path)
