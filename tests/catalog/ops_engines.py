"""A plug-in engine for the operations tests (``model.path: ops_engines:gated``): bicubic, but each image waits
until ``$CATALOG_TEST_MARKERS/gate`` exists, after leaving ``gate.waiting`` there — so a test can hold a run in
the middle of its work for as long as it needs (another run overlapping it, a SIGKILL). The markers folder comes
from the environment the session's Ray was started with, so it reaches actors of jobs that join that Ray."""

from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from pipeline.engine import BicubicEngine


def gate_path() -> pathlib.Path:
    return pathlib.Path(os.environ["CATALOG_TEST_MARKERS"]) / "gate"


class _Gated(BicubicEngine):
    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        gate = gate_path()
        gate.with_suffix(".waiting").touch()
        deadline = time.monotonic() + 600
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().upscale(image, seed=seed, prompt=prompt)


def gated(settings: dict) -> _Gated:
    return _Gated(settings)
