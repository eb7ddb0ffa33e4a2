import os

# Nothing in the test suite may reach a model hub or need Ray's token auth.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

TESTS = pathlib.Path(__file__).parent
GOLDEN = TESTS / "data" / "golden"
SHARED = TESTS.parent.parent / "shared"


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN


TINY_TRANSFORMER = {
    "sample_size": 8, "patch_size": 2, "in_channels": 48, "out_channels": 48, "num_layers": 2,
    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 32,
    "pooled_projection_dim": 16, "pos_embed_max_size": 16, "dual_attention_layers": [], "qk_norm": "rms_norm",
    "prediction_type": "sample", "lr_residual": True,
}
TINY_SETTINGS = {"num_inference_steps": 1, "guidance_scale": 1.0, "added_prompt": "", "process_size": 0,
                 "tile_size": 16, "tile_overlap": 4, "color_fix": "none"}


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
