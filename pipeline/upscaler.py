"""The stages that run per unit of work: read (CPU tasks), upscale (actors), write (CPU tasks).

Rows flowing between stages carry *encoded* bytes — a photo's file, a video segment's packets (copied out of
the source without decoding), a sequence segment's frame files; and back, the encoded output — never decoded
pixels: a decoded photo is 5-20x its file, an upscaled float32 frame another scale² x 4 bytes larger, while
decoding and encoding cost little next to diffusion sampling. So the actor decodes, upscales and encodes, and
what crosses the object store (possibly between nodes) stays compact.

Every per-unit step catches and classifies its errors into a ``failed`` row, so a bad input never fails its
batch-mates or the job.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

import media
from media import video

from . import manifest
from .engine import Engine, bicubic, load_engine, output_size_error, upscale_frames
from .metrics import publish_gpu_memory_peak
from .planner import derive_seed
from .spec import RunSpec
from .storage import Location, UnsafeKeyError

# What the engine chose for itself (JSON of ``engine.run_settings``, e.g. its tile batch): it rides back to the
# driver for the run summary, never into manifests.
ENGINE_SETTINGS = pa.field("engine_settings", pa.string())
EMBEDDING_COLUMN = "prompt_embedding"  # a row's own prompt embedding (safetensors bytes), encoded in the stream
RECENT_TEXTS = 64  # embeddings an encoding or upscaling actor keeps for texts it may meet again
# Columns of the rows between stages: the manifest's, the unit's task (pickled by the planner), the payload:
# `data` (one file) or `frames` (a sequence segment's frame files), and the prompt's embedding (pipeline.captions).
STAGE_SCHEMA = manifest.SCHEMA.append(pa.field("task", pa.binary())).append(pa.field("data", pa.binary())) \
    .append(pa.field("frames", pa.list_(pa.binary()))).append(ENGINE_SETTINGS) \
    .append(pa.field(EMBEDDING_COLUMN, pa.binary()))


def _rows(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def _table(rows: list[dict[str, Any]], schema: pa.Schema = STAGE_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def _fail(row: dict[str, Any], error_type: str, exc: BaseException | str) -> dict[str, Any]:
    message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    row.update(status="failed", error_type=error_type, error_message=str(message)[:2000], data=None, frames=None)
    return row


def _task(row: dict[str, Any]) -> dict[str, Any]:
    return pickle.loads(row["task"])


# -- read -------------------------------------------------------------------------------------------------------
def _read_unit(row: dict[str, Any], source: Location, output: Location | None = None) -> None:
    if row["unit"] == "image":
        row["data"] = source.read(row["source_key"])
        return
    task = _task(row)
    if task["kind"] == "sequence":
        row["frames"] = [source.read(key) for key in task["frames"]]
        return
    if task.get("staged_source"):  # decoded once at planning (pipeline.video_index): its frames, losslessly
        row["data"] = output.read(task["staged_source"])
        return
    with source.fs.open(source.path(row["source_key"]), "rb", block_size=1 << 20) as handle:
        row["data"] = video.extract_segment(handle, task["segment"], row["source_key"])


def read_sources(batch: pa.Table, input_location: Location, output_location: Location | None = None) -> pa.Table:
    """CPU task: fetch each unit's encoded input (an object deleted since listing becomes a failed row)."""
    rows = _rows(batch)
    for row in rows:
        row["started_at"] = manifest.utcnow()
        try:
            _read_unit(row, input_location, output_location)
        except FileNotFoundError as exc:
            _fail(row, "missing_source", f"source disappeared after listing: {exc}")
        except (UnsafeKeyError, media.MediaError) as exc:
            _fail(row, exc.error_type, exc)
        except Exception as exc:  # noqa: BLE001 - one input's storage failure must not fail its batch-mates
            _fail(row, "read_failed", exc)
    return _table(rows)


# -- upscale ----------------------------------------------------------------------------------------------------
def _engine_failure(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    # MemoryError, torch.cuda.OutOfMemoryError: too big for this worker, unlike a broken input.
    out_of_memory = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
    return _fail(row, "out_of_memory" if out_of_memory else "engine_failed", exc)


class FlickerMeter:
    """Mean absolute difference between consecutive output frames, and the same for the bicubic-upscaled input
    frames (the reference); their ratio is the clip's flicker figure (1.0: no more change than the input)."""

    def __init__(self, scale: int):
        self.scale = scale
        self.pairs = 0
        self.output_sum = self.reference_sum = 0.0
        self._previous: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, source: np.ndarray, output: np.ndarray) -> None:
        if self._previous is not None:
            previous_source, previous_output = self._previous
            # Bicubic resizing is linear: the upscaled difference is the difference of the upscaled frames.
            change = bicubic(source[..., :3] - previous_source[..., :3], self.scale)
            self.reference_sum += float(np.abs(change).mean())
            self.output_sum += float(np.abs(output[..., :3] - previous_output[..., :3]).mean())
            self.pairs += 1
        self._previous = (source, output)

    def fields(self) -> dict[str, Any]:
        if not self.pairs:
            return {"flicker_pairs": 0}
        reference = self.reference_sum / self.pairs
        return {"flicker_pairs": self.pairs, "reference_motion": reference,
                "flicker": self.output_sum / self.reference_sum if self.reference_sum > 0 else None}


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


class PromptEmbeddings(Mapping[str, Any]):
    """An upscaling actor's view of the run's prompt embeddings, by exact text: the unit at hand's own (``use``;
    encoded in the stream) and shared ones (pipeline.captions.shared_prompt_embeddings), fetched from Ray's object
    store when first needed (the most recent kept)."""

    def __init__(self, shared: Mapping[str, Any]):
        self.shared = dict(shared)
        self.fetched: OrderedDict[str, Any] = OrderedDict()
        self.own: dict[str, Any] = {}

    def use(self, row: dict[str, Any]) -> None:
        """The embedding that came with ``row`` (if any) serves its prompt until the next row."""
        from dit4sr import PromptEmbedding

        data = row.get(EMBEDDING_COLUMN)
        self.own = {row["prompt"]: PromptEmbedding.from_bytes(data)} if data else {}

    def __getitem__(self, text: str) -> Any:
        if text in self.own:
            return self.own[text]
        if text not in self.fetched:
            import ray

            self.fetched[text] = ray.get(self.shared[text])  # KeyError: no embedding for this text
            while len(self.fetched) > RECENT_TEXTS:
                self.fetched.popitem(last=False)
        self.fetched.move_to_end(text)
        return self.fetched[text]

    def __iter__(self) -> Iterator[str]:
        return iter({**self.shared, **self.own})

    def __len__(self) -> int:
        return len({**self.shared, **self.own})


class Upscaler:
    """Actor: loads the engine once in ``__init__`` and keeps it; ``__call__`` handles one batch of units, each by
    its kind: a photo, a video segment, or a frame-sequence segment."""

    def __init__(self, spec: RunSpec, prompt_embeds: dict[str, Any] | None = None, frame_counter: Any = None):
        import ray

        self.spec, self.frame_counter = spec, frame_counter  # a progress.FrameCounter where the run has clips
        device = spec.model.device or ("cuda" if ray.get_gpu_ids() else "cpu")
        # Prompt embeddings come with their rows, or as object refs of texts several units share (each encoded
        # once per run, outside the actors: pipeline.captions).
        self.prompt_embeds = PromptEmbeddings(prompt_embeds or {})
        self.engine: Engine = load_engine(spec, device=device, prompt_embeds=self.prompt_embeds)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.worker = f"{self.node_id[:12]}/{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._upscale(row) if row["status"] is None else row for row in _rows(batch)]
        chosen = getattr(self.engine, "run_settings", None)
        if chosen:
            for row in rows:
                row["engine_settings"] = json.dumps(chosen, sort_keys=True)
        publish_gpu_memory_peak()
        return _table(rows)

    def _upscale(self, row: dict[str, Any]) -> dict[str, Any]:
        row.update(worker=self.worker, node_id=self.node_id)
        if row["prompt"] is None:  # captions on, and none reached this unit: never upscale it with the null prompt
            return _fail(row, "caption_failed", "no caption reached this unit")
        self.prompt_embeds.use(row)
        row[EMBEDDING_COLUMN] = None  # needed here only
        if row["unit"] == "image":
            return self._image(row)
        task = _task(row)
        try:
            if task["kind"] == "video":
                return self._video_segment(row, task)
            return self._sequence_segment(row, task)
        except media.MediaError as exc:
            return _fail(row, exc.error_type, exc)
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong in one segment fails that unit alone
            return _fail(row, "segment_failed", exc)

    def _check_output_size(self, row: dict[str, Any], width: int, height: int) -> bool:
        error = output_size_error(self.spec, width, height)
        if error:
            _fail(row, "output_too_large", error)
        return error is None

    def _upscale_checked(self, row: dict[str, Any], frames: list[np.ndarray], seeds: list[int]
                         ) -> list[np.ndarray] | None:
        """The engine's frames, or None after marking the row failed (engine error or a wrong output size)."""
        try:
            upscaled = upscale_frames(self.engine, frames, seeds=seeds, prompt=row["prompt"])
        except Exception as exc:  # noqa: BLE001 - an engine failure on one unit is that unit's failure
            _engine_failure(row, exc)
            return None
        scale = self.spec.scale
        for frame, result in zip(frames, upscaled):
            expected = (frame.shape[0] * scale, frame.shape[1] * scale)
            if result.shape[:2] != expected:
                _fail(row, "engine_failed", f"engine returned {result.shape[1]}x{result.shape[0]}, expected "
                                            f"{expected[1]}x{expected[0]}")
                return None
        return upscaled

    def _image(self, row: dict[str, Any]) -> dict[str, Any]:
        data = row["data"]
        row["seed"] = seed = derive_seed(self.spec.seed, hashlib.sha256(data).digest())
        output = self.spec.output
        encoded = self._photo(row, data, seed, output.format, output.quality or 95)
        if encoded is not None:
            row.update(data=encoded, status="ok")
        return row

    def _photo(self, row: dict[str, Any], data: bytes, seed: int, output_format: str, quality: int,
               name: str | None = None) -> bytes | None:
        """Decode, upscale and encode one photo or sequence frame; None after marking the row failed."""
        name = name or row["source_key"]
        try:
            decoded = media.decode_image(data, name, self.spec.limits.max_input_pixels)
        except media.MediaError as exc:
            _fail(row, exc.error_type, exc)
            return None
        except Exception as exc:  # noqa: BLE001
            _fail(row, "decode_failed", exc)
            return None
        height, width = decoded.pixels.shape[:2]
        row.update(width=width, height=height, source_format=decoded.info.format)
        if not self._check_output_size(row, width, height):
            return None
        upscaled = self._upscale_checked(row, [media.to_float_pixels(decoded.pixels)], [seed])
        if upscaled is None:
            return None
        row.update(out_width=width * self.spec.scale, out_height=height * self.spec.scale)
        try:
            return media.encode_image(upscaled[0], decoded.info, output_format, quality)[0]
        except media.MediaError as exc:
            _fail(row, exc.error_type, exc)
        except Exception as exc:  # noqa: BLE001
            _fail(row, "encode_failed", exc)
        return None

    def _frames_done(self, count: int) -> None:
        if self.frame_counter is not None:
            self.frame_counter.add.remote(count)  # fire and forget: progress display only

    def _frame_seeds(self, task: dict[str, Any], start: int, count: int) -> list[int]:
        """The clip's one seed for every frame; per-frame seeds only in the opt-in ``independent`` mode."""
        seed = task["clip_seed"]
        if self.spec.video.noise == "consistent":
            return [seed] * count
        return [derive_seed(seed, index.to_bytes(8, "little")) for index in range(start, start + count)]

    def _video_segment(self, row: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
        segment, index, timestamps = task["segment"], task["index"], iter(task["pts"])
        if not self._check_output_size(row, index.width, index.height):
            return row
        scale = self.spec.scale
        flicker = FlickerMeter(scale) if self.spec.video.measure_flicker else None
        frames = video.decode_segment(row.pop("data"), segment, row["source_key"])
        encoder = video.SegmentEncoder(index, self.spec.video.encoding, index.width * scale, index.height * scale,
                                       progressive=segment.deinterlace or not index.interlaced)
        done = segment.start * (2 if segment.field_rate else 1)  # output frames before the segment's
        for chunk in _batched(frames, self.spec.video.frames_per_call):
            sources = [media.to_float_pixels(frame) for frame in chunk]
            upscaled = self._upscale_checked(row, sources, self._frame_seeds(task, done, len(chunk)))
            if upscaled is None:
                return row
            for source, output in zip(sources, upscaled):
                encoder.add(output, next(timestamps))
                if flicker is not None:
                    flicker.add(source, output)
            done += len(chunk)
            self._frames_done(len(chunk))
        row.update(data=encoder.finish(), status="staged", width=index.width, height=index.height,
                   out_width=encoder.coded_width, out_height=encoder.coded_height, frames_out=encoder.frames,
                   codec=encoder.settings.codec, **(flicker.fields() if flicker else {}))
        return row

    def _sequence_segment(self, row: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
        # Frames are decoded one chunk at a time: a segment of large scans never sits in memory whole.
        keys, payloads = task["frames"], row.pop("frames")
        flicker = FlickerMeter(self.spec.scale) if self.spec.video.measure_flicker else None
        outputs, size = [], None
        for start in range(0, len(keys), self.spec.video.frames_per_call):
            chunk = list(zip(keys[start:start + self.spec.video.frames_per_call],
                             payloads[start:start + self.spec.video.frames_per_call]))
            decoded = []
            for key, data in chunk:
                try:
                    image = media.decode_image(data, key, self.spec.limits.max_input_pixels)
                except media.MediaError as exc:
                    return _fail(row, exc.error_type, exc)
                if size is None:
                    size = image.pixels.shape[:2]
                    row.update(width=size[1], height=size[0], source_format=image.info.format)
                    if not self._check_output_size(row, size[1], size[0]):
                        return row
                elif image.pixels.shape[:2] != size:
                    return _fail(row, "sequence_mixed_sizes", f"{key} is {image.pixels.shape[1]}x"
                                 f"{image.pixels.shape[0]}, the sequence's frames are {size[1]}x{size[0]}")
                decoded.append(image)
            sources = [media.to_float_pixels(image.pixels) for image in decoded]
            upscaled = self._upscale_checked(row, sources, self._frame_seeds(task, row["frame_start"] + start,
                                                                              len(sources)))
            if upscaled is None:
                return row
            for (key, _), image, source, output in zip(chunk, decoded, sources, upscaled):
                try:
                    # Frames go back with their own names, format and bit depth.
                    outputs.append(media.encode_image(output, image.info, "same", 95)[0])
                except media.MediaError as exc:
                    return _fail(row, exc.error_type, f"{key}: {exc}")
                if flicker is not None:
                    flicker.add(source, output)
            self._frames_done(len(chunk))
        row.update(frames=outputs, status="staged", out_width=size[1] * self.spec.scale,
                   out_height=size[0] * self.spec.scale, frames_out=len(outputs),
                   **(flicker.fields() if flicker else {}))
        return row


# -- write ------------------------------------------------------------------------------------------------------
def _write_unit(row: dict[str, Any], output: Location) -> None:
    if row["frames"] is not None:  # a sequence segment: each frame to its final key (same as its source's)
        task, total = _task(row), 0
        for key, data in zip(task["frames"], row["frames"]):
            total += output.write_atomic(key, data).size
        row.update(output_size=total, output_etag_or_mtime=None)
        return
    data = row["data"]
    written = output.write_atomic(row["output_key"], data)
    row.update(output_sha256=hashlib.sha256(data).hexdigest(), output_size=written.size,
               output_etag_or_mtime=written.identity)


def write_outputs(batch: pa.Table, output_location: Location, run_id: str) -> pa.Table:
    """CPU task: write each output (or staged segment) atomically, then commit the batch's manifest part (rows
    after outputs)."""
    rows = _rows(batch)
    for row in rows:
        if row["status"] in ("ok", "staged"):
            try:
                _write_unit(row, output_location)
            except Exception as exc:  # noqa: BLE001
                _fail(row, "write_failed", exc)
        row["data"] = row["frames"] = None
        row["finished_at"] = manifest.utcnow()
        if row["started_at"] is not None:
            row["seconds"] = (row["finished_at"] - row["started_at"]).total_seconds()
    manifest.write_part(output_location, run_id, rows)
    return _table(rows, manifest.SCHEMA.append(ENGINE_SETTINGS))
