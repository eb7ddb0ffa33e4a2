"""Plug-in engines for the catalog tests (``model.path: support.engines:<factory>``).

They wrap the bicubic engine and add one behaviour each. One-shot behaviours leave a marker file in
``$CATALOG_TEST_MARKERS`` so that a restarted actor does not repeat them.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time

import numpy as np

from pipeline.engine import BicubicEngine


def _marker(name: str) -> pathlib.Path:
    return pathlib.Path(os.environ["CATALOG_TEST_MARKERS"]) / name


class _Wrapped(BicubicEngine):
    calls = 0

    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        self.calls += 1
        self.before(image)
        return super().upscale(image, seed=seed, prompt=prompt)

    def before(self, image: np.ndarray) -> None:
        pass


class _CrashOnce(_Wrapped):
    """Kills its own process (SIGKILL) on its second image — mid-batch — once per marker."""

    def before(self, image: np.ndarray) -> None:
        marker = _marker("crashed")
        if self.calls == 2 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def crash_once(settings: dict) -> _CrashOnce:
    return _CrashOnce(settings)


class _Slow(_Wrapped):
    def before(self, image: np.ndarray) -> None:
        time.sleep(float(os.environ.get("CATALOG_TEST_SLOW_S", "0.25")))


def slow(settings: dict) -> _Slow:
    return _Slow(settings)


class _GpuProbe(_Wrapped):
    """Records which (fake) GPU ids Ray assigned to this actor process."""

    def before(self, image: np.ndarray) -> None:
        import ray

        _marker(f"gpus-{os.getpid()}").write_text(",".join(map(str, ray.get_gpu_ids())))


def gpu_probe(settings: dict) -> _GpuProbe:
    return _GpuProbe(settings)


def never_load(settings: dict):
    raise AssertionError("the dry run must not load the model")


class _FaultyByWidth(_Wrapped):
    """Fails the way a model can, chosen by the input's width (the engine sees only pixels): 11 px raises an
    error, 13 or 22 px a CUDA out-of-memory error (as torch raises it on a GPU), 17 px returns the wrong size."""

    def before(self, image: np.ndarray) -> None:
        import torch

        width = image.shape[1]
        if width == 11:
            raise RuntimeError("simulated engine failure (11 px wide input)")
        if width in (13, 22):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB "
                                              "total capacity; 78.02 GiB already allocated)")

    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        result = super().upscale(image, seed=seed, prompt=prompt)
        return result[:-1] if image.shape[1] == 17 else result


def faulty_by_width(settings: dict) -> _FaultyByWidth:
    return _FaultyByWidth(settings)


class _NodeMarked(_Slow):
    """Slow, and leaves ``start-<node>-<pid>-<n>`` before each image and ``done-<node>-<pid>-<n>`` after it, so a
    test can see which node holds work in flight. While a ``hold`` marker exists no image finishes, so work seen
    in flight stays in flight until the test lets it go."""

    def upscale(self, image: np.ndarray, *, seed: int, prompt: str) -> np.ndarray:
        import ray

        name = f"{ray.get_runtime_context().get_node_id()}-{os.getpid()}-{self.calls}"
        _marker(f"start-{name}").write_text("")
        result = super().upscale(image, seed=seed, prompt=prompt)
        while _marker("hold").exists():
            time.sleep(0.01)
        _marker(f"done-{name}").write_text("")
        return result


def node_marked(settings: dict) -> _NodeMarked:
    return _NodeMarked(settings)


class _Chaos(_Wrapped):
    """Kills its own process (SIGKILL) on its ``kill_at``-th image while fewer than ``kill_budget`` kills are
    recorded, both read from ``chaos.json`` in the marker folder (an environment variable would not reach actors of
    a Ray started earlier). Deterministic, so every run of the test kills: a restarted actor counts from one again
    and kills again until the budget is spent."""

    def before(self, image: np.ndarray) -> None:
        import json

        settings = _marker("chaos.json")
        if not settings.exists():
            return
        chaos = json.loads(settings.read_text())
        if self.calls == chaos["kill_at"] and len(list(_marker("").glob("chaos-kill-*"))) < chaos["kill_budget"]:
            _marker(f"chaos-kill-{os.getpid()}-{time.monotonic_ns()}").write_text("")
            os.kill(os.getpid(), signal.SIGKILL)


def chaos(settings: dict) -> _Chaos:
    return _Chaos(settings)


# -- the operations tests' gate: bicubic, but each image waits until ``$CATALOG_TEST_MARKERS/gate`` exists, after
# leaving ``gate.waiting`` there, so a test can hold a run in the middle of its work for as long as it needs (another
# run overlapping it, a SIGKILL). The markers folder comes from the environment the session's Ray was started with,
# so it reaches actors of jobs that join that Ray.


def gate_path() -> pathlib.Path:
    return _marker("gate")


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
