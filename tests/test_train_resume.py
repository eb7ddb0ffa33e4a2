"""Resuming training continues the run bit for bit: the trained weights, the optimizer, and the EMA weights
(what every checkpoint exports as the model), after a clean stop and after a SIGKILLed training process."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from support.training import train_config

from dit4sr.training import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("few_torch_threads")


def exported(checkpoint: pathlib.Path) -> dict[str, torch.Tensor]:
    """The model a checkpoint exports (its transformer/ weights: the EMA), tensor by tensor."""
    files = sorted((checkpoint / "transformer").glob("*.safetensors"))
    assert files, f"no exported weights in {checkpoint}"
    return {name: tensor for path in files for name, tensor in load_file(str(path)).items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_resumed_ema_and_export_are_bit_identical(tmp_path):
    straight = Trainer(train_config(tmp_path / "a"))
    losses = straight.fit(show_progress=False)

    config = train_config(tmp_path / "b")
    first = Trainer(config)
    assert first.fit(show_progress=False, stop_at=3) == losses[:3]
    resumed = Trainer(config)
    assert resumed.resume() and resumed.step == 3
    assert resumed.fit(show_progress=False) == losses[3:]
    assert_same_tensors(straight.transformer.state_dict(), resumed.transformer.state_dict())  # trained weights

    assert len(resumed.ema) == len(straight.ema) > 0
    assert all(torch.equal(a, b) for a, b in zip(straight.ema, resumed.ema))
    # The EMA really differs from the trained weights (else comparing it would prove nothing new).
    assert not all(torch.equal(e, p) for e, p in zip(resumed.ema, resumed.params))
    name = "checkpoint-0000006"
    assert_same_tensors(exported(tmp_path / "a/run" / name), exported(tmp_path / "b/run" / name))
    assert_same_tensors(load_file(str(tmp_path / "a/run" / name / "training_state/ema.safetensors")),
                        load_file(str(tmp_path / "b/run" / name / "training_state/ema.safetensors")))


def _train(config_path: pathlib.Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dit4sr.train", "--config", str(config_path), "--no-progress",
                             *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log
    return log


@pytest.mark.slow
def test_resume_after_sigkilled_training_process_is_bit_identical(tmp_path):
    steps = 6
    extra = {"checkpoint_every": 2, "keep_checkpoints": 10, "num_threads": 1}
    train_config(tmp_path / "straight", extra=extra, max_steps=steps)
    _finish(_train(tmp_path / "straight/train.yaml"))  # the uninterrupted run, same process setup

    train_config(tmp_path / "killed", extra=extra, max_steps=steps)
    run = tmp_path / "killed/run"
    process = _train(tmp_path / "killed/train.yaml")
    deadline = time.monotonic() + 300
    while not (run / "checkpoint-0000002").exists():
        assert process.poll() is None, f"training ended before its first checkpoint:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # mid-run: step 3 (or the next checkpoint's write) in flight
    process.communicate()
    assert not (run / f"checkpoint-{steps:07d}").exists()
    reached = max(int(path.name.split("-")[1]) for path in run.glob("checkpoint-*"))

    log = _finish(_train(tmp_path / "killed/train.yaml", "--resume"))
    assert f"at step {reached}" in log
    final = f"checkpoint-{steps:07d}"
    straight, killed = tmp_path / "straight/run" / final, run / final
    assert_same_tensors(exported(straight), exported(killed))  # the exported model (EMA)
    for name in ("ema.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        assert_same_tensors(load_file(str(straight / "training_state" / name)),
                            load_file(str(killed / "training_state" / name)))
    assert (straight / "training_state/losses.json").read_text() == (killed / "training_state/losses.json").read_text()
