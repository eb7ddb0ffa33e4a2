"""Ray Train data-parallel training (TorchTrainer, DDP over gloo) with 2 CPU workers on the session's real local
Ray, checkpoints through Ray Train's storage on a real S3 API (the session's moto server over HTTP, s3fs)."""

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file
from support.training import train_config

from dit4sr.train import main
from dit4sr.training import Trainer, TrainingInputError
from dit4sr.training.distributed import train_distributed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("few_torch_threads", "ray_local")]


@pytest.fixture
def s3(bucket, s3_options):
    return bucket, s3_options


def _distributed_config(tmp_path, s3, batch_size, run_name):
    bucket, options = s3
    return train_config(tmp_path, count=6, batch_size=batch_size, extra={
        "data": {"num_shards": 2, "num_workers": 1},
        "distributed": {"num_workers": 2, "storage": f"s3://{bucket}/train", "storage_options": options,
                        "run_name": run_name},
    })


def _checkpoint_state(result) -> tuple[list[float], dict]:
    with result.checkpoint.as_directory() as folder:
        state = pathlib.Path(folder) / "training_state"
        return json.loads((state / "losses.json").read_text()), load_file(str(state / "transformer" /
                                                                               "diffusion_pytorch_model.safetensors"))


def test_two_workers_follow_one_worker_with_the_double_batch_and_resume_exactly(tmp_path, s3):
    """Two Ray Train workers x batch 2, stopped after step 3 and continued from Ray Train's latest checkpoint via
    the CLI, end where one process with the global batch 4 from the same two data shards ends: the same losses
    and weights up to float rounding (a resume that lost a step, the optimizer state or the data order would be
    far off; bit-identical resume in one process: test_train_resume)."""
    single = Trainer(_distributed_config(tmp_path / "single", s3, batch_size=4, run_name="unused"))
    single_losses = single.fit(show_progress=False)

    config = _distributed_config(tmp_path / "resumed", s3, batch_size=2, run_name="resumed")
    first = train_distributed(config, stop_at=3, show_progress=False)
    np.testing.assert_allclose(_checkpoint_state(first)[0], single_losses[:3], rtol=1e-5)
    with pytest.raises(TrainingInputError, match="already exists: pass --resume"):
        train_distributed(config, show_progress=False)
    assert main(["--config", str(tmp_path / "resumed" / "train.yaml"), "--num-workers", "2", "--resume",
                 "--no-progress"]) == 0
    bucket, options = s3
    import fsspec

    fs = fsspec.filesystem("s3", **options)
    checkpoints = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/train/resumed") if "checkpoint-" in p)
    assert checkpoints == ["checkpoint-0000003", "checkpoint-0000006"]
    final = f"{bucket}/train/resumed/checkpoint-0000006"
    with fs.open(f"{final}/training_state/losses.json") as f:
        losses = json.load(f)
    assert len(losses) == 6 and losses[:3] == _checkpoint_state(first)[0]  # the first three kept as they were
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    weights = load(fs.cat_file(f"{final}/training_state/transformer/diffusion_pytorch_model.safetensors"))
    for name, value in single.transformer.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6)
    with fs.open(f"{final}/model_index.json") as f:
        assert json.load(f)["transformer"] == ["dit4sr", "DiT4SRTransformer2DModel"]


def test_a_bad_input_met_by_the_workers_is_named(tmp_path, s3, capsys):
    config = _distributed_config(tmp_path, s3, batch_size=2, run_name="bad")
    raw = __import__("yaml").safe_load((tmp_path / "train.yaml").read_text())
    raw["data"]["roots"] = [str(tmp_path / "no-such-photos")]
    (tmp_path / "train.yaml").write_text(__import__("yaml").safe_dump(raw))
    assert config.distributed.num_workers == 2
    assert main(["--config", str(tmp_path / "train.yaml"), "--num-workers", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"dit4sr-train: error: worker 0: training data folder {tmp_path / 'no-such-photos'} does not exist" in err
