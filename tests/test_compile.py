"""Compiled inference (dit4sr.compile) and the automatic tile batch measured from free memory."""

import numpy as np
import pytest
import torch
from support.tiny_components import TINY_SETTINGS, pixel_pipeline, tiny_transformer
from torch._dynamo.utils import counters

from dit4sr.compile import compile_cache_dir

FAST = {**TINY_SETTINGS, "tile_size": 8, "tile_overlap": 2}


def transformer_inputs(batch, side=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 4, side, side, generator=g),
            torch.randn(batch, tokens, 16, generator=g), torch.randn(batch, 12, generator=g),
            torch.full((batch,), 500.0))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def test_repeated_blocks_are_the_joint_blocks():
    model = tiny_transformer(num_layers=3)
    blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
    assert blocks == list(model.transformer_blocks)


@pytest.mark.slow  # dynamo captures four image shapes: ~10 s
def test_compiled_pipeline_compiles_once_per_block_kind_for_every_tile_batch(fresh_dynamo):
    """Images of 1, 4, 6 and 9 tiles with guidance and a tile batch of 4 make transformer batches of 2, 8, 4 and
    (9 = 4 + 4 + 1 tiles) 2: dynamic shapes serve them all with one graph per block kind (2 kinds here: dual
    attention, last). Backend "eager" runs dynamo's capture only, so this counts graphs fast."""
    shapes = [(32, 32), (56, 56), (56, 80), (80, 80)]  # latents 8x8, 14x14, 14x20, 20x20
    images = [np.random.default_rng(h * w).random((h, w, 3), dtype=np.float32) for h, w in shapes]
    settings = {**FAST, "guidance_scale": 2.0, "negative_prompt": "", "tile_batch_size": 4, "upscale": 1}
    eager_pipe = pixel_pipeline(dual_attention_layers=(0,))
    eager = [eager_pipe(image, output_type="np", **settings).images[0] for image in images]

    pipe = pixel_pipeline(dual_attention_layers=(0,))
    record = pipe.enable_compile(backend="eager")
    assert record["dynamic"] is True and record["regional"] is True
    assert pipe.enable_compile(backend="eager") is record  # idempotent
    compiled = [pipe(image, output_type="np", **settings).images[0] for image in images]
    assert [pipe.geometry(i.shape[0], i.shape[1], 1, tile_size=8, tile_overlap=2, process_size=0).tiles
            for i in images] == [1, 4, 6, 9]
    assert fresh_dynamo["stats"]["unique_graphs"] == 2
    for got, want in zip(compiled, eager):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_compile_cache_lives_on_the_node(monkeypatch, tmp_path):
    import os
    import tempfile

    monkeypatch.delenv("DIT4SR_COMPILE_CACHE", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert os.path.dirname(compile_cache_dir()) == tempfile.gettempdir()  # inductor's own, outliving the process
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "operator"))
    assert compile_cache_dir() == str(tmp_path / "operator")
    # torch sets TORCHINDUCTOR_CACHE_DIR itself before any compile (loading a pipeline does): ours still wins
    monkeypatch.setenv("DIT4SR_COMPILE_CACHE", str(tmp_path / "kernels"))
    assert compile_cache_dir() == str(tmp_path / "kernels")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "kernels")  # where inductor will write
    assert (tmp_path / "kernels").is_dir()


def test_automatic_tile_batch_is_recorded_and_reproduces_the_output():
    pipe = pixel_pipeline()
    image = np.random.default_rng(0).random((20, 20, 3), dtype=np.float32)
    auto = pipe(image, output_type="np", **FAST).images[0]
    chosen = pipe.tile_batch_size
    assert chosen is not None and chosen >= 9  # the CPU's 2 GiB budget holds many tiny tiles
    again = pipe(image, output_type="np", tile_batch_size=chosen, **FAST).images[0]
    assert np.array_equal(auto, again)


def test_automatic_tile_batch_on_cuda_comes_from_free_memory_measured_once(monkeypatch):
    """No GPU here: the CUDA branch is fed a free-memory figure through torch.cuda.mem_get_info."""
    pipe = pixel_pipeline()
    free = {"bytes": 8 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    cuda = torch.device("cuda", 0)
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    tokens = 1000
    per_tile = tokens * width * 24
    assert pipe._tile_batch_size(None, 10**6, tokens, cuda) == (4 << 30) // per_tile  # half of what is free
    assert pipe.tile_batch_size == (4 << 30) // per_tile
    free["bytes"] = 1 << 30  # the allocator now caches the first call's memory: the choice must not move
    assert pipe._tile_batch_size(None, 10**6, tokens, cuda) == (4 << 30) // per_tile
    assert pipe._tile_batch_size(None, 3, tokens, cuda) == 3  # never more than the tiles there are
    assert pipe._tile_batch_size(5, 10**6, tokens, cuda) == 5 and pipe.tile_batch_size == 5
