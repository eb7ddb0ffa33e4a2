"""Listing at catalog scale: a prefix listed in parallel (Ray tasks fanned out over common prefixes), or an S3
Inventory report read instead of listing.

Both give *entry blocks*: Arrow tables of ``ENTRY_SCHEMA`` (relative key, size, ETag/mtime identity — what
``storage.Location.list`` gives as ``Entry``). With Ray up each block is an object ref made by the task that listed
or read it, so the catalog lives in the object store and the driver holds one ref per block; without Ray (dry runs,
tools) blocks are plain tables made here.
"""

from __future__ import annotations

import datetime as dt
import functools
import gzip
import io
import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .config import ConfigError
from .storage import Location, glob_matcher, identity, with_retries

log = logging.getLogger("pipeline")

ENTRY_SCHEMA = pa.schema([("relative", pa.string()), ("size", pa.int64()), ("identity", pa.string())])
Block = Union[pa.Table, "ray.ObjectRef"]  # noqa: F821 - a table, or a ref to one in Ray's object store

LIST_TASKS = 64  # prefixes the fan-out aims for (and listing tasks at most at once)
FAN_OUT_LEVELS = 3  # delimiter listings at most before each prefix is listed whole
LIST_TASK_CPUS = 0.5  # listing waits on the store more than on the CPU


def is_block_ref(block: Any) -> bool:
    return not isinstance(block, pa.Table)


def fetch(block: Block) -> pa.Table:
    if isinstance(block, pa.Table):
        return block
    import ray

    return ray.get(block)


def rows(blocks: list[Block]) -> Iterator[dict[str, Any]]:
    """Every row of the blocks, one block in memory at a time."""
    for block in blocks:
        yield from fetch(block).to_pylist()


def count(blocks: list[Block]) -> int:
    return sum(fetch(block).num_rows for block in blocks)


def _rows_in(block: pa.Table) -> int:
    return block.num_rows


@dataclass(frozen=True)
class Buckets:
    """A block's rows sorted by bucket, as one object: the tasks that merge bucket ``n`` of many blocks each take
    ``part(n)`` of every one (a zero-copy slice of the object store's copy). One object per block, not one per
    block and bucket: Ray keeps a task's results under 100 KiB in the memory of their owner, the driver, so
    thousands of small parts would pile up there."""

    table: pa.Table
    bounds: np.ndarray  # part n is rows bounds[n]:bounds[n + 1]; rows of a negative bucket id come first, in none

    @classmethod
    def split(cls, table: pa.Table, ids: np.ndarray, buckets: int) -> "Buckets":
        order = np.argsort(ids, kind="stable")
        return cls(table.take(order), np.searchsorted(ids[order], np.arange(buckets + 1)))

    def part(self, number: int) -> pa.Table:
        start, stop = int(self.bounds[number]), int(self.bounds[number + 1])
        return self.table.slice(start, stop - start)


@functools.cache
def remote(function: Callable[..., Any]) -> Any:
    """``function`` as a Ray remote function, made once: each new one is exported to the cluster again."""
    import ray

    return ray.remote(function)


class Runner:
    """Runs a function as a Ray task, its results left in the object store (``in_tasks``), or here."""

    def __init__(self, in_tasks: bool):
        self.in_tasks = in_tasks

    def submit(self, function: Callable[..., Any], *args: Any, num_returns: int = 1, num_cpus: float = 1) -> Any:
        if not self.in_tasks:
            return function(*args)
        return remote(function).options(num_returns=num_returns, num_cpus=num_cpus).remote(*args)

    def get(self, value: Any) -> Any:
        if not self.in_tasks:
            return value
        import ray

        return ray.get(value)

    def put(self, value: Any) -> Any:
        if not self.in_tasks:
            return value
        import ray

        return ray.put(value)

    def row_counts(self, blocks: list[Block]) -> list[int]:
        """Each block's rows, counted where it is."""
        return self.get([self.submit(_rows_in, block, num_cpus=0) for block in blocks])

    def rows(self, blocks: list[Block]) -> int:
        return sum(self.row_counts(blocks))


def _entry_table(entries: list[tuple[str, int, str]]) -> pa.Table:
    relative, size, ident = zip(*entries) if entries else ((), (), ())
    return pa.table([pa.array(relative, pa.string()), pa.array(size, pa.int64()), pa.array(ident, pa.string())],
                    schema=ENTRY_SCHEMA)


def _filter(include: list[str] | None, exclude: list[str] | None, case_sensitive: bool = True
            ) -> Callable[[str], bool]:
    included = glob_matcher(include or ["**"], case_sensitive=case_sensitive)
    excluded = glob_matcher(exclude or [], case_sensitive=case_sensitive)
    if not exclude and list(include or ["**"]) == ["**"]:
        return lambda relative: True
    return lambda relative: included(relative) and not excluded(relative)


def _pruned(exclude: list[str] | None, case_sensitive: bool = True) -> Callable[[str], bool]:
    """Folders that ``exclude`` removes whole (patterns ``<folder glob>/**``): never listed."""
    return glob_matcher([pattern[:-3] for pattern in exclude or [] if pattern.endswith("/**")],
                        case_sensitive=case_sensitive)


# -- parallel listing ------------------------------------------------------------------------------------------------
def _relative(location: Location, name: str) -> str:
    return name[len(location.root):].lstrip("/")


def list_level(location: Location, prefixes: list[str], include: list[str] | None, exclude: list[str] | None,
               case_sensitive: bool = True) -> tuple[pa.Table, list[str]]:
    """Task: one delimiter listing of each prefix — its files (filtered) and its sub-prefixes (minus pruned ones)."""
    keep, pruned = _filter(include, exclude, case_sensitive), _pruned(exclude, case_sensitive)
    files, folders = [], []
    for prefix in prefixes:
        path = f"{location.root}/{prefix}" if prefix else location.root
        location.fs.invalidate_cache(path)
        try:
            infos = with_retries(lambda: location.fs.ls(path, detail=True))
        except FileNotFoundError:  # removed while listing
            continue
        for info in infos:
            relative = _relative(location, info["name"])
            if not relative or relative == prefix:
                continue
            if info.get("type") == "directory":
                if not pruned(relative):
                    folders.append(relative)
            elif keep(relative):
                files.append((relative, int(info.get("size") or 0), identity(info)))
    return _entry_table(files), folders


def list_tree(location: Location, prefixes: list[str], include: list[str] | None, exclude: list[str] | None,
              case_sensitive: bool = True) -> pa.Table:
    """Task: every file below each prefix (one flat listing each: ListObjectsV2 pages without a delimiter)."""
    keep = _filter(include, exclude, case_sensitive)  # drops what pruning would have (pruning only saves listing calls)
    files = []
    for prefix in prefixes:
        path = f"{location.root}/{prefix}"
        location.fs.invalidate_cache(path)
        found = with_retries(lambda: location.fs.find(path, detail=True))
        for name, info in found.items():
            relative = _relative(location, name)
            if info.get("type") != "directory" and keep(relative):
                files.append((relative, int(info.get("size") or 0), identity(info)))
    return _entry_table(files)


def _groups(items: list[str], count: int) -> list[list[str]]:
    size = max(1, -(-len(items) // count))
    return [items[start:start + size] for start in range(0, len(items), size)]


def list_blocks(location: Location, include: list[str] | None = None, exclude: list[str] | None = None, *,
                in_tasks: bool, case_sensitive: bool = True) -> list[Block]:
    """The files under ``location`` (include/exclude globs applied) as entry blocks. In Ray tasks
    (``in_tasks``): a few delimiter listings fan out over common prefixes until about ``LIST_TASKS`` of them are
    known, then each group of prefixes is listed whole in a task of its own; the driver only sees folder names.
    Without Ray: one listing here."""
    location.fs.invalidate_cache(location.root)
    if not with_retries(lambda: location.fs.exists(location.root)):
        return []
    if not in_tasks:
        entries = location.list(include, exclude, case_sensitive=case_sensitive)
        return [_entry_table([(e.relative, e.size, e.identity) for e in entries])]
    import ray

    level = remote(list_level).options(num_cpus=LIST_TASK_CPUS, num_returns=2)
    tree = remote(list_tree).options(num_cpus=LIST_TASK_CPUS)
    blocks: list[Block] = []
    pending, depth = [""], 0
    while pending and len(pending) < LIST_TASKS and depth < FAN_OUT_LEVELS:
        refs = [level.remote(location, group, include, exclude, case_sensitive)
                for group in _groups(pending, LIST_TASKS)]
        blocks += [files for files, _ in refs]
        pending = [folder for _, folders in refs for folder in ray.get(folders)]
        depth += 1
    blocks += [tree.remote(location, group, include, exclude, case_sensitive)
               for group in _groups(pending, LIST_TASKS)]
    return blocks


# -- S3 Inventory ----------------------------------------------------------------------------------------------------
# CSV inventories name their columns in the manifest's fileSchema ("Bucket, Key, Size, ..."); Parquet ones use these.
_CSV_NAMES = {"Bucket": "bucket", "Key": "key", "VersionId": "version_id", "IsLatest": "is_latest",
              "IsDeleteMarker": "is_delete_marker", "Size": "size", "LastModifiedDate": "last_modified_date",
              "ETag": "e_tag"}
_NEEDED = ("bucket", "key", "size", "e_tag")
_FORMATS = ("CSV", "Parquet")


@dataclass(frozen=True)
class Inventory:
    """One S3 Inventory report: its manifest.json and the data files it names."""

    manifest_uri: str
    source_bucket: str
    file_format: str  # CSV | Parquet
    columns: tuple[str, ...]  # the data files' columns (snake_case, as Parquet inventories name them)
    files: tuple[str, ...]  # URIs of the data files
    created: dt.datetime | None

    @property
    def versioned(self) -> bool:
        return "is_latest" in self.columns


def _split(uri: str) -> tuple[str, str]:
    folder, _, name = uri.rstrip("/").rpartition("/")
    return folder, name


def find_manifest(uri: str, storage_options: dict[str, Any]) -> str:
    """``uri`` itself when it names a manifest.json; else ``uri`` is an inventory configuration's folder
    (``<destination prefix>/<source bucket>/<config id>/``) and its newest report's manifest is returned."""
    if uri.endswith(".json"):
        return uri
    location = Location(uri.rstrip("/"), storage_options)
    reports = sorted(entry.relative for entry in location.list(include=["*/manifest.json"]))
    if not reports:
        raise ConfigError(f"input.inventory {uri!r}: no <date>/manifest.json below it (point it at an inventory "
                          "report's manifest.json or at its configuration's folder)")
    return location.url(reports[-1])  # report folders are named by their UTC start time: YYYY-MM-DDTHH-MMZ


def read_manifest(uri: str, storage_options: dict[str, Any]) -> Inventory:
    """Parse an S3 Inventory manifest.json (its data files' format, columns and locations)."""
    uri = find_manifest(uri, storage_options)
    folder, name = _split(uri)
    try:
        manifest = json.loads(Location(folder, storage_options).read(name))
    except FileNotFoundError:
        raise ConfigError(f"input.inventory: no inventory manifest at {uri}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"input.inventory: {uri} is not an S3 Inventory manifest.json: {exc}") from None
    file_format = manifest.get("fileFormat")
    if file_format not in _FORMATS:
        raise ConfigError(f"input.inventory: {uri} is a {file_format!r} inventory; configure the inventory as CSV "
                          "or Parquet")
    if file_format == "CSV":
        columns = tuple(_CSV_NAMES.get(name.strip(), name.strip()) for name in manifest["fileSchema"].split(","))
    else:  # "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); ..."
        body = manifest["fileSchema"].partition("{")[2].rpartition("}")[0]
        columns = tuple(field.split("(")[0].split()[-1] for field in body.split(";") if field.strip())
    missing = [name for name in _NEEDED if name not in columns]
    if missing:
        raise ConfigError(f"input.inventory: {uri} lacks the field(s) {', '.join(missing)}; add Size and ETag to "
                          "the inventory configuration's optional fields")
    destination = str(manifest.get("destinationBucket", "")).removeprefix("arn:aws:s3:::")
    if uri.startswith(("s3://", "s3a://")) and destination:
        files = tuple(f"s3://{destination}/{item['key']}" for item in manifest["files"])
    else:  # a copy of the report elsewhere keeps its layout: <config>/<date>/manifest.json beside <config>/data/
        config_root = _split(folder)[0]
        files = tuple(f"{config_root}/data/{item['key'].rpartition('/data/')[2]}" for item in manifest["files"])
    created = manifest.get("creationTimestamp")
    return Inventory(uri, manifest["sourceBucket"], file_format, columns, files,
                     dt.datetime.fromtimestamp(int(created) / 1000, dt.timezone.utc) if created else None)


def read_inventory_file(inventory: Inventory, uri: str, storage_options: dict[str, Any], prefix: str,
                        include: list[str] | None, exclude: list[str] | None, case_sensitive: bool = True
                        ) -> pa.Table:
    """Task: one inventory data file's objects under ``prefix`` (the input's path in its bucket) as entries:
    current versions only, keys URL-decoded (CSV inventories encode them), globs applied."""
    folder, name = _split(uri)
    data = Location(folder, storage_options).read(name)
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    if inventory.file_format == "CSV":
        table = pacsv.read_csv(io.BytesIO(data), read_options=pacsv.ReadOptions(column_names=list(inventory.columns)),
                               convert_options=pacsv.ConvertOptions(
                                   column_types={column: pa.string() for column in inventory.columns}))
    else:
        table = pq.read_table(io.BytesIO(data))
    table = table.filter(pc.equal(table["bucket"], inventory.source_bucket))
    for column, keep in (("is_latest", "true"), ("is_delete_marker", "false")):
        if column in table.column_names:  # versioned inventories: the current version, no delete markers
            flags = pc.utf8_lower(pc.cast(table[column], pa.string()))
            table = table.filter(pc.fill_null(pc.equal(flags, keep), keep == "true"))
    keys = table["key"].to_pylist()
    if inventory.file_format == "CSV":  # CSV inventories URL-encode keys (form encoding: a space is '+')
        keys = [urllib.parse.unquote_plus(key) if "%" in key or "+" in key else key for key in keys]
    start = len(prefix) + 1 if prefix else 0
    keep = _filter(include, exclude, case_sensitive)
    sizes = pc.cast(table["size"], pa.int64()).to_pylist()
    tags = table["e_tag"].to_pylist()
    entries = [(key[start:], size or 0, (tag or "").strip('"')) for key, size, tag in zip(keys, sizes, tags)
               if (not prefix or key.startswith(prefix + "/")) and not key.endswith("/") and keep(key[start:])]
    return _entry_table(entries)


def check_bucket(inventory: Inventory, source: Location) -> str:
    """The input's prefix in its bucket, once the inventory is known to list that bucket."""
    bucket, _, prefix = source.root.partition("/")
    if inventory.source_bucket != bucket:
        raise ConfigError(f"input.inventory {inventory.manifest_uri} lists bucket {inventory.source_bucket!r}, "
                          f"but input.uri {source.uri!r} is in bucket {bucket!r}")
    return prefix


def inventory_blocks(uri: str, source: Location, include: list[str] | None, exclude: list[str] | None, *,
                     in_tasks: bool, case_sensitive: bool = True) -> list[Block]:
    """The input's files from an S3 Inventory report (``input.inventory``) as entry blocks, one per data file,
    read in Ray tasks (``in_tasks``) or here."""
    inventory = read_manifest(uri, source.storage_options)
    prefix = check_bucket(inventory, source)
    age = f", made {inventory.created:%Y-%m-%d %H:%M} UTC" if inventory.created else ""
    log.info("planning from the S3 Inventory report %s (%s, %d data files%s) instead of listing %s",
             inventory.manifest_uri, inventory.file_format, len(inventory.files), age, source.uri)
    arguments = [(inventory, file, source.storage_options, prefix.strip("/"), include, exclude, case_sensitive)
                 for file in inventory.files]
    if not in_tasks:
        return [read_inventory_file(*args) for args in arguments]
    task = remote(read_inventory_file).options(num_cpus=1)
    return [task.remote(*args) for args in arguments]
