"""Files the library reads and writes: local copies of remote model folders (the node's model cache), and atomic
writes (which the catalog uses too)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from typing import Any

import fsspec
from filelock import FileLock


def cache_dir() -> str:
    return os.environ.get("DIT4SR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dit4sr"))


def local_copy(location: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """Return a local folder holding ``location[/subfolder]``.

    Local paths are used in place. Remote folders are copied once per machine into the cache (``cache_dir()``,
    node-local), keyed by URL and by the remote files' identities (so a re-uploaded model is fetched again). A
    file lock per copy makes the processes of one machine (e.g. the upscaling actors of one Ray node, starting
    together) download it once: the first downloads, the others wait and then use its copy. The copy becomes
    visible only when complete, so an interrupted download is never mistaken for a model.
    """
    fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
    if subfolder:
        path = f"{path.rstrip('/')}/{subfolder}"
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return path
    listing = fs.find(path, detail=True)
    if not listing:
        raise FileNotFoundError(f"nothing found at {location}{'/' + subfolder if subfolder else ''}")
    identity = sorted((name, info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("mtime")))
                      for name, info in listing.items())
    key = hashlib.sha256(repr((fs.protocol, path, identity)).encode()).hexdigest()[:32]
    target = os.path.join(cache_dir(), key)
    if os.path.isdir(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with FileLock(os.path.join(cache_dir(), f".{key}.lock")):
        if os.path.isdir(target):  # another process finished the copy while this one waited
            return target
        staging = tempfile.mkdtemp(dir=cache_dir(), prefix=".partial-")
        try:
            for name in listing:
                relative = name[len(path):].lstrip("/")
                destination = os.path.join(staging, relative)
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                fs.get_file(name, destination)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# Temp files of interrupted local writes: hidden, beside their target, recognisable by this suffix.
TEMP_SUFFIX = ".tmp"


def temp_name(target_name: str) -> str:
    return f".{target_name}.{uuid.uuid4().hex}{TEMP_SUFFIX}"


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, exclusive: bool = False,
                 **put_options: Any) -> None:
    """Write so that readers see the old object or the whole new one, never a part of it.

    Local disks: a hidden temp file in the same folder, fsync, then rename — or, ``exclusive``, a hard link, which
    raises ``FileExistsError`` where ``path`` exists. Object stores: a single PUT (multipart uploads, which some
    backends use for big objects, also become visible only on completion); ``exclusive`` is a conditional PUT.
    """
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        fs.pipe_file(path, data, **({"mode": "create"} if exclusive else {}), **put_options)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, temp_name(os.path.basename(path)))
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        (os.link if exclusive else os.replace)(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
