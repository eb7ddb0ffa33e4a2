import os

# Nothing in the test suite may reach a model hub or need Ray's token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib
import shutil
import tempfile

# Ray state of this test session only: a job's plain ray.init() joins the cluster recorded under Ray's temp
# folder, which must be this session's Ray, never another test session's on the same machine. Kept short: Ray's
# socket paths live below it.
_RAY_TMPDIR = None
if "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = _RAY_TMPDIR = tempfile.mkdtemp(prefix="ray-", dir="/tmp")

import pytest
from support.tiny_components import TINY_SETTINGS, TINY_TRANSFORMER

TESTS = pathlib.Path(__file__).parent
GOLDEN = TESTS / "data" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory) -> pathlib.Path:
    """A complete x4 pipeline root with a tiny from-scratch transformer (residual x0, output layer zero: its
    one-step result is exactly the bicubic-upscaled input) and the pixel-unshuffle autoencoder."""
    import torch

    from dit4sr.train import ModelConfig, build_model, write_pipeline_root

    root = tmp_path_factory.mktemp("tiny-model")
    transformer, vae, null_prompt, _ = build_model(ModelConfig(transformer=TINY_TRANSFORMER), seed=0)
    write_pipeline_root(root, transformer, vae, null_prompt, torch.float32, TINY_SETTINGS)
    return root


@pytest.fixture
def few_torch_threads():
    """Two torch threads: the test machine is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def pytest_unconfigure(config):
    if _RAY_TMPDIR:
        shutil.rmtree(_RAY_TMPDIR, ignore_errors=True)
