"""The catalog job, top-down: plan -> read -> upscale (actor pool) -> write outputs + manifest parts -> summary."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import ray

from . import manifest
from .config import JobConfig
from .engine import engine_kind, model_root, resolve_settings, texts_to_encode
from .example_catalog import lay_out_example_catalog
from .plan import Plan, estimate, locations, make_plan
from .upscaler import Upscaler, read_sources, write_outputs

log = logging.getLogger("pipeline")

EXIT_OK = 0  # every input ok (or already done)
EXIT_JOB_FAILED = 1  # the job itself failed: bad config, storage unreachable, cluster trouble
EXIT_INPUTS_FAILED = 3  # the job finished, but some inputs have `failed` rows


def build_dataset(plan: Plan, cfg: JobConfig, prompt_embeds: dict[str, Any]) -> ray.data.Dataset:
    """The streaming Ray Data plan; every stage returns manifest-shaped rows, failures included.

    Fault tolerance is Ray Data's own: task stages retry on worker loss and pool actors restart with their
    in-flight batch resubmitted (max_restarts / max_task_retries default to -1). Redoing a batch is safe
    because outputs are pure functions of their inputs, written atomically, and a batch's manifest part is
    named after the inputs it holds, so a redone batch replaces it rather than adding rows.
    """
    source, output = locations(cfg)
    batch_size = cfg.compute.batch_size
    pending = ray.data.from_items(plan.todo, override_num_blocks=max(1, math.ceil(len(plan.todo) / batch_size)))
    fetched = pending.map_batches(
        read_sources, fn_kwargs={"input_location": source}, batch_format="pyarrow", batch_size=batch_size,
        num_cpus=0.5)  # I/O-bound; a fractional CPU also keeps it from fusing into the actor stage
    upscaled = fetched.map_batches(
        Upscaler,
        fn_constructor_kwargs={"config": cfg.model_dump(), "settings": plan.settings, "prompt_embeds": prompt_embeds},
        compute=ray.data.ActorPoolStrategy(min_size=cfg.compute.actors.min, max_size=cfg.compute.actors.max),
        num_gpus=cfg.compute.gpus_per_actor, num_cpus=cfg.compute.cpus_per_actor,
        batch_size=batch_size, batch_format="pyarrow")
    return upscaled.map_batches(
        write_outputs, fn_kwargs={"output_location": output, "run_id": plan.run_id}, batch_format="pyarrow",
        batch_size=batch_size, num_cpus=0.5)


class Progress:
    """Logs done/failed/remaining and items/min every ``interval`` seconds from a background thread."""

    def __init__(self, total: int, interval: float):
        self.total, self.interval = total, interval
        self.ok = self.failed = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["status"] == "ok":
                self.ok += 1
            else:
                self.failed += 1

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.ok + self.failed
        rate = done / elapsed * 60 if elapsed > 0 else 0.0
        return (f"progress: {self.ok} done, {self.failed} failed, {self.total - done} remaining "
                f"of {self.total} — {rate:.1f} items/min")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            log.info(self.line())


def _encode_prompts(root: str, storage_options: dict[str, Any], texts: list[str]) -> Any:
    from dit4sr import PromptEncoder

    with PromptEncoder.from_pretrained(root, storage_options=storage_options) as encoder:
        embeddings = encoder.encode(texts)
    return embeddings[0] if len(embeddings) == 1 else tuple(embeddings)  # one object per text (num_returns)


def prompt_embeddings(cfg: JobConfig, plan: Plan) -> dict[str, ray.ObjectRef]:
    """Text encoders run once per distinct text, in one Ray task (on a GPU where actors get GPUs) — never in the
    upscaling actors, which receive the embeddings as object refs. Empty prompts need none (the model's stored
    null-prompt embedding)."""
    if engine_kind(cfg.model.path) != "dit4sr":
        return {}
    texts = texts_to_encode(plan.settings, sorted({row["prompt"] for row in plan.todo}))
    if not texts:
        return {}
    encode = ray.remote(_encode_prompts).options(
        num_cpus=1, num_gpus=1 if cfg.compute.gpus_per_actor else 0, num_returns=len(texts))
    refs = encode.remote(model_root(cfg).uri, cfg.model.storage_options, list(texts.values()))
    return dict(zip(texts, refs if len(texts) > 1 else [refs]))


def prepare(cfg: JobConfig, *, dry_run: bool = False) -> Plan:
    """Resolve settings and plan the run (laying out the example catalog first where configured)."""
    source, _ = locations(cfg)
    if cfg.input.example_catalog and not dry_run and not source.list():
        written = lay_out_example_catalog(source)
        log.info("input %s was empty: laid out an example catalog of %d photos", cfg.input.uri, len(written))
    plan = make_plan(cfg, resolve_settings(cfg), manifest.new_run_id())
    log.info("run %s (config %s): %d to process, %d already done, %d rejected", plan.run_id, plan.fingerprint,
             len(plan.todo), len(plan.skipped), len(plan.rejected))
    return plan


def execute(plan: Plan, cfg: JobConfig) -> dict[str, Any]:
    """Run the plan on Ray Data, commit the manifests and the run summary; returns the summary."""
    _, output = locations(cfg)
    started = time.monotonic()
    rows = plan.rejected + plan.skipped
    manifest.write_part(output, plan.run_id, rows)
    if plan.todo:
        dataset = build_dataset(plan, cfg, prompt_embeddings(cfg, plan))
        with Progress(len(plan.todo), cfg.run.progress_interval_s) as progress:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                done = batch.to_pylist()
                rows.extend(done)
                progress.add(done)
            log.info(progress.line())
        manifest.compact_run(output, plan.run_id)
    summary = manifest.summarize(rows, run_id=plan.run_id, seconds=time.monotonic() - started,
                                 fingerprint=plan.fingerprint,
                                 extra={"settings": plan.settings, "output_uri": cfg.output.uri})
    summary["summary_uri"] = manifest.write_summary(output, plan.run_id, summary)
    print(manifest.format_summary(summary), flush=True)
    return summary


def run_job(cfg: JobConfig, *, dry_run: bool = False) -> int:
    plan = prepare(cfg, dry_run=dry_run)
    if dry_run:
        return _dry_run(plan, cfg)
    return EXIT_INPUTS_FAILED if execute(plan, cfg)["failed"] else EXIT_OK


def _dry_run(plan: Plan, cfg: JobConfig) -> int:
    cost = estimate(plan, cfg)
    for item, row in zip(cost["items"], plan.todo):
        size = f"{item['width']}x{item['height']}" if item["width"] else item.get("note", "?")
        print(f"process {row['source_key']} -> {row['output_key']}  {size}  tiles={item['tiles']}")
    for row in plan.skipped:
        print(f"skip    {row['source_key']} (already done with config {row['config_fingerprint']})")
    for row in plan.rejected:
        print(f"reject  {row['source_key']}: {row['error_type']}: {row['error_message']}")
    print(f"dry run: {len(plan.todo)} to process, {len(plan.skipped)} to skip, {len(plan.rejected)} rejected; "
          f"estimated cost {cost['tiles']} tiles x {cost['steps']} steps = {cost['tile_steps']} tile-steps"
          + (f" ({cost['unknown']} inputs with unreadable headers not counted)" if cost["unknown"] else ""),
          flush=True)
    return EXIT_OK
