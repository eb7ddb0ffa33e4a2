import json
import pathlib
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from support import SHARED, missing
from support.tiny_components import TINY_SETTINGS
from support.training import images as _images
from support.training import train_config as _config

from dit4sr.degradation import DegradationConfig
from dit4sr.pipeline_dit4sr import DiT4SRPipeline
from dit4sr.train import main
from dit4sr.training import TrainConfig, Trainer, read_list, write_pipeline_root

TRAIN_CONFIG = __import__("pathlib").Path(__file__).parents[1] / "configs" / "train" / "dit4sr_tiny.yaml"


pytestmark = pytest.mark.usefixtures("few_torch_threads")


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
    v2 = TrainConfig.from_yaml(TRAIN_CONFIG.with_name("dit4sr_tiny_v2.yaml"))
    assert v2.model.trainable == "all" and v2.model.pretrained.endswith("runs/dit4sr-tiny-v1")
    assert read_list(v2.data.holdout_list) == read_list(config.data.holdout_list)
    assert DegradationConfig.from_yaml(v2.data.degradation).realistic_prob == 0.3


def test_held_out_photos_exist_and_are_excluded_from_training():
    from dit4sr.training import list_images

    if not (SHARED / "data" / "photos").is_dir():
        missing("../shared/data/photos")

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
    readme = (root / "README.md").read_text()
    assert "--max-steps 1100" in readme and "figures/degraded_strip.png" in readme
    strip = Image.open(root / "figures" / "degraded_strip.png")
    assert strip.size == (5 * 256, 6 * 256)  # 3 crops x 2 degradations; LR, bicubic, v1, v2, HR
    sharpness = json.loads((root / "figures" / "degraded_sharpness.json").read_text())["mean"]
    assert set(sharpness) == {"jpeg:30", "noise:12+jpeg:60"}
    for by_method in sharpness.values():  # the model is sharper than bicubic on real-degraded inputs
        assert by_method["v1"]["laplacian_var"] > 2 * by_method["bicubic"]["laplacian_var"]
    pipe = DiT4SRPipeline.from_pretrained("bundled", device="cpu")
    assert pipe.transformer.config.prediction_type == "sample" and pipe.transformer.config.lr_residual
    assert pipe.effective_settings()["num_inference_steps"] == 1
    flat = Image.new("RGB", (16, 12), (200, 60, 20))
    out = np.asarray(pipe(flat, show_progress=False).images[0], dtype=np.float64)
    assert out.shape == (48, 64, 3)
    # A flat image stays (nearly) flat and keeps its colour.
    assert np.abs(out - (200, 60, 20)).mean() < 4


# -- data: skipping, sharding, prefetching ------------------------------------------------------
def test_undecodable_and_too_small_images_are_skipped_and_counted(tmp_path, caplog):
    config = _config(tmp_path)
    folder = pathlib.Path(config.data.roots[0])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.new("RGB", (16, 16)).save(folder / "tiny.png")
    with caplog.at_level("WARNING"):
        trainer = Trainer(config)
    assert sorted(trainer.source.skipped) == ["set/broken.png", "set/tiny.png"]
    assert "cannot be decoded" in trainer.source.skipped["set/broken.png"]
    assert "smaller than crop_size" in trainer.source.skipped["set/tiny.png"]
    assert "skipped 2 training image(s)" in caplog.text
    trainer.fit(show_progress=False)
    state = json.loads((tmp_path / "run" / "checkpoint-0000006" / "training_state" / "state.json").read_text())
    assert sorted(state["skipped_images"]) == ["set/broken.png", "set/tiny.png"]


def test_undecodable_image_found_while_training_is_skipped_without_preload(tmp_path):
    config = _config(tmp_path)
    config.data.preload = False
    (pathlib.Path(config.data.roots[0]) / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    trainer = Trainer(config)
    losses = trainer.fit(show_progress=False)
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert list(trainer.source.skipped) == ["set/broken.jpg"]


def test_a_step_draws_the_same_samples_however_many_workers_share_it(tmp_path):
    from dit4sr.degradation import Degradation, DegradationConfig
    from dit4sr.training.data import ShardedPairSource, list_images

    files = list_images([str(_images(tmp_path / "set", count=6))])
    degradation = Degradation(DegradationConfig(realistic_prob=0.5))
    one = ShardedPairSource(files, 32, degradation, seed=5, batch_size=4, num_shards=2)
    halves = [ShardedPairSource(files, 32, degradation, seed=5, batch_size=2, rank=r, world_size=2)
              for r in range(2)]
    # Each worker holds only its own shard of the files.
    held = [{key for key, _ in members} for h in halves for members in h.shards.values()]
    assert held[0].isdisjoint(held[1]) and held[0] | held[1] == {key for key, _ in files}
    assert set(halves[0].images) == held[0]
    for step in (0, 7):
        whole = one.batch(step)
        parts = [h.batch(step) for h in halves]
        assert torch.equal(whole.hr, torch.cat([p.hr for p in parts]))
        assert torch.equal(whole.lr, torch.cat([p.lr for p in parts]))
        assert whole.noise_seeds == parts[0].noise_seeds + parts[1].noise_seeds


def test_prefetching_loader_yields_exactly_the_direct_batches_and_measures_waiting(tmp_path):
    from dit4sr.training.data import PrefetchingLoader

    trainer = Trainer(_config(tmp_path, batch_size=3))
    started = time.perf_counter()
    loader = PrefetchingLoader(trainer.source, start_step=2, end_step=7, num_workers=3, prefetch=3)
    waited = 0.0
    try:
        for step in range(2, 7):
            before = time.perf_counter()
            batch = loader.get(step)
            waited += time.perf_counter() - before
            direct = trainer.source.batch(step)
            assert torch.equal(batch.hr, direct.hr) and torch.equal(batch.lr, direct.lr)
            assert batch.noise_seeds == direct.noise_seeds
        with pytest.raises(Exception):
            loader.get(7)  # nothing was prepared beyond the end
    finally:
        loader.close()
    # the waiting is counted, and only inside get(): more than nothing (the first batch was asked for as soon
    # as its building began), no more than the test saw get() take
    assert 0 < loader.wait_seconds <= waited <= time.perf_counter() - started
    trainer.fit(show_progress=False)
    assert 0 < trainer.data_wait_fraction < 1


# -- device, precision, memory ------------------------------------------------------------------
def test_device_and_precision_resolution_on_this_machine():
    from dit4sr.training import TrainingInputError, resolve_precision, resolve_training_device

    cpu = torch.device("cpu")
    assert resolve_training_device("cpu") == cpu
    assert resolve_precision("auto", cpu) is None  # fp32 on the CPU
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16  # asked for explicitly: CPU autocast
    with pytest.raises(TrainingInputError, match="unknown device 'gpu0'"):
        resolve_training_device("gpu0")
    with pytest.raises(TrainingInputError, match="not supported for training"):
        resolve_training_device("meta")
    if torch.cuda.is_available():
        assert resolve_training_device("auto").type == "cuda"
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        assert resolve_precision("auto", torch.device("cuda")) is expected
        with pytest.raises(TrainingInputError, match="not available"):
            resolve_training_device(f"cuda:{torch.cuda.device_count()}")
    else:
        assert resolve_training_device("auto") == cpu
        for name in ("cuda", "cuda:1"):
            with pytest.raises(TrainingInputError, match=f"device '{name}' is not available: torch sees no CUDA"):
                resolve_training_device(name)


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        config = _config(tmp_path / precision)
        config.precision = precision
        trainer = Trainer(config)
        assert trainer.autocast_dtype == (torch.bfloat16 if precision == "bf16" else None)
        losses[precision] = trainer.fit(show_progress=False)
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bfloat16
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05)
    state = json.loads((tmp_path / "bf16" / "run" / "checkpoint-0000006" / "training_state" / "state.json")
                       .read_text())
    assert state["precision"] == "torch.bfloat16" and state["device_type"] == "cpu"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    grads = []
    for checkpointing in (False, True):
        config = _config(tmp_path / str(checkpointing))
        config.model.gradient_checkpointing = checkpointing
        trainer = Trainer(config)
        assert trainer.transformer.gradient_checkpointing is checkpointing
        trainer.fit(show_progress=False, stop_at=1)  # a non-zero output layer, so every block gets gradients
        loss = trainer.loss(1)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in trainer.params]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# -- bad input: clear errors from the command line ----------------------------------------------
def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("dit4sr-train: error: ") and "Traceback" not in err
    return err


def test_missing_data_folder_is_named(tmp_path, capsys):
    _config(tmp_path)
    raw = yaml.safe_load((tmp_path / "train.yaml").read_text())
    raw["data"]["roots"] = [str(tmp_path / "no-such-photos")]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    err = _cli_error(capsys, ["--config", str(tmp_path / "train.yaml"), "--no-progress"])
    assert f"training data folder {tmp_path / 'no-such-photos'} does not exist" in err


def test_unknown_config_key_is_named(tmp_path, capsys):
    _config(tmp_path)
    raw = yaml.safe_load((tmp_path / "train.yaml").read_text())
    raw["optim"]["lerning_rate"] = 1e-3
    raw["colour"] = "blue"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    err = _cli_error(capsys, ["--config", str(tmp_path / "train.yaml")])
    assert "optim.lerning_rate: unknown key" in err and "colour: unknown key" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_absent_device_is_named(tmp_path, capsys):
    _config(tmp_path)
    err = _cli_error(capsys, ["--config", str(tmp_path / "train.yaml"), "--device", "cuda"])
    assert "device 'cuda' is not available: torch sees no CUDA GPU" in err
    assert not (tmp_path / "run").exists()  # refused before anything was read or written


def test_checkpoint_of_a_different_architecture_is_refused(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["--config", str(tmp_path / "train.yaml"), "--no-progress", "--max-steps", "3"]) == 0
    raw = yaml.safe_load((tmp_path / "train.yaml").read_text())
    raw["model"]["transformer"]["num_layers"] = 3
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    err = _cli_error(capsys, ["--config", str(tmp_path / "train.yaml"), "--no-progress", "--resume"])
    assert "checkpoint-0000003 is of a different architecture" in err
    assert "num_layers: 2 in the checkpoint, 3 here" in err
    # A different trainable set is named too.
    config.model.transformer = None
    config.model.pretrained, config.model.trainable = str(tmp_path / "run" / "checkpoint-0000003"), "control"
    with pytest.raises(Exception, match=r"trained \d+ parameter tensors, this config trains \d+"):
        Trainer(config).resume()
