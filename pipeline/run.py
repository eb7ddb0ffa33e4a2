"""The catalog job, top-down: plan -> read -> upscale (actor pool) -> write outputs + manifest parts -> finish
clips (videos assembled, sequences summed up) -> summary.

Photos, video segments and frame-sequence segments ride one stream of units of work, so every actor stays
busy whatever the catalog holds; a clip is finished by the driver as soon as its last segment is staged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.parse
from typing import Any

import ray

from . import captions, listing, manifest, preflight, report, state
from .clips import ClipFinisher, remove_staged
from .config import JobConfig
from .engine import engine_run_settings
from .example_catalog import lay_out_example_catalog, lay_out_example_videos
from .metrics import RunMetrics
from .outcome import EXIT_INPUTS_FAILED, EXIT_JOB_FAILED, EXIT_LOCKED, EXIT_OK  # noqa: F401 - the job's codes
from .plan import Plan, estimate, make_plan
from .preflight import locations
from .progress import FrameCounter, Progress
from .run_lock import RunLock, RunLocked
from .spec import RunSpec
from .storage import Location
from .upscaler import Upscaler, read_sources, write_outputs

log = logging.getLogger("pipeline")
READ_CPUS = 0.5  # reading is I/O-bound; a fractional CPU also keeps it from fusing into the actor stage


def build_dataset(plan: Plan, prompt_embeds: dict[str, Any], frame_counter: Any = None) -> ray.data.Dataset:
    """The streaming Ray Data plan; every stage returns manifest-shaped rows, failures included. ``prompt_embeds``:
    object refs of the embeddings of texts several units share (``captions.shared_prompt_embeddings``); captions
    and the other texts' embeddings are made in the stream (``captions.add_prompt_stages``).

    Fault tolerance is Ray Data's own: task stages retry on worker loss and pool actors restart with their
    in-flight batch resubmitted (max_restarts / max_task_retries default to -1). Redoing a batch is safe
    because outputs are pure functions of their inputs, written atomically, and a batch's manifest part is
    named after the units it holds, so a redone batch replaces it rather than adding rows.
    """
    spec = plan.spec
    source, output, stage = spec.input.location, spec.output.location, spec.upscaling
    batch_size = stage.batch_size
    # The planning tasks' blocks, never the driver's rows, cut into a batch per block so that the read stage spreads
    # over many tasks.
    pending = plan.todo.dataset(batch_size, num_cpus=READ_CPUS)
    fetched = pending.map_batches(
        read_sources, fn_kwargs={"input_location": source, "output_location": output}, batch_format="pyarrow",
        batch_size=batch_size, num_cpus=READ_CPUS)
    prompted = captions.add_prompt_stages(fetched, plan, prompt_embeds)
    upscaled = prompted.map_batches(
        Upscaler,
        fn_constructor_kwargs={"spec": spec, "prompt_embeds": prompt_embeds, "frame_counter": frame_counter},
        # Ray's current API for an actor pool: map_batches' `concurrency=` is deprecated since Ray 2.51.
        compute=ray.data.ActorPoolStrategy(min_size=stage.min_actors, max_size=stage.max_actors),
        num_gpus=stage.gpus_per_actor, num_cpus=stage.cpus_per_actor,
        batch_size=batch_size, batch_format="pyarrow")
    written = upscaled.map_batches(
        write_outputs, fn_kwargs={"output_location": output, "run_id": plan.run_id}, batch_format="pyarrow",
        batch_size=batch_size, num_cpus=0.5)
    # Ray Data fails a dataset that moves no block for 30 minutes; one batch of film segments on one GPU (or a
    # large photo on a CPU) legitimately takes longer, and a stuck actor is Ray's to restart, not a job failure.
    # Set on this dataset's own context, not the process-wide default.
    written.context.execution_no_progress_timeout_s = -1
    return written


def prepare(cfg: JobConfig, *, dry_run: bool = False) -> Plan:
    """Resolve settings and plan the run (laying out the example catalog first where configured)."""
    source, _ = locations(cfg)
    if cfg.input.example_catalog and not dry_run and not source.list():
        videos = cfg.input.example_catalog == "videos"
        written = (lay_out_example_videos if videos else lay_out_example_catalog)(source)
        log.info("input %s was empty: laid out an example catalog of %d %s", cfg.input.uri, len(written),
                 "files (a film and a frame sequence)" if videos else "photos")
    plan = make_plan(RunSpec.resolve(cfg, manifest.new_run_id()), dry_run=dry_run)
    log.info("run %s (config %s): %d units to process (%d clips), %d already done, %d rejected", plan.run_id,
             plan.fingerprint, len(plan.todo), len(plan.clips), len(plan.skipped), len(plan.rejected))
    return plan


def execute(plan: Plan) -> dict[str, Any]:
    """Run the plan on Ray Data, finish its clips, commit the manifests and the run summary; returns the summary.

    The driver holds what is in flight: each finished batch is counted (progress, per-clip tallies, the engines'
    own settings) and dropped — its rows are in its manifest part already. The summary, the runs index and the
    report are computed from the committed manifest."""
    spec = plan.spec
    output = spec.output.location
    started, started_at = time.monotonic(), manifest.utcnow()
    captions.caption_clips(plan)  # one caption per clip, before its segments stream (may reject a clip)
    for block in plan.rejected.blocks:  # one part per planning bucket, like a batch's
        manifest.write_part(output, plan.run_id, listing.fetch(block).to_pylist())
    remove_staged(output, plan.stale_staging)
    clips = ClipFinisher(plan)
    engine_settings: set[str] = set()
    counter = (FrameCounter.options(name=f"frame-counter-{plan.run_id}").remote()
               if plan.clips and plan.todo else None)
    with _ended(counter), Progress(plan, spec.progress_interval_s, RunMetrics(spec), counter) as progress:
        progress.add(clips.drain_finished())  # clips staged whole by earlier runs are finished at once
        if plan.todo:
            dataset = build_dataset(plan, captions.shared_prompt_embeddings(plan), counter)
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                engine_settings.update(batch["engine_settings"].unique().drop_null().to_pylist())
                done = batch.drop_columns(["engine_settings"]).to_pylist()
                progress.add(done)
                clips.add(done)
                progress.add(clips.drain_finished())
        clips.wait()
        progress.add(clips.drain_finished())
        if plan.todo or plan.clips:
            log.info(progress.line())
    manifest.commit_run(output, plan.run_id)  # the run's rows become visible at once, in one file
    state.fold(output)
    run_files = manifest.list_runs(output).get(plan.run_id)
    tally = manifest.Tally.of_files(output, run_files.rows_from if run_files else [])
    chosen = engine_run_settings([{"engine_settings": text} for text in sorted(engine_settings)])
    summary = manifest.summarize(tally, run_id=plan.run_id, seconds=time.monotonic() - started,
                                 fingerprint=plan.fingerprint, skipped=len(plan.skipped),
                                 extra={"settings": {**spec.fingerprint_fields(), **chosen}, "video": spec.video,
                                        "output_uri": output.uri, "started_at": started_at.isoformat(),
                                        "finished_at": manifest.utcnow().isoformat()})
    summary["report_uri"] = report.write_report(spec, summary)
    summary["summary_uri"] = manifest.write_summary(output, plan.run_id, summary)
    state.record_run(output, summary, started_at=started_at, finished_at=manifest.utcnow(),
                     exit_code=state.exit_code_of(summary))
    print(manifest.format_summary(summary), *where_lines(output, summary), sep="\n", flush=True)
    return summary


@contextlib.contextmanager
def _ended(actor: Any):
    """Kill ``actor`` (if any) when the block ends: Ray Data keeps a finished dataset, and with it the handle its
    actors were given, so the actor would otherwise outlive the run in a driver that runs several."""
    try:
        yield
    finally:
        if actor is not None:
            ray.kill(actor)


def file_url(path: str) -> str:
    """A file:// URL a browser opens (spaces and the like escaped; `=` of run folders kept readable)."""
    return "file://" + urllib.parse.quote(os.path.abspath(path), safe="/=")


def where_lines(output: Location, summary: dict[str, Any]) -> list[str]:
    """Where a run's results are: outputs, its report (a file:// URL on disks, which a browser opens), and the
    manifests' glob for pandas, pyarrow or DuckDB."""
    def shown(relative: str) -> str:
        return output.path(relative) if output.is_local else output.url(relative)

    lines = [f"outputs:   {output.root if output.is_local else output.uri.rstrip('/')}/"]
    if summary.get("report_uri"):
        key = report.report_key(summary["run_id"])
        lines.append(f"report:    {file_url(output.path(key)) if output.is_local else output.url(key)}")
    lines.append(f"manifests: {shown(f'{manifest.MANIFEST_DIR}/*/*.parquet')} (this run: run_id = "
                 f"'{summary['run_id']}'; one row per run: {shown(f'{state.RUNS_DIR}/*.parquet')})")
    return lines


def run_job(cfg: JobConfig, *, dry_run: bool = False, break_lock: bool = False) -> int:
    """The whole run; returns its exit code. ``break_lock`` takes the output's run lock over from whatever run
    holds it (an operator's decision: the job's ``--break-lock``)."""
    preflight.check(cfg)  # before the run lock writes under output.uri, and before any model loads
    if dry_run:
        return _dry_run(prepare(cfg, dry_run=True))
    _, output = locations(cfg)
    lock = (RunLock(output, cfg.run.lock, break_lock=break_lock) if cfg.run.lock.enabled
            else contextlib.nullcontext())
    try:
        with lock:  # held from before planning until the summary is written
            if cfg.run.lock.enabled:  # only a lock holder may tidy what earlier runs left
                state.recover(output)
            else:  # old enough to belong to no live writer, whoever runs beside this run
                state.sweep_stale_temps(output)
            return state.exit_code_of(execute(prepare(cfg)))
    except RunLocked as exc:
        log.error("%s", exc)
        return EXIT_LOCKED


def _dry_run(plan: Plan) -> int:
    cost = estimate(plan)
    steps = cost["steps"]
    clip_tiles: dict[str, int] = {}
    for item, row in zip(cost["items"], plan.todo):
        if row["unit"] == "segment":
            clip_tiles[row["source_key"]] = clip_tiles.get(row["source_key"], 0) + (item["tiles"] or 0)
            continue
        size = f"{item['width']}x{item['height']}" if item["width"] else item.get("note", "?")
        print(f"process {row['source_key']} -> {row['output_key']}  {size}  tiles={item['tiles']}")
    for key, clip in plan.clips.items():
        row = clip.row
        todo = len(clip.segment_keys) - clip.tally.staged
        size = f"{row['width']}x{row['height']}" if row["width"] else "?"
        print(f"process {key} -> {row['output_key']}  {row['unit']} {size}  frames={row['frames_in']} "
              f"segments={len(clip.segment_keys)} ({todo} to do)  tiles={clip_tiles.get(key, 0)}")
    for key in plan.skipped:
        print(f"skip    {key} (already done)")
    for row in plan.rejected:
        print(f"reject  {row['source_key']}: {row['error_type']}: {row['error_message']}")
    units = sum(row["unit"] != "segment" for row in plan.todo) + len(plan.clips)
    segments = sum(row["unit"] == "segment" for row in plan.todo)
    print(f"dry run: {units} to process, {len(plan.skipped)} to skip, {len(plan.rejected)} rejected; "
          f"estimated cost {cost['tiles']} tiles x {steps} steps = {cost['tile_steps']} tile-steps"
          + (f"; {len(plan.clips)} clips in {segments} segments to do" if plan.clips else "")
          + (f" ({cost['unknown']} inputs with unreadable headers not counted)" if cost["unknown"] else "")
          + (f"; {captions.to_generate(plan)} captions to generate" if plan.spec.caption else ""),
          flush=True)
    return EXIT_OK
