"""Training pairs: listing and decoding photos, per-sample deterministic synthesis, sharding, prefetching.

Sample ``i`` of global step ``k`` is a pure function of ``(seed, k, i)`` and the data: its image, crop,
flips, degradation and the torch seed for its noise draws all come from ``SeedSequence([seed, k, i])``.
The global batch of ``num_workers x batch_size`` samples is cut into ``num_shards`` consecutive runs of
samples; run ``s`` draws its images from shard ``s`` (every ``num_shards``-th listed image from ``s``).
A worker computes only its own slice of the global batch, so it reads only its own shards, and for a
fixed ``num_shards`` the samples of a step do not depend on how many workers share it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..degradation import Degradation, bicubic_upscale
from ..image_processing import IMAGE_SUFFIXES
from .errors import TrainingInputError

logger = logging.getLogger(__name__)

# Errors PIL raises for files that are not (complete, supported) images.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_list(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def list_images(roots: list[str], exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """``(key, path)`` for each image under the roots, key = ``<root name>/<relative path>``, sorted."""
    found = []
    for root in roots:
        root_path = Path(root)
        if not root_path.is_dir():
            raise TrainingInputError(f"training data folder {root} does not exist or is not a directory")
        for path in sorted(root_path.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                key = f"{root_path.name}/{path.relative_to(root_path).as_posix()}"
                if key not in exclude:
                    found.append((key, str(path)))
    return sorted(found)


def decode_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@dataclass
class Batch:
    hr: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    lr: torch.Tensor  # degraded, bicubic-upscaled back to the HR size, (B, 3, H, W) in [-1, 1]
    noise_seeds: list[int]  # one torch seed per sample for its timestep, prompt-drop and noise draws


class ShardedPairSource:
    """Random HR crops (flips, 90-degree turns) and their degraded LR for this worker's slice of each step.

    ``preload`` decodes this worker's images once into memory (small sets); otherwise each sample decodes
    its photo when drawn (large archives). Files that cannot be decoded are skipped and counted
    (``skipped``), as are images smaller than the crop; with ``preload`` this happens up front.
    """

    def __init__(self, files: list[tuple[str, str]], crop_size: int, degradation: Degradation, seed: int,
                 batch_size: int, rank: int = 0, world_size: int = 1, num_shards: int | None = None,
                 preload: bool = True):
        scale = degradation.config.scale
        if crop_size % scale:
            raise TrainingInputError(f"data.crop_size {crop_size} is not divisible by the scale {scale}")
        num_shards = num_shards or world_size
        if num_shards % world_size:
            raise TrainingInputError(f"data.num_shards {num_shards} is not a multiple of the {world_size} workers")
        if num_shards > batch_size * world_size:
            raise TrainingInputError(f"data.num_shards {num_shards} exceeds the global batch {batch_size * world_size}")
        if len(files) < num_shards:
            raise TrainingInputError(f"{len(files)} training images cannot fill {num_shards} data shards")
        self.crop_size, self.degradation, self.seed = crop_size, degradation, seed
        self.batch_size, self.rank, self.world_size, self.num_shards = batch_size, rank, world_size, num_shards
        self.preload = preload
        self.skipped: dict[str, str] = {}  # key -> reason
        self._lock = threading.Lock()
        per_worker = num_shards // world_size
        self.shards: dict[int, list[tuple[str, str]]] = {}
        self.images: dict[str, Image.Image] = {}
        for shard in range(rank * per_worker, (rank + 1) * per_worker):
            members = files[shard::num_shards]
            if preload:
                members = [(key, path) for key, path in members if self._load(key, path) is not None]
            if not members:
                raise TrainingInputError(f"data shard {shard} has no usable training images "
                                 f"({len(self.skipped)} skipped: {self.skipped_summary()})")
            self.shards[shard] = members
        if self.skipped:
            logger.warning("skipped %d training image(s): %s", len(self.skipped), self.skipped_summary())

    @property
    def num_images(self) -> int:
        return sum(len(m) for m in self.shards.values())

    def skipped_summary(self, limit: int = 5) -> str:
        items = [f"{key} ({reason})" for key, reason in sorted(self.skipped.items())]
        return ", ".join(items[:limit]) + (f", ... {len(items) - limit} more" if len(items) > limit else "")

    def _load(self, key: str, path: str) -> Image.Image | None:
        image = self.images.get(key)
        if image is not None:
            return image
        try:
            image = decode_rgb(path)
        except DECODE_ERRORS as error:
            reason = f"cannot be decoded: {type(error).__name__}: {error}"
        else:
            if min(image.size) >= self.crop_size:
                if self.preload:
                    self.images[key] = image
                return image
            reason = f"{image.width}x{image.height} is smaller than crop_size {self.crop_size}"
        with self._lock:
            if key not in self.skipped:
                self.skipped[key] = reason
                if not self.preload:
                    logger.warning("skipping training image %s: %s", key, reason)
        return None

    def sample(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sample ``index`` (in the global batch) of ``step``: HR, LR and its noise seed."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, index]))
        shard = index * self.num_shards // (self.batch_size * self.world_size)
        members = self.shards[shard]
        for _attempt in range(100):
            key, path = members[int(rng.integers(len(members)))]
            image = self._load(key, path)
            if image is not None:
                break
        else:
            raise RuntimeError(f"data shard {shard}: no decodable image in 100 draws ({self.skipped_summary()})")
        size = self.crop_size
        left, top = int(rng.integers(image.width - size + 1)), int(rng.integers(image.height - size + 1))
        crop = image.crop((left, top, left + size, top + size))
        for _turn in range(int(rng.integers(4))):
            crop = crop.transpose(Image.Transpose.ROTATE_90)
        if rng.uniform() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        lr = bicubic_upscale(self.degradation(crop, rng), self.degradation.config.scale)
        noise_seed = int(rng.integers(2**63 - 1))
        return to_unit_tensor(crop), to_unit_tensor(lr), noise_seed

    def batch(self, step: int) -> Batch:
        """This worker's ``batch_size`` samples of global step ``step``."""
        first = self.rank * self.batch_size
        samples = [self.sample(step, i) for i in range(first, first + self.batch_size)]
        return Batch(torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]),
                     [s[2] for s in samples])


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class PrefetchingLoader:
    """Builds the batches of the coming steps in ``num_workers`` threads while the model trains.

    Degradation is PIL, numpy and torch work that mostly releases the GIL, so threads run it in parallel
    without copying the decoded images into processes. ``get(step)`` returns step ``step``'s batch (pinned
    when ``pin_memory``) and adds the time spent waiting for it to ``wait_seconds``: the share of the
    training time the device sat idle for want of data.
    """

    def __init__(self, source: ShardedPairSource, start_step: int, end_step: int, num_workers: int = 2,
                 prefetch: int = 4, pin_memory: bool = False):
        self.source, self.pin_memory = source, pin_memory
        self.next_step, self.end_step = start_step, end_step
        self.prefetch = max(1, prefetch)
        self.pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="dit4sr-data")
        self.pending: queue.SimpleQueue[tuple[int, Future]] = queue.SimpleQueue()
        self.wait_seconds = 0.0
        for _ in range(self.prefetch):
            self._submit()

    def _submit(self) -> None:
        if self.next_step < self.end_step:
            self.pending.put((self.next_step, self.pool.submit(self._build, self.next_step)))
            self.next_step += 1

    def _build(self, step: int) -> Batch:
        batch = self.source.batch(step)
        if self.pin_memory:
            batch.hr, batch.lr = batch.hr.pin_memory(), batch.lr.pin_memory()
        return batch

    def get(self, step: int) -> Batch:
        queued_step, future = self.pending.get_nowait()
        if queued_step != step:
            raise RuntimeError(f"loader out of order: asked for step {step}, next prepared is {queued_step}")
        started = time.perf_counter()
        batch = future.result()
        self.wait_seconds += time.perf_counter() - started
        self._submit()
        return batch

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
