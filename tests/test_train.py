import json
import pathlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tiny_components import TINY_SETTINGS, TINY_TRANSFORMER

from dit4sr.pipeline_dit4sr import DiT4SRPipeline
from dit4sr.train import TrainConfig, Trainer, main, read_list, write_pipeline_root

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"

TRAIN_CONFIG = __import__("pathlib").Path(__file__).parents[1] / "configs" / "train" / "dit4sr_tiny.yaml"


pytestmark = pytest.mark.usefixtures("few_torch_threads")


def _images(folder, count=3, size=48):
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


def _config(tmp_path, **optim) -> TrainConfig:
    data = _images(tmp_path / "photos" / "set")
    (tmp_path / "holdout.txt").write_text("set/img2.png\n")
    raw = {
        "output_dir": str(tmp_path / "run"), "seed": 3, "checkpoint_every": 3, "keep_checkpoints": 5,
        "log_every": 1, "recommended_settings": TINY_SETTINGS,
        "model": {"transformer": TINY_TRANSFORMER},
        "data": {"roots": [str(data)], "holdout_list": str(tmp_path / "holdout.txt"), "crop_size": 32},
        "optim": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 2, **optim},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return TrainConfig.from_yaml(path)


def test_held_out_images_are_never_trained_on(tmp_path):
    trainer = Trainer(_config(tmp_path))
    assert trainer.train_files == ["set/img0.png", "set/img1.png"]


def test_training_reduces_the_loss(tmp_path):
    # Mostly low noise: x0 is then largely visible in the input, which even a tiny model learns to use fast.
    trainer = Trainer(_config(tmp_path, max_steps=40, learning_rate=5e-3, warmup_steps=5, logit_mean=-2.0))
    with torch.no_grad():  # the same batch (step 0's) before and after training
        before = trainer.loss(0).item()
    trainer.fit(show_progress=False)
    with torch.no_grad():
        after = trainer.loss(0).item()
    assert after < 0.8 * before


def test_resume_continues_exactly(tmp_path):
    straight = Trainer(_config(tmp_path / "a"))
    losses = straight.fit(show_progress=False)

    config = _config(tmp_path / "b")
    config.optim.max_steps = 3
    first = Trainer(config)
    assert first.fit(show_progress=False) == losses[:3]
    config.optim.max_steps = 6
    resumed = Trainer(config)
    assert resumed.resume() and resumed.step == 3
    assert resumed.fit(show_progress=False) == losses[3:]
    for a, b in zip(straight.transformer.state_dict().values(), resumed.transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_is_a_loadable_pipeline_root(tmp_path):
    config = _config(tmp_path)
    Trainer(config).fit(show_progress=False)
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-0000003", "checkpoint-0000006"]
    root = checkpoints[-1]
    assert json.loads((root / "training_state" / "state.json").read_text())["step"] == 6
    assert json.loads((root / "recommended_settings.json").read_text()) == TINY_SETTINGS
    assert not list((tmp_path / "run").glob(".partial*"))
    pipe = DiT4SRPipeline.from_pretrained(str(root), device="cpu")
    out = pipe(Image.new("RGB", (12, 10), (90, 140, 30)), show_progress=False).images[0]
    assert out.size == (48, 40)


def test_fine_tuning_trains_only_control_parameters(tmp_path):
    base = Trainer(_config(tmp_path / "base"))
    base.fit(show_progress=False)  # a zero output layer would pass no gradient to the control parameters
    pretrained = tmp_path / "pretrained"
    write_pipeline_root(pretrained, base.transformer, base.vae, base.null_prompt, torch.float32)
    before = {k: v.clone() for k, v in base.transformer.state_dict().items()}

    config = _config(tmp_path / "ft")
    config.model.transformer, config.model.pretrained = None, str(pretrained)
    tuned = Trainer(config)
    assert all("control" in name for name, p in tuned.transformer.named_parameters() if p.requires_grad)
    tuned.fit(show_progress=False)
    after = tuned.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("control" in k for k in changed)


def test_cli_refuses_to_overwrite_without_resume(tmp_path, capsys):
    config = _config(tmp_path)
    path = tmp_path / "train.yaml"
    assert main(["--config", str(path), "--no-progress", "--max-steps", "3"]) == 0
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--no-progress"])
    assert "--resume" in capsys.readouterr().err
    assert main(["--config", str(path), "--no-progress", "--resume", "--stop-at", "4"]) == 0
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-0000003",
                                                                              "checkpoint-0000004"]
    state = load_file(str(tmp_path / "run" / "checkpoint-0000004" / "training_state" / "ema.safetensors"))
    assert len(state) == len(list(Trainer(config).transformer.parameters()))


def test_bundled_config_is_valid_and_excludes_the_held_out_list():
    config = TrainConfig.from_yaml(TRAIN_CONFIG)
    assert config.model.transformer["prediction_type"] == "sample" and config.model.transformer["lr_residual"]
    assert len(read_list(config.data.holdout_list)) == 20


@pytest.mark.skipif(not (SHARED / "data" / "photos").is_dir(), reason="needs ../shared/data/photos")
def test_held_out_photos_exist_and_are_excluded_from_training():
    from dit4sr.train import list_images

    config = TrainConfig.from_yaml(TRAIN_CONFIG)
    held_out = set(read_list(config.data.holdout_list))
    everything = {key for key, _ in list_images(config.data.roots)}
    assert held_out <= everything
    assert not held_out & {key for key, _ in list_images(config.data.roots, held_out)}


def test_bundled_model_is_complete_small_and_loads():
    from dit4sr import BUNDLED_MODEL

    root = __import__("pathlib").Path(BUNDLED_MODEL)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    for name in ("README.md", "heldout_photos.txt", "recommended_settings.json", "eval_heldout.json"):
        assert (root / name).is_file(), name
    assert "--max-steps 1100" in (root / "README.md").read_text()
    pipe = DiT4SRPipeline.from_pretrained("bundled", device="cpu")
    assert pipe.transformer.config.prediction_type == "sample" and pipe.transformer.config.lr_residual
    assert pipe.effective_settings()["num_inference_steps"] == 1
    flat = Image.new("RGB", (16, 12), (200, 60, 20))
    out = np.asarray(pipe(flat, show_progress=False).images[0], dtype=np.float64)
    assert out.shape == (48, 64, 3)
    # A flat image stays (nearly) flat and keeps its colour.
    assert np.abs(out - (200, 60, 20)).mean() < 4
