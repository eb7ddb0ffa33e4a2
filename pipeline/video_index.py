"""Indexing a catalog's videos where the videos are, once per version of each file.

* **Ray tasks, not the driver**: each task reads its videos' headers and packets through fsspec with ranged reads
  (`video.index_video`: a demux, no decode but one frame) and returns the index; the driver only collects them.
  Small videos share a task (a few dozen per task, a few hundred MB at most), large ones get one each, spread over
  the cluster. Without Ray (dry runs) the same work runs in threads on the driver.
* **An unchanged source is not indexed twice**: each index is kept beside the unit state, under
  ``_manifests/_index/videos/<hash>.json.gz``, where the hash covers the source key, its size and ETag/mtime, the
  index's format and the PyAV (FFmpeg) version. A changed file hashes elsewhere and is indexed again; entries of
  files no longer listed, or changed, are swept at the start of the run (`stale_entries`). Entries are written
  atomically by the task that indexed the file (one PUT, or temp file + rename): a killed run leaves whole entries or
  none. Only successful indexes are kept: a failure is re-tried by the next run, as failed inputs are.
* **Limits from the headers**: `limits.max_video_seconds` goes into the task, so a film declared longer stops before
  its packets are read (`too_long`); a codec this FFmpeg cannot decode fails at the header too (`unsupported_codec`).
* **Errors stay per input**: a failed index becomes that video's failed row with its `error_type` (a decodable file
  is never `corrupt`; an unreadable one is `read_failed`, one deleted since listing `missing_source`). A task that
  dies (a crashing demuxer, memory) is retried by Ray; a batch that still fails is redone one video per task, so only
  the video that kills its task fails.
* **Decoded once**: clips whose GOP structure would make per-segment decoding quadratic (`mezzanine`) are decoded once
  per clip, in a Ray task each, and every segment's frames staged losslessly under the run's staging prefix
  (`stage_decoded_sources`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

import av

from media import MediaError, video
from media.video import mezzanine

from . import manifest
from .storage import Location

log = logging.getLogger("pipeline")

INDEX_DIR = f"{manifest.MANIFEST_DIR}/_index/videos"
CACHE_FORMAT = 1  # bump when an index of the same file should be made again (what index_video records changes)
VIDEOS_PER_TASK = 32  # at most; fewer when there are few videos for the cluster's CPUs
BYTES_PER_TASK = 256 << 20  # a task's videos add up to at most this (a larger video gets a task of its own)
TASKS_PER_CPU = 4  # enough tasks to keep every CPU busy while sizes vary
THREADS_PER_TASK = 4  # a task's videos are read this many at a time
_READ_BLOCK = 1 << 20  # ranged reads of this size; demuxing reads forward
DECODED_SUFFIX = ".decoded"  # staged decoded-once frames, beside a clip's staged segments


@dataclasses.dataclass(frozen=True)
class VideoSource:
    """A listed video: what the planner knows of it before opening it."""

    key: str
    size: int
    identity: str  # ETag or mtime


@dataclasses.dataclass(frozen=True)
class Failure:
    error_type: str
    message: str


@dataclasses.dataclass(frozen=True)
class Indexed:
    """One video's index (or why there is none), and whether it came from the kept indexes."""

    key: str
    index: video.VideoIndex | None
    failure: Failure | None = None
    cached: bool = False


def failure_of(exc: BaseException) -> Failure:
    """A failed index's error type: the media layer's classification, else from the exception's kind."""
    if isinstance(exc, MediaError) or getattr(exc, "error_type", None):
        error_type = exc.error_type
    elif isinstance(exc, FileNotFoundError):
        error_type = "missing_source"
    elif isinstance(exc, OSError):
        error_type = "read_failed"
    else:  # an error the media layer does not classify: not the file's fault as far as we know
        error_type = "decode_failed"
    return Failure(error_type, f"{type(exc).__name__}: {exc}"[:2000])


# -- the kept indexes ----------------------------------------------------------------------------------------------
def _fields_signature() -> str:
    return ",".join(field.name for field in dataclasses.fields(video.VideoIndex))


def cache_key(source: VideoSource) -> str:
    """Where the index of this version of the file is kept (under the output)."""
    identity = "\0".join([source.key, str(source.size), source.identity, str(CACHE_FORMAT), av.__version__,
                          _fields_signature()])
    return f"{INDEX_DIR}/{hashlib.sha256(identity.encode()).hexdigest()[:40]}.json.gz"


def _plain(value: Any) -> Any:
    if isinstance(value, Fraction):
        return {"fraction": [value.numerator, value.denominator]}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot keep a {type(value).__name__} in a video index entry")


def _typed(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"fraction"}:
        return Fraction(*value["fraction"])
    if isinstance(value, list):
        return tuple(_typed(item) for item in value)
    return value


def encode_entry(source: VideoSource, index: video.VideoIndex) -> bytes:
    fields = {field.name: _plain(getattr(index, field.name)) for field in dataclasses.fields(index)}
    entry = {"format": CACHE_FORMAT, "source": dataclasses.asdict(source), "index": fields}
    return gzip.compress(json.dumps(entry, separators=(",", ":")).encode(), mtime=0)


def decode_entry(data: bytes, source: VideoSource) -> video.VideoIndex | None:
    """The kept index, or None when the entry is not this version's (another file, format or field set)."""
    entry = json.loads(gzip.decompress(data))
    names = [field.name for field in dataclasses.fields(video.VideoIndex)]
    if entry.get("format") != CACHE_FORMAT or entry.get("source") != dataclasses.asdict(source) \
            or sorted(entry["index"]) != sorted(names):
        return None
    return video.VideoIndex(**{name: _typed(entry["index"][name]) for name in names})


def read_kept(output: Location, source: VideoSource) -> video.VideoIndex | None:
    try:
        return decode_entry(output.read(cache_key(source)), source)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - an unreadable entry costs an index, never the video
        log.warning("ignoring the kept index of %s (%s: %s): indexing it again", source.key, type(exc).__name__, exc)
        return None


def keep(output: Location, source: VideoSource, index: video.VideoIndex) -> None:
    try:
        output.write_atomic(cache_key(source), encode_entry(source, index))
    except Exception as exc:  # noqa: BLE001 - the next run indexes it again
        log.warning("could not keep the index of %s (%s: %s)", source.key, type(exc).__name__, exc)


def stale_entries(output: Location, listed: Sequence[VideoSource]) -> list[str]:
    """Kept indexes of files no longer listed, or of earlier versions of listed ones (keys under the output)."""
    wanted = {cache_key(source) for source in listed}
    folder = Location(output.url(INDEX_DIR), output.storage_options)
    return [key for key in (f"{INDEX_DIR}/{entry.relative}" for entry in folder.list(include=["*.json.gz"]))
            if key not in wanted]


# -- indexing ------------------------------------------------------------------------------------------------------
def index_one(source: Location, output: Location, video_source: VideoSource, max_seconds: float | None = None,
              *, write: bool = True) -> Indexed:
    """A video's index: the kept one for this version of the file, else read from the source (and kept)."""
    kept = read_kept(output, video_source)
    if kept is not None:
        return Indexed(video_source.key, kept, cached=True)
    try:
        with source.fs.open(source.path(video_source.key), "rb", block_size=_READ_BLOCK) as handle:
            index = video.index_video(handle, video_source.key, max_seconds=max_seconds)
    except Exception as exc:  # noqa: BLE001 - becomes this video's failed row
        return Indexed(video_source.key, None, failure_of(exc))
    if write:
        keep(output, video_source, index)
    return Indexed(video_source.key, index)


def index_batch(source: Location, output: Location, videos: Sequence[VideoSource], max_seconds: float | None,
                write: bool) -> list[Indexed]:
    """Ray task: index a few videos, THREADS_PER_TASK at a time (reading a bucket is mostly waiting)."""
    if len(videos) == 1:
        return [index_one(source, output, videos[0], max_seconds, write=write)]
    with ThreadPoolExecutor(min(THREADS_PER_TASK, len(videos))) as pool:
        return list(pool.map(lambda video_source: index_one(source, output, video_source, max_seconds, write=write),
                             videos))


def batches(videos: Sequence[VideoSource], cpus: int) -> list[list[VideoSource]]:
    """Consecutive groups of videos for one task each: about TASKS_PER_CPU tasks per CPU, at most VIDEOS_PER_TASK
    videos and BYTES_PER_TASK bytes per task (one larger video makes a task of its own)."""
    per_task = max(1, min(VIDEOS_PER_TASK, math.ceil(len(videos) / (TASKS_PER_CPU * max(1, cpus)))))
    groups: list[list[VideoSource]] = []
    size = 0
    for video_source in videos:
        if not groups or len(groups[-1]) >= per_task or size + video_source.size > BYTES_PER_TASK:
            groups.append([])
            size = 0
        groups[-1].append(video_source)
        size += video_source.size
    return groups


@dataclasses.dataclass
class IndexStats:
    videos: int = 0
    indexed: int = 0  # read from their sources
    cached: int = 0  # kept indexes of unchanged files
    failed: int = 0
    tasks: int = 0  # Ray tasks (0: indexed on the driver)
    seconds: float = 0.0


def index_videos(source: Location, output: Location, videos: Sequence[VideoSource], *, max_seconds: float | None,
                 in_tasks: bool, write: bool = True, threads: int = 8) -> tuple[dict[str, Indexed], IndexStats]:
    """Every video's index (or failure), by source key: in Ray tasks across the cluster (`in_tasks`), else in
    threads here. `write`: keep new indexes (not in dry runs)."""
    started = time.monotonic()
    stats = IndexStats(videos=len(videos))
    if not videos:
        return {}, stats
    if in_tasks:
        results, stats.tasks = _in_tasks(source, output, videos, max_seconds, write)
    else:
        with ThreadPoolExecutor(threads) as pool:  # I/O-bound: reading packets
            results = list(pool.map(lambda v: index_one(source, output, v, max_seconds, write=write), videos))
    for result in results:
        stats.cached += result.cached
        stats.failed += result.failure is not None
        stats.indexed += not result.cached and result.failure is None
    stats.seconds = time.monotonic() - started
    return {result.key: result for result in results}, stats


def _in_tasks(source: Location, output: Location, videos: Sequence[VideoSource], max_seconds: float | None,
              write: bool) -> tuple[list[Indexed], int]:
    import ray

    task = ray.remote(index_batch).options(num_cpus=1, scheduling_strategy="SPREAD")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    pending = {task.remote(source, output, group, max_seconds, write): group for group in batches(videos, cpus)}
    submitted = len(pending)
    results: list[Indexed] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        group = pending.pop(ready[0])
        try:
            results += ray.get(ready[0])
        except ray.exceptions.RayError as exc:  # the task died (after Ray's retries): find the video that kills it
            if len(group) > 1:
                for video_source in group:
                    pending[task.remote(source, output, [video_source], max_seconds, write)] = [video_source]
                submitted += len(group)
            else:
                out_of_memory = isinstance(exc, ray.exceptions.OutOfMemoryError)
                results.append(Indexed(group[0].key, None, Failure(
                    "out_of_memory" if out_of_memory else "decode_failed",
                    f"indexing failed in its task: {type(exc).__name__}: {exc}"[:2000])))
    return results, submitted


# -- decoded once --------------------------------------------------------------------------------------------------
def staged_source_key(prefix: str, segment: video.Segment, source: VideoSource) -> str:
    """Where a decoded-once segment's frames are staged: beside the clip's staged segments, named after the frames
    it holds and the version of the source they come from."""
    identity = "\0".join([source.key, str(source.size), source.identity, str(mezzanine.VERSION), av.__version__,
                          repr(segment.read_range), str(segment.deinterlace)])
    tag = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return f"{prefix}/{segment.start:09d}-{segment.stop:09d}.{tag}{DECODED_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class DecodedOnce:
    """One clip to decode once: its index and the segments to stage, each with its key under the output."""

    key: str
    index: video.VideoIndex
    segments: tuple[tuple[video.Segment, str], ...]


FALLBACK = Failure("packet_copy", "")  # FFV1 would not give the same pixels: the clip keeps the packet-copy path


def stage_decoded(source: Location, output: Location, job: DecodedOnce) -> Failure | None:
    """Ray task: decode one clip once and stage its segments' frames (None: all staged)."""
    keys = {segment.start: key for segment, key in job.segments}
    try:
        with source.fs.open(source.path(job.key), "rb", block_size=_READ_BLOCK) as handle:
            for segment, data in mezzanine.stage_decoded(handle, job.index, [s for s, _ in job.segments], job.key):
                try:
                    output.write_atomic(keys[segment.start], data)
                except Exception as exc:  # noqa: BLE001
                    return Failure("write_failed", f"staging frames {segment.start}-{segment.stop - 1}: "
                                                   f"{type(exc).__name__}: {exc}"[:2000])
    except mezzanine.NotLosslessError as exc:
        log.warning("%s: decoding each segment from its keyframe instead (%s)", job.key, exc)
        return FALLBACK
    except Exception as exc:  # noqa: BLE001 - this clip fails alone
        return failure_of(exc)
    return None


def stage_decoded_sources(source: Location, output: Location, jobs: Sequence[DecodedOnce], *, in_tasks: bool,
                          threads: int = 4) -> dict[str, Failure | None]:
    """Decode each clip once (a Ray task per clip, or threads here) and stage its segments; by source key, None
    where every segment was staged, else why not (`FALLBACK`: keep the packet-copy path)."""
    if not jobs:
        return {}
    if not in_tasks:
        with ThreadPoolExecutor(threads) as pool:
            return dict(zip((job.key for job in jobs), pool.map(lambda job: stage_decoded(source, output, job), jobs)))
    import ray

    task = ray.remote(stage_decoded).options(num_cpus=1, scheduling_strategy="SPREAD")
    refs = {job.key: task.remote(source, output, job) for job in jobs}
    results: dict[str, Failure | None] = {}
    for key, ref in refs.items():
        try:
            results[key] = ray.get(ref)
        except ray.exceptions.RayError as exc:
            results[key] = Failure("decode_failed", f"decoding once failed in its task: {type(exc).__name__}: {exc}"
                                   [:2000])
    return results
