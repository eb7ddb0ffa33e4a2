"""The stages that run per input: read source bytes (CPU tasks), upscale (actors), write outputs (CPU tasks).

Rows flowing between stages carry the *encoded* bytes — the source file into the actor, the encoded output out
of it — never decoded pixels: a decoded photo is 5-20x its JPEG/HEIC size and an upscaled float32 frame is
another scale² x 4 bytes larger, while decoding and encoding cost milliseconds next to diffusion sampling. So the
actor decodes, upscales and encodes, and what crosses the object store (possibly between nodes) stays compact.

Every per-input step catches and classifies its errors into a ``failed`` row, so a bad input never fails its
batch-mates or the job.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pyarrow as pa

from . import manifest, media
from .config import JobConfig
from .engine import load_engine
from .storage import Location, UnsafeKeyError

# Columns of the rows between stages: the manifest's plus the payload and the input's prompt.
STAGE_SCHEMA = manifest.SCHEMA.append(pa.field("data", pa.binary())).append(pa.field("prompt", pa.string()))


def _rows(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def _table(rows: list[dict[str, Any]], schema: pa.Schema = STAGE_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def _fail(row: dict[str, Any], error_type: str, exc: BaseException | str) -> dict[str, Any]:
    message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    row.update(status="failed", error_type=error_type, error_message=str(message)[:2000], data=None)
    return row


def derive_seed(base_seed: int, data: bytes) -> int:
    """Per-input seed from the job seed and the input's bytes only — never from its batch, worker or order."""
    digest = hashlib.sha256(base_seed.to_bytes(8, "little", signed=True) + hashlib.sha256(data).digest()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def read_sources(batch: pa.Table, input_location: Location) -> pa.Table:
    """CPU task: fetch each pending input's bytes (an object deleted since listing becomes a failed row)."""
    rows = _rows(batch)
    for row in rows:
        row["started_at"] = manifest.utcnow()
        try:
            row["data"] = input_location.read(row["source_key"])
        except FileNotFoundError as exc:
            _fail(row, "missing_source", f"source disappeared after listing: {exc}")
        except UnsafeKeyError as exc:
            _fail(row, exc.error_type, exc)
        except Exception as exc:  # noqa: BLE001 - one input's storage failure must not fail its batch-mates
            _fail(row, "read_failed", exc)
    return _table(rows)


class Upscaler:
    """Actor: loads the engine once in ``__init__`` and keeps it; ``__call__`` handles one batch of inputs."""

    def __init__(self, config: dict[str, Any], settings: dict[str, Any], prompt_embeds: dict[str, Any] | None = None):
        import ray

        self.cfg = JobConfig.model_validate(config)
        self.settings = settings
        device = self.cfg.model.device or ("cuda" if ray.get_gpu_ids() else "cpu")
        # Prompt embeddings arrive as object refs (computed once per distinct prompt, outside the actors).
        embeds = {prompt: ray.get(ref) for prompt, ref in (prompt_embeds or {}).items()}
        self.engine = load_engine(self.cfg, settings, device=device, prompt_embeds=embeds)
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.worker = f"{self.node_id[:12]}/{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _table([self._upscale_one(row) if row["status"] is None else row for row in _rows(batch)])

    def _upscale_one(self, row: dict[str, Any]) -> dict[str, Any]:
        row.update(worker=self.worker, node_id=self.node_id)
        data = row["data"]
        row["seed"] = seed = derive_seed(self.cfg.upscale.seed, data)
        try:
            decoded = media.decode_image(data, row["source_key"], self.cfg.limits.max_input_pixels)
        except media.MediaError as exc:
            return _fail(row, exc.error_type, exc)
        except Exception as exc:  # noqa: BLE001
            return _fail(row, "decode_failed", exc)
        height, width = decoded.pixels.shape[:2]
        scale = self.settings["scale"]
        row.update(width=width, height=height, source_format=decoded.info.format)
        if width * height * scale * scale > self.cfg.limits.max_output_pixels:
            return _fail(row, "output_too_large",
                         f"{width}x{height} at x{scale} is {width * height * scale * scale} output pixels, above "
                         f"limits.max_output_pixels={self.cfg.limits.max_output_pixels}")
        try:
            upscaled = self.engine.upscale(media.to_float_rgb(decoded.pixels), seed=seed, prompt=row["prompt"] or "")
        except Exception as exc:  # noqa: BLE001 - an engine failure on one input is that input's failure
            # MemoryError, torch.cuda.OutOfMemoryError: too big for this worker, unlike a broken input.
            out_of_memory = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            return _fail(row, "out_of_memory" if out_of_memory else "engine_failed", exc)
        if upscaled.shape[:2] != (height * scale, width * scale):
            return _fail(row, "engine_failed", f"engine returned {upscaled.shape[1]}x{upscaled.shape[0]}, expected "
                                               f"{width * scale}x{height * scale}")
        try:
            encoded, _extension = media.encode_image(upscaled, decoded.info, self.cfg.output.format,
                                                     self.cfg.output.quality)
        except media.MediaError as exc:
            return _fail(row, exc.error_type, exc)
        except Exception as exc:  # noqa: BLE001
            return _fail(row, "encode_failed", exc)
        row.update(data=encoded, out_width=width * scale, out_height=height * scale, status="ok")
        return row


def write_outputs(batch: pa.Table, output_location: Location, run_id: str) -> pa.Table:
    """CPU task: write each output atomically, then commit the batch's manifest part (rows after outputs)."""
    rows = _rows(batch)
    for row in rows:
        if row["status"] == "ok":
            data = row["data"]
            try:
                written = output_location.write_atomic(row["output_key"], data)
            except Exception as exc:  # noqa: BLE001
                _fail(row, "write_failed", exc)
            else:
                row.update(output_sha256=hashlib.sha256(data).hexdigest(), output_size=written.size,
                           output_etag_or_mtime=written.identity)
        row["data"] = None
        row["finished_at"] = manifest.utcnow()
        if row["started_at"] is not None:
            row["seconds"] = (row["finished_at"] - row["started_at"]).total_seconds()
    manifest.write_part(output_location, run_id, rows)
    return _table(rows, manifest.SCHEMA)
