"""Prompts on the cluster: each input's caption as its prompt (``upscale.caption``, as the paper runs DiT4SR "with
LLaVA"; ``dit4sr.captioning``), and the text encoding of every prompt, outside the upscaling actors.

Where each step runs:

* **Planning** resolves the caption settings (``pipeline.spec.Captioning``: the model folder is checked from its
  small files — config.json, chat template — so a wrong path fails the job before any input is read) and takes every
  caption it can from the unit state: a unit's latest done row keeps its caption, reused while the source's
  identity (size, ETag/mtime) and the caption fingerprint (model identity, question, token limit, filter, dtype)
  match — a re-run, a resumed run or a change of any other setting captions nothing. Sources listed in
  ``upscale.prompts_uri`` take their prompt from there, uncaptioned.
* **Clips** get one caption, shared by every segment as the clip's seed is: from the **middle frame of the first
  segment** (decoded as the upscaler decodes it: deinterlaced where the clip is), or of a frame sequence the
  middle frame file of its first segment. They are captioned before the stream (``caption_clips``: a Ray Data pass,
  frame reads in CPU tasks, captions on the ``Captioner`` actors), so a clip's segments never wait on each other.
* **Photos** are captioned in the stream: read → ``Captioner`` (actor pool, ``compute.caption``) → ``PromptEncoding``
  (actor pool, the model's SD3 text encoders) → upscale → write; the embedding rides with its row.
* **Texts several units share** (a clip's text, a fixed prompt, a prompt file's repeated texts, the negative prompt)
  are encoded once before the stream (``shared_prompt_embeddings``: a Ray Data pass on ``PromptEncoding`` actors)
  into Ray's object store; upscaling actors fetch each as they first need it (``PromptEmbeddings``). So no text is
  encoded twice in a run but two photos whose captions happen to be equal, on two encoding actors.
"""

from __future__ import annotations

import collections
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from PIL import Image

import media
from media import video

from . import listing, manifest
from .engine import NEGATIVE
from .plan import Plan
from .planner import CAPTION_FIELDS
from .spec import RunSpec, Stage
from .storage import Location
from .upscaler import EMBEDDING_COLUMN, RECENT_TEXTS, _fail, _read_unit, _table, _task


def set_caption(row: dict[str, Any], caption: str, spec: RunSpec, run_id: str | None = None) -> None:
    """Give ``row`` its caption and the prompt made of it; ``run_id``: the run that generated it (default: this)."""
    row.update(caption=caption, prompt=spec.prompt_text(caption), caption_model=spec.caption.model,
               caption_fingerprint=spec.caption.fingerprint, caption_run_id=run_id or spec.run_id)


def _stage_compute(stage: Stage, actors: int | None = None) -> dict[str, Any]:
    return {"compute": ray.data.ActorPoolStrategy(min_size=min(stage.min_actors, actors or stage.min_actors),
                                                  max_size=min(stage.max_actors, actors or stage.max_actors)),
            "num_gpus": stage.gpus_per_actor, "num_cpus": stage.cpus_per_actor, "batch_size": stage.batch_size,
            "batch_format": "pyarrow"}


def _actor_device(spec: RunSpec) -> str:
    """The device of a captioning or prompt-encoding actor (its torch threads set on the way)."""
    import torch

    torch.set_num_threads(spec.captioning.threads)
    return "cuda" if ray.get_gpu_ids() else "cpu"


# -- captioning ------------------------------------------------------------------------------------------------------
class Captioner:
    """Actor: one caption model (``dit4sr.ImageCaptioner``); captions each row still without a prompt (``prompt`` is
    null) from its ``data``, an image file: a photo, or a clip's representative frame (``caption_clips``)."""

    def __init__(self, spec: RunSpec):
        from dit4sr import ImageCaptioner

        caption = spec.caption
        self.spec = spec
        self.captioner = ImageCaptioner.from_pretrained(
            caption.model, torch_dtype=caption.dtype, device=_actor_device(spec),
            storage_options=dict(caption.storage_options), question=caption.question,
            max_new_tokens=caption.max_new_tokens, filter_focus_sentences=caption.filter_focus_sentences)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            if row["status"] is None and row["prompt"] is None and row["unit"] != "segment":  # clips: caption_clips
                self._caption(row)
        return _table(rows, batch.schema)

    def _caption(self, row: dict[str, Any]) -> None:
        try:
            decoded = media.decode_image(row["data"], row["source_key"], self.spec.limits.max_input_pixels)
        except media.MediaError as exc:
            _fail(row, exc.error_type, exc)
            return
        except Exception as exc:  # noqa: BLE001 - as the upscaler would classify it
            _fail(row, "decode_failed", exc)
            return
        try:
            caption = self.captioner.caption(media.to_float_pixels(decoded.pixels))
        except Exception as exc:  # noqa: BLE001 - one input's captioning failure is that input's alone
            _fail(row, "caption_failed", exc)
            return
        set_caption(row, caption, self.spec)


def to_generate(plan: Plan) -> int:
    """Captions the plan still needs: its photos' and its clips' without one from earlier runs."""
    return plan.prompt_uses[None] + sum(clip.row["prompt"] is None for clip in plan.clips.values())


def needs_captions(plan: Plan) -> bool:
    """Whether any photo of the plan still needs its caption (clips are captioned before the stream)."""
    return plan.prompt_uses[None] > 0


def read_caption_frames(batch: pa.Table, input_location: Location, output_location: Location) -> pa.Table:
    """CPU task: each clip's representative frame as an image file in ``data`` — the middle frame of its first
    segment (a video's decoded as the upscaler decodes it, as 8-bit PNG; a sequence's frame file as it is)."""
    rows = batch.to_pylist()
    for row in rows:
        try:
            row["data"] = _middle_frame(row, input_location, output_location)
        except FileNotFoundError as exc:
            _fail(row, "missing_source", f"source disappeared after listing: {exc}")
        except media.MediaError as exc:
            _fail(row, exc.error_type, exc)
        except Exception as exc:  # noqa: BLE001
            _fail(row, "read_failed", exc)
        row["frames"] = None
    return _table(rows, batch.schema)


def _middle_frame(row: dict[str, Any], source: Location, output: Location) -> bytes:
    task = _task(row)
    if task["kind"] == "sequence":
        return source.read(task["frames"][len(task["frames"]) // 2])
    _read_unit(row, source, output)  # the first segment's packets, as its reader fetches them
    segment = task["segment"]
    frames = video.decode_segment(row.pop("data"), segment, row["source_key"])
    middle = next(frame for number, frame in enumerate(frames) if number == segment.output_frames // 2)
    frames.close()
    pixels = np.clip(media.to_float_pixels(middle)[..., :3] * 255 + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def caption_clips(plan: Plan) -> None:
    """Caption every clip of the plan that has no caption yet (one per clip, from its representative frame) and give
    it to the clip's row and segments; a clip whose frame cannot be read or captioned fails alone (rejected)."""
    todo = [clip for clip in plan.clips.values() if clip.row["prompt"] is None]
    if not todo:
        return
    source, output = plan.spec.input.location, plan.spec.output.location
    stage = plan.spec.captioning
    requests = _table([{**clip.row, "task": clip.caption_task} for clip in todo])
    frames = ray.data.from_arrow([requests.slice(start, stage.batch_size)
                                  for start in range(0, requests.num_rows, stage.batch_size)])
    captioned = frames.map_batches(
        read_caption_frames, fn_kwargs={"input_location": source, "output_location": output},
        batch_format="pyarrow", batch_size=stage.batch_size, num_cpus=0.5
    ).map_batches(Captioner, fn_constructor_kwargs={"spec": plan.spec}, **_stage_compute(stage, len(todo)))
    results = {}
    for batch in captioned.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.drop_columns(["data", "frames", "task"]).to_pylist():
            results[row["source_key"]] = row
    rejected, captioned_clips = [], {}
    for key, result in results.items():
        clip = plan.clips[key]
        if result["status"] == "failed":
            rejected.append({**clip.row, "status": "failed", "error_type": result["error_type"],
                             "error_message": f"its caption frame: {result['error_message']}"})
            del plan.clips[key]
            continue
        set_caption(clip.row, result["caption"], plan.spec, result["caption_run_id"])
        captioned_clips[key] = {name: clip.row[name] for name in CAPTION_FIELDS}
        plan.prompt_uses[clip.row["prompt"]] += len(clip.segment_keys) - clip.tally.staged
    runner = listing.Runner(True)
    if rejected:
        plan.rejected.blocks.append(ray.put(manifest.to_table(rejected)))
        plan.rejected.count += len(rejected)
    # The segments, where planning left them (the object store), get their clip's caption or leave with it.
    dropped = frozenset(row["source_key"] for row in rejected)
    fields, blocks = ray.put(captioned_clips), []
    for block in plan.todo.blocks:
        blocks.append(runner.submit(_with_clip_captions, block, fields, dropped, num_returns=2))
    plan.todo.blocks = [block for block, _ in blocks]
    plan.todo.count -= sum(ray.get([removed for _, removed in blocks]))


def _with_clip_captions(block: pa.Table, captioned: dict[str, dict[str, Any]], dropped: frozenset[str]
                        ) -> tuple[pa.Table, int]:
    """Task: a block of units to do with its clips' segments captioned, those of ``dropped`` clips removed; and how
    many were."""
    rows = block.to_pylist()
    kept = [row for row in rows if row["unit"] != "segment" or row["source_key"] not in dropped]
    for row in kept:
        if row["unit"] == "segment" and row["source_key"] in captioned:
            row.update(captioned[row["source_key"]])
    return pa.Table.from_pylist(kept, schema=block.schema), len(rows) - len(kept)


# -- text encoding ---------------------------------------------------------------------------------------------------
class PromptEncoding:
    """Actor: the model's SD3 text encoders (``dit4sr.PromptEncoder``); gives each row with a prompt to encode its
    embedding (``prompt_embedding``), encoding each distinct text of a batch once and keeping recent ones. Texts
    in ``shared`` were encoded before the stream (``shared_prompt_embeddings``) and are left alone."""

    def __init__(self, spec: RunSpec, shared: frozenset[str] = frozenset()):
        import dit4sr

        self.encoder = dit4sr.PromptEncoder.from_pretrained(spec.model.root, device=_actor_device(spec),
                                                            storage_options=spec.model.options)
        self.shared = shared
        self.recent: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        wanted = [row["prompt"] for row in rows
                  if row["status"] is None and row["prompt"] and row["prompt"] not in self.shared]
        embeddings = self.encode(wanted)
        for row in rows:
            row[EMBEDDING_COLUMN] = embeddings.get(row["prompt"]) if row["status"] is None else None
        schema = batch.schema if EMBEDDING_COLUMN in batch.schema.names else \
            batch.schema.append(pa.field(EMBEDDING_COLUMN, pa.binary()))
        return _table(rows, schema)

    def encode(self, texts: list[str]) -> dict[str, bytes]:
        missing = [text for text in dict.fromkeys(texts) if text not in self.recent]
        for text, embedding in zip(missing, self.encoder.encode(missing) if missing else []):
            self.recent[text] = embedding.to_bytes()
        found = {}
        for text in dict.fromkeys(texts):
            self.recent.move_to_end(text)
            found[text] = self.recent[text]
        while len(self.recent) > max(RECENT_TEXTS, len(found)):
            self.recent.popitem(last=False)
        return found


def shared_prompt_embeddings(plan: Plan) -> dict[str, ray.ObjectRef]:
    """Embeddings of the texts several units of the plan share, and of the negative prompt (key ``NEGATIVE``),
    encoded once in a Ray Data pass on ``PromptEncoding`` actors and kept in Ray's object store for the run."""
    if plan.spec.model.kind != "dit4sr":
        return {}
    texts = {text for text, count in plan.prompt_uses.items() if text and count > 1}
    negative = plan.spec.negative_text if plan.todo else None
    wanted = sorted(texts | ({negative} if negative else set()))
    if not wanted:
        return {}
    stage = plan.spec.captioning
    texts_table = pa.table({"prompt": pa.array(wanted, pa.string()), "status": pa.nulls(len(wanted), pa.string())})
    encoded = ray.data.from_arrow([texts_table.slice(start, stage.batch_size)
                                   for start in range(0, len(wanted), stage.batch_size)]).map_batches(
        PromptEncoding, fn_constructor_kwargs={"spec": plan.spec},
        **_stage_compute(stage, math.ceil(len(wanted) / stage.batch_size)))
    refs: dict[str, ray.ObjectRef] = {}
    from dit4sr import PromptEmbedding

    for batch in encoded.iter_batches(batch_size=None, batch_format="pyarrow"):
        for text, data in zip(batch["prompt"].to_pylist(), batch[EMBEDDING_COLUMN].to_pylist()):
            ref = ray.put(PromptEmbedding.from_bytes(data))
            if text in texts:
                refs[text] = ref
            if text == negative:
                refs[NEGATIVE] = ref
    return refs


def add_prompt_stages(dataset: ray.data.Dataset, plan: Plan, shared: Mapping[str, Any]) -> ray.data.Dataset:
    """The stream's prompt steps between reading and upscaling: captions for photos still without one, then the
    embeddings of the texts no other unit shares. Steps with nothing to do are left out (no model loads)."""
    stage_kwargs = _stage_compute(plan.spec.captioning)
    if plan.spec.caption and needs_captions(plan):
        dataset = dataset.map_batches(Captioner, fn_constructor_kwargs={"spec": plan.spec}, **stage_kwargs)
    if plan.spec.model.kind == "dit4sr" and any(
            text is None or (text and text not in shared) for text in plan.prompt_uses):
        dataset = dataset.map_batches(PromptEncoding, fn_constructor_kwargs={
            "spec": plan.spec, "shared": frozenset(text for text in shared if text != NEGATIVE)}, **stage_kwargs)
    return dataset
