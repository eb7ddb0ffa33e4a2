"""Planning: list the inputs, diff them against earlier manifests, and decide what to do — before any download.

The listing (or S3 Inventory), the unit state and the output listing are split into buckets, each planned by a Ray
task (``plan_bucket``) with the per-unit planner (``pipeline.planner``: what each input becomes — skipped,
rejected, or units of work); the driver plans only the videos, indexed in Ray tasks (``pipeline.video_index``), and
keeps refs, counts and clips: the ``Plan`` that the run executes. A clip is finished by the driver once all its
segments are staged (``run.py``). ``estimate`` is the dry run's cost of a plan.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
from PIL import Image

import media

from . import listing, manifest, state, video_index
from .config import ConfigError
from .engine import tiles_per_frame
from .planner import STAGING_DIR, Clip, Planner, group_inputs, video_source
from .preflight import check_output_outside_input
from .spec import InputSpec, RunSpec
from .storage import Entry, Location, glob_matcher

log = logging.getLogger("pipeline")


class Rows:
    """Rows kept as blocks (Arrow tables, or refs to them in Ray's object store): counted without reading them,
    iterated one block at a time (``column``: that column's values instead of row dicts)."""

    def __init__(self, blocks: list[listing.Block], count: int, column: str | None = None):
        self.blocks, self.count, self.column = blocks, count, column

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        for block in self.blocks:
            table = listing.fetch(block)
            yield from (table[self.column].to_pylist() if self.column else table.to_pylist())

    def __getitem__(self, index: int) -> Any:
        return list(self)[index]

    def dataset(self, rows_per_block: int, num_cpus: float) -> ray.data.Dataset:
        """The rows as a Ray Data dataset of blocks of ``rows_per_block`` rows (raised so that a run never streams
        more than ``MAX_STREAM_BLOCKS``), each cut from its block where Ray Data reads it (``_Slices``), by tasks
        of ``num_cpus`` (those of the next stage: Ray Data fuses the two into one task)."""
        runner = listing.Runner(True)
        blocks = [block if listing.is_block_ref(block) else runner.put(block) for block in self.blocks]
        counts = runner.row_counts(blocks)
        rows_per_block = max(rows_per_block, -(-sum(counts) // MAX_STREAM_BLOCKS))
        slices = [(block, start, min(rows_per_block, count - start))
                  for block, count in zip(blocks, counts) for start in range(0, count, rows_per_block)]
        # one block per read task: a larger block count would have Ray Data split each read's block further
        return ray.data.read_datasource(_Slices(slices), num_cpus=num_cpus, override_num_blocks=max(1, len(slices)))


MAX_STREAM_BLOCKS = 20_000  # read tasks the driver holds for the stream's input (a task costs it about a kilobyte)


class _Slices(ray.data.Datasource):
    """Slices of blocks in the object store, one read task each, that fetches its block (zero copy) and cuts its
    slice where it runs. The slices are not cut beforehand: Ray keeps a task's results under 100 KiB in the
    memory of their owner, the driver, so a run's whole to-do list would sit there until read. Nor by Ray Data's
    repartition: its task holds a CPU while its output waits, which on a small machine starves the read stage for
    good."""

    def __init__(self, slices: list[tuple[Any, int, int]]):
        self.slices = slices  # (block ref, first row, rows)

    def get_name(self) -> str:
        return "UnitsToDo"

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ray.data.ReadTask]:
        from ray.data.block import BlockMetadata

        return [ray.data.ReadTask(_slice_reader(block, start, rows),
                                  BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=None))
                for block, start, rows in self.slices]


def _slice_reader(block: Any, start: int, rows: int) -> Callable[[], list[pa.Table]]:
    def read_slice() -> list[pa.Table]:
        return [ray.get(block).slice(start, rows)]

    return read_slice


@dataclass
class Plan:
    spec: RunSpec
    todo: Rows  # images and segments (TODO_SCHEMA)
    skipped: Rows  # source keys of inputs already done (no rows: counted)
    rejected: Rows  # failed rows decided at planning
    clips: dict[str, Clip] = field(default_factory=dict)  # source key -> clip being made in this run
    stale_staging: list[str] = field(default_factory=list)  # staged files of clips already committed, stale indexes
    video_indexing: video_index.IndexStats | None = None  # how the videos were indexed (tasks, kept indexes, time)
    prompt_uses: Counter = field(default_factory=Counter)  # the units to do per prompt text (None: to caption)
    todo_images: int = 0  # photos among the units to do (the progress display's counts)
    todo_frames: int = 0  # output frames of the segments to do

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint


def load_prompts(inputs: InputSpec) -> dict[str, str]:
    """Per-source prompts from ``upscale.prompts_uri`` (Parquet or CSV with columns ``source`` and ``prompt``)."""
    uri = inputs.prompts_uri
    if not uri:
        return {}
    location = Location(uri.rsplit("/", 1)[0] or ".", inputs.location.storage_options)
    data = location.read(uri.rsplit("/", 1)[1])
    reader = pq.read_table if uri.lower().endswith((".parquet", ".pq")) else pacsv.read_csv
    table = reader(io.BytesIO(data))
    missing = {"source", "prompt"} - set(table.column_names)
    if missing:
        raise ConfigError(f"upscale.prompts_uri {uri!r} lacks column(s) {sorted(missing)}; it needs source, prompt")
    return {str(s): str(p or "") for s, p in zip(table["source"].to_pylist(), table["prompt"].to_pylist())}


def input_blocks(inputs: InputSpec, *, in_tasks: bool) -> list[listing.Block]:
    """The input's files as entry blocks: from its S3 Inventory report where ``input.inventory`` names one, else
    listed (in parallel Ray tasks when Ray is up)."""
    source = inputs.location
    globs = {"include": list(inputs.include), "exclude": list(inputs.exclude), "case_sensitive": inputs.case_sensitive}
    if inputs.inventory:
        return listing.inventory_blocks(inputs.inventory, source, **globs, in_tasks=in_tasks)
    return listing.list_blocks(source, **globs, in_tasks=in_tasks)


# -- planning as distributed work ------------------------------------------------------------------------------------
# The listing (or inventory), the unit state and the output listing are each split into buckets by a key that keeps
# together everything one decision needs: a photo's key without its extension (so inputs that would write the same
# output meet, and meet their outputs and earlier rows), or the folder of a frame sequence. Each bucket is planned
# by a task of its own; what it decides stays in the object store as blocks. Videos, their rows and staged segments
# go to the driver, which indexes them in Ray tasks (pipeline.video_index): their number, not the catalog's, bounds it.
ROWS_PER_BUCKET = 100_000
TODO_SCHEMA = manifest.SCHEMA.append(pa.field("task", pa.binary()))
_DRIVER = -1  # bucket of the rows that go to the driver


_STEM = r"([^/])\.[^./]+$"  # a key's extension, as media.key_suffix finds it (the dot not a name's first character)


def _video_pattern() -> str:
    return r"[^/]\.(" + "|".join(re.escape(extension[1:]) for extension in sorted(media.VIDEO_EXTENSIONS)) + ")$"


def bucket_keys(keys: pa.ChunkedArray, in_sequence_folder: Callable[[str], bool] | None) -> pa.ChunkedArray:
    """What decides each key's bucket: its folder in a sequence folder (its frames, their outputs and rows share
    it), else the key without its extension (an input, its output under any extension, its rows). Vectorised:
    planning splits millions of keys."""
    stems = pc.replace_substring_regex(keys, _STEM, r"\1")
    if in_sequence_folder is None:
        return stems
    folders = pc.replace_substring_regex(keys, r"(^|/)[^/]*$", "")
    sequence_folders = [folder for folder in pc.unique(folders).to_pylist() if in_sequence_folder(folder)]
    if not sequence_folders:
        return stems
    in_sequence = pc.is_in(folders, value_set=pa.array(sequence_folders, pa.string()))
    return pc.if_else(in_sequence, pc.binary_join_element_wise(folders, "/", ""), stems)


def split_block(table: pa.Table, kind: str, buckets: int, sequence_folders: list[str]
                ) -> tuple[listing.Buckets, pa.Table]:
    """Task: one block's rows by bucket, and the rows that go to the driver (videos, their rows, staged segments).
    ``kind``: inputs and outputs (entries), or state (unit rows). Video outputs go both ways: a frame sequence's
    movie is one too."""
    keys = table["source_key" if kind == "state" else "relative"]
    staged = pc.starts_with(keys, STAGING_DIR + "/").to_numpy() if kind == "outputs" else np.zeros(len(keys), bool)
    to_driver = staged | pc.match_substring_regex(keys, _video_pattern(), ignore_case=True).to_numpy()
    in_sequence_folder = glob_matcher(sequence_folders) if sequence_folders else None
    hashes = np.fromiter((zlib.crc32(key.encode()) for key in bucket_keys(keys, in_sequence_folder).to_pylist()),
                         np.int64, len(keys))
    only_to_driver = staged if kind == "outputs" else to_driver
    ids = np.where(only_to_driver, _DRIVER, hashes % buckets)
    return listing.Buckets.split(table, ids, buckets), table.filter(to_driver)


def _prompt_uses(todo: list[dict[str, Any]]) -> Counter:
    """Units per prompt; photos still to caption count under None (a clip's segments share the clip's caption)."""
    return Counter(row["prompt"] for row in todo if row["prompt"] is not None or row["unit"] == "image")


def _images(todo: list[dict[str, Any]]) -> int:
    return sum(row["unit"] == "image" for row in todo)


def _frames(todo: list[dict[str, Any]], clips: dict[str, Clip]) -> int:
    """Output frames of the segments to do (at field rate two per source frame)."""
    total = 0
    for row in todo:
        if row["unit"] == "segment":
            clip = clips[row["source_key"]]
            per_frame = clip.index.frames // clip.row["frames_in"] if clip.index and clip.row["frames_in"] else 1
            total += (row["frame_stop"] - row["frame_start"]) * per_frame
    return total


@dataclass(frozen=True)
class _Context:
    spec: RunSpec
    dry_run: bool


def _entries(tables: list[pa.Table]) -> Iterator[Entry]:
    """Listing entries from blocks, column by column (a dict per row costs seconds per million)."""
    for table in tables:
        yield from map(Entry, *(table[name].to_pylist() for name in ("relative", "size", "identity")))


def _todo_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([{name: row.get(name) for name in TODO_SCHEMA.names} for row in rows],
                                schema=TODO_SCHEMA)


def plan_bucket(context: _Context, prompts: dict[str, str], counts: tuple[int, int], number: int,
                *splits: listing.Buckets) -> tuple[pa.Table, pa.Table, pa.Table, dict[str, Any]]:
    """Task: plan bucket ``number`` — its photos and frame sequences — from its part of the splits of the inputs,
    the units' rows and the outputs (``counts`` of the first two kinds, the rest outputs). Returns the units to
    do, the keys skipped, the rejected rows, and what the driver needs: clips, prompts, counts."""
    tables = [split.part(number) for split in splits]
    inputs, done, outputs = tables[:counts[0]], tables[counts[0]:counts[0] + counts[1]], tables[sum(counts):]
    existing = {entry.relative: entry for entry in _entries(outputs)}
    planner = Planner(context.spec, state.LatestRows(state.latest_per_unit(list(done))), existing,
                       prompts, dry_run=context.dry_run)
    entries = list(_entries(inputs))
    images, videos, sequences = group_inputs(sorted(entries, key=lambda entry: entry.relative),
                                             list(context.spec.video.sequence_folders))
    assert not videos, "videos are planned by the driver"
    for entry in images:
        planner.add_image(entry)
    for sequence in sequences:
        planner.add_sequence(sequence)
    planned = planner.plan
    side = {"clips": planned.clips, "stale_staging": planned.stale_staging, "todo": len(planned.todo),
            "skipped": len(planned.skipped), "rejected": len(planned.rejected),
            "prompts": _prompt_uses(planned.todo), "images": _images(planned.todo),
            "frames": _frames(planned.todo, planned.clips)}
    return (_todo_table(planned.todo), pa.table({"source_key": pa.array(planned.skipped, pa.string())}),
            manifest.to_table(planned.rejected), side)


def make_plan(spec: RunSpec, *, dry_run: bool = False, in_tasks: bool | None = None) -> Plan:
    """The run's plan, made as distributed work where Ray is up (``in_tasks`` None: whenever Ray is initialised):
    listing/inventory, unit state and output listing are split into buckets, each planned by a Ray task; the
    driver plans only videos (indexed in Ray tasks) and keeps refs, counts and clips. A dry run writes nothing."""
    in_tasks = ray.is_initialized() if in_tasks is None else in_tasks
    runner = listing.Runner(in_tasks)
    output = spec.output.location
    check_output_outside_input(spec.input, output)
    prompts = load_prompts(spec.input)
    sources = {"inputs": input_blocks(spec.input, in_tasks=in_tasks),
               "state": state.done_blocks(output, in_tasks=in_tasks),
               "outputs": listing.list_blocks(output, exclude=[f"{manifest.MANIFEST_DIR}/**"], in_tasks=in_tasks)}
    sizes = {kind: runner.rows(blocks) for kind, blocks in sources.items()}
    buckets = max(1, -(-max(sizes.values()) // ROWS_PER_BUCKET))
    split = {kind: [runner.submit(split_block, block, kind, buckets, list(spec.video.sequence_folders),
                                  num_returns=2) for block in blocks]
             for kind, blocks in sources.items()}
    del sources  # each block is dropped once split
    context, prompts_ref = runner.put(_Context(spec, dry_run)), runner.put(prompts)
    splits = [buckets_of for kind in ("inputs", "state", "outputs") for buckets_of, _ in split[kind]]
    results = [runner.submit(plan_bucket, context, prompts_ref, (len(split["inputs"]), len(split["state"])), number,
                             *splits, num_returns=4) for number in range(buckets)]
    del splits
    to_driver = {kind: [runner.get(driver_rows) for _, driver_rows in split[kind]] for kind in split}
    del split
    videos = list(_entries(to_driver["inputs"]))
    planner = Planner(spec, state.LatestRows(state.latest_per_unit(to_driver["state"])),
                       {entry.relative: entry for entry in _entries(to_driver["outputs"])},
                       prompts, dry_run=dry_run, in_tasks=in_tasks)
    planner.add_videos(sorted(videos, key=lambda entry: entry.relative))
    stats = planner.plan.video_indexing
    if stats and stats.videos:
        log.info("indexed %d video(s) in %.1f s (%s): %d read, %d kept indexes reused, %d failed", stats.videos,
                 stats.seconds, f"{stats.tasks} Ray tasks" if stats.tasks else "on the driver", stats.indexed,
                 stats.cached, stats.failed)
    planner.sweep_orphaned_staging(videos)
    planned = planner.plan
    planned.stale_staging += video_index.stale_entries(output, [video_source(entry) for entry in videos])

    # Video segments first: a film's long tail of work starts while photos keep the other actors busy.
    plan = Plan(spec=spec, todo=Rows([runner.put(_todo_table(planned.todo))] if planned.todo else [],
                                     len(planned.todo)),
                skipped=Rows([pa.table({"source_key": pa.array(planned.skipped, pa.string())})], len(planned.skipped),
                             "source_key"),
                rejected=Rows([runner.put(manifest.to_table(planned.rejected))] if planned.rejected else [],
                              len(planned.rejected)),
                clips=dict(planned.clips), stale_staging=planned.stale_staging,
                video_indexing=planned.video_indexing, prompt_uses=_prompt_uses(planned.todo),
                todo_images=_images(planned.todo), todo_frames=_frames(planned.todo, planned.clips))
    for todo_block, skipped_block, rejected_block, side in results:
        side = runner.get(side)
        for rows, block, number in ((plan.todo, todo_block, side["todo"]), (plan.skipped, skipped_block,
                                     side["skipped"]), (plan.rejected, rejected_block, side["rejected"])):
            if number:
                rows.blocks.append(block)
                rows.count += number
        plan.clips.update(side["clips"])
        plan.stale_staging += side["stale_staging"]
        plan.prompt_uses.update(side["prompts"])
        plan.todo_images += side["images"]
        plan.todo_frames += side["frames"]
    log.info("planned %d bucket(s) of up to %d inputs, %d unit rows, %d outputs (%s)", buckets, sizes["inputs"],
             sizes["state"], sizes["outputs"], "Ray tasks" if in_tasks else "on the driver")
    return plan


# -- dry run -------------------------------------------------------------------------------------------------------
def estimate(plan: Plan, threads: int = 16) -> dict[str, Any]:
    """Dry-run cost: read only image headers of pending photos (clips were indexed while planning), count sampler
    tiles x steps, per frame for clips."""
    source = plan.spec.input.location
    steps = plan.spec.steps_per_tile

    def frame_size(row: dict[str, Any]) -> tuple[int, int]:
        if row["unit"] == "image":
            with source.fs.open(source.path(row["source_key"]), "rb", block_size=1 << 16) as handle:
                return Image.open(handle).size
        if row["unit"] == "segment" and pickle.loads(row["task"])["kind"] == "sequence":
            with source.fs.open(source.path(pickle.loads(row["task"])["frames"][0]), "rb",
                                block_size=1 << 16) as handle:
                return Image.open(handle).size
        return row["width"], row["height"]

    def probe(row: dict[str, Any]) -> dict[str, Any]:
        frames = row["frames_in"] or 1
        try:
            width, height = frame_size(row)
            tiles = tiles_per_frame(plan.spec, width, height)
        except Exception as exc:  # noqa: BLE001 - a dry run reports unreadable headers instead of failing
            return {"key": row["unit_key"], "width": None, "height": None, "tiles": None, "frames": frames,
                    "note": f"unreadable: {type(exc).__name__}: {exc}"}
        return {"key": row["unit_key"], "width": width, "height": height, "tiles": tiles * frames, "frames": frames}

    with ThreadPoolExecutor(threads) as pool:
        probes = list(pool.map(probe, plan.todo))
    tiles = sum(p["tiles"] or 0 for p in probes)
    return {"items": probes, "tiles": tiles, "steps": steps, "tile_steps": tiles * steps,
            "unknown": sum(p["tiles"] is None for p in probes)}
