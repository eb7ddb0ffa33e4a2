"""Planning: list the inputs, diff them against earlier manifests, and decide what to do — before any download.

An input is skipped when its latest ``ok`` row has the same source identity (size + ETag/mtime), the same config
fingerprint, and the output object it wrote is still there unchanged (same size and ETag/mtime as recorded).
Everything else is (re)processed; keys that cannot be processed safely are rejected here as ``failed`` rows.
"""

from __future__ import annotations

import io
import pathlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from . import manifest
from .config import ConfigError, JobConfig, fingerprint
from .engine import tiles_per_image
from .media import output_extension
from .storage import Location, UnsafeKeyError, glob_matcher, check_relative_key


@dataclass
class Plan:
    run_id: str
    settings: dict[str, Any]
    fingerprint: str
    todo: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def locations(cfg: JobConfig) -> tuple[Location, Location]:
    return (Location(cfg.input.uri, cfg.input.storage_options), Location(cfg.output.uri, cfg.output.storage_options))


def check_output_outside_input(cfg: JobConfig, source: Location, output: Location) -> None:
    """Refuse an output.uri inside input.uri unless the input patterns leave it out (no job may eat its outputs)."""
    inner = source.contains(output)
    if inner is None:
        return
    included, excluded = glob_matcher(cfg.input.include), glob_matcher(cfg.input.exclude)
    probes = [f"{inner}/{name}".lstrip("/") for name in
              ("photo.png", "album/photo.jpg", f"{manifest.MANIFEST_DIR}/run=r/part-p.parquet")]
    if inner == "" or any(included(probe) and not excluded(probe) for probe in probes):
        raise ConfigError(
            f"output.uri {cfg.output.uri!r} lies inside input.uri {cfg.input.uri!r}: the job would read its own "
            f"outputs as inputs. Move the output elsewhere or add input.exclude: ['{inner or '<output>'}/**']")


def output_key(relative: str, output_format: str) -> str:
    """The output's key: the input's relative key, with the output format's extension."""
    extension = output_extension(relative, output_format)
    path = pathlib.PurePosixPath(relative)
    if not extension or extension == path.suffix:
        return relative
    return str(path.with_suffix(extension)) if path.suffix else f"{relative}{extension}"


def load_prompts(cfg: JobConfig) -> dict[str, str]:
    """Per-source prompts from ``upscale.prompts_uri`` (Parquet or CSV with columns ``source`` and ``prompt``)."""
    uri = cfg.upscale.prompts_uri
    if not uri:
        return {}
    location = Location(uri.rsplit("/", 1)[0] or ".", cfg.input.storage_options)
    data = location.read(uri.rsplit("/", 1)[1])
    reader = pq.read_table if uri.lower().endswith((".parquet", ".pq")) else pacsv.read_csv
    table = reader(io.BytesIO(data))
    missing = {"source", "prompt"} - set(table.column_names)
    if missing:
        raise ConfigError(f"upscale.prompts_uri {uri!r} lacks column(s) {sorted(missing)}; it needs source, prompt")
    return {str(s): str(p or "") for s, p in zip(table["source"].to_pylist(), table["prompt"].to_pylist())}


def make_plan(cfg: JobConfig, settings: dict[str, Any], run_id: str) -> Plan:
    source, output = locations(cfg)
    check_output_outside_input(cfg, source, output)
    plan = Plan(run_id=run_id, settings=settings, fingerprint=fingerprint(settings))
    prompts = load_prompts(cfg)
    previous = manifest.latest_ok(output)
    existing = {entry.relative: entry for entry in output.list(exclude=[f"{manifest.MANIFEST_DIR}/**"])}
    claimed: dict[str, str] = {}
    for entry in source.list(cfg.input.include, cfg.input.exclude):
        # A per-source prompt changes that source's output only, so it goes into that row's fingerprint.
        prompt = prompts.get(entry.relative, cfg.upscale.prompt) if "prompt" in settings else ""
        row_fingerprint = fingerprint({**settings, "prompt": prompt}) if "prompt" in settings else plan.fingerprint
        row = manifest.empty_row(
            run_id=run_id, source_uri=source.url(entry.relative), source_key=entry.relative,
            source_size=entry.size, source_etag_or_mtime=entry.identity, prompt=prompt,
            config_fingerprint=row_fingerprint)
        try:
            check_relative_key(entry.relative)
            row["output_key"] = key = output_key(entry.relative, cfg.output.format)
        except UnsafeKeyError as exc:
            plan.rejected.append({**row, "status": "failed", "error_type": exc.error_type, "error_message": str(exc)})
            continue
        row["output_uri"] = output.url(key)
        if key in claimed:
            plan.rejected.append({**row, "status": "failed", "error_type": "output_collision",
                                  "error_message": f"output {key!r} is already the output of {claimed[key]!r}"})
            continue
        claimed[key] = entry.relative
        done, out = previous.get(entry.relative), existing.get(key)
        if (done is not None and out is not None and done["output_key"] == key
                and (done["source_size"], done["source_etag_or_mtime"]) == (entry.size, entry.identity)
                and done["config_fingerprint"] == row["config_fingerprint"]
                and (done["output_size"], done["output_etag_or_mtime"]) == (out.size, out.identity)):
            plan.skipped.append({**row, "status": "skipped", "output_size": out.size,
                                 "output_etag_or_mtime": out.identity})
        else:
            plan.todo.append(row)
    return plan


def estimate(plan: Plan, cfg: JobConfig, threads: int = 16) -> dict[str, Any]:
    """Dry-run cost: read only image headers of pending inputs, count sampler tiles x steps."""
    source, _ = locations(cfg)
    steps = plan.settings.get("num_inference_steps") or 1

    def probe(row: dict[str, Any]) -> dict[str, Any]:
        try:
            with source.fs.open(source.path(row["source_key"]), "rb", block_size=1 << 16) as handle:
                width, height = Image.open(handle).size
        except Exception as exc:  # noqa: BLE001 - a dry run reports unreadable headers instead of failing
            return {"key": row["source_key"], "width": None, "height": None, "tiles": None,
                    "note": f"header unreadable: {type(exc).__name__}"}
        tiles = tiles_per_image(plan.settings, width, height)
        return {"key": row["source_key"], "width": width, "height": height, "tiles": tiles}

    with ThreadPoolExecutor(threads) as pool:
        probes = list(pool.map(probe, plan.todo))
    tiles = sum(p["tiles"] or 0 for p in probes)
    return {"items": probes, "tiles": tiles, "steps": steps, "tile_steps": tiles * steps,
            "unknown": sum(p["tiles"] is None for p in probes)}
