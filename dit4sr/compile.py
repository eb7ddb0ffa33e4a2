"""Compiled inference: ``torch.compile`` over the transformer's repeated blocks (diffusers' regional compilation).

Only the 24 joint blocks are compiled (``DiT4SRTransformer2DModel.compile_repeated_blocks``): they hold nearly
all the FLOPs, compile as one graph per block kind (dual-attention, plain, last) instead of one per block, and
take a fraction of a whole-model compile. They are compiled with dynamic shapes, so one graph per block kind
serves every tile batch — the last, partial batch of a step, one-tile images, video frames, clipped tiles of
small images — without padding (a batch of exactly one tile adds one more). Padding the last batch to the batch
size instead compiles again for every distinct batch below it and wastes the padded tiles' compute
(``benchmarks/gpu_transformer.py --tiny`` counts the graphs each choice compiles).

Compiled kernels round differently from eager ones (bf16 on a GPU): outputs match eager up to that rounding,
and a compiled run repeats its own bytes. The inductor cache lives on the node (``compile_cache_dir``), so an
actor restarted on the same node reuses its kernels instead of compiling again.
"""

from __future__ import annotations

import os
from typing import Any

import torch

COMPILE_CACHE_ENV = "DIT4SR_COMPILE_CACHE"


def compile_cache_dir() -> str:
    """Where compiled kernels persist: ``$DIT4SR_COMPILE_CACHE`` if set, else inductor's own cache folder
    (``$TORCHINDUCTOR_CACHE_DIR``, or ``torchinductor_<user>`` under the node's temp dir), which outlives the process,
    so a restarted actor finds it warm. Ours must win over ``$TORCHINDUCTOR_CACHE_DIR``: torch sets that variable to
    its default itself, the first time anything asks for the folder (loading a pipeline does)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    if os.environ.get(COMPILE_CACHE_ENV):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ[COMPILE_CACHE_ENV]  # inductor reads it at every write
    return cache_dir()


def compile_transformer(transformer: torch.nn.Module, **compile_options: Any) -> dict[str, Any]:
    """Compile ``transformer``'s repeated blocks in place with dynamic shapes; returns what was done.

    ``compile_options`` go to ``torch.compile`` (``mode``, ``backend``, ...; ``dynamic`` defaults to True).
    Idempotent: a second call returns the first call's record.
    """
    if getattr(transformer, "compiled_blocks", None) is not None:
        return transformer.compiled_blocks
    cache = compile_cache_dir()
    compile_options = {"dynamic": True, **compile_options}
    transformer.compile_repeated_blocks(**compile_options)
    transformer.compiled_blocks = {"regional": True, **compile_options, "cache_dir": cache}
    return transformer.compiled_blocks
