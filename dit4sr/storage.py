"""Resolve model locations given as local paths or fsspec URLs (``s3://``, ``gs://``, ...) to local folders."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

import fsspec


def cache_dir() -> str:
    return os.environ.get("DIT4SR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dit4sr"))


def local_copy(location: str, subfolder: str | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """Return a local folder holding ``location[/subfolder]``.

    Local paths are used in place. Remote folders are copied once into the cache, keyed by URL and by
    the remote files' identities (so a re-uploaded model is fetched again); the copy becomes visible
    only when complete, so an interrupted download is never mistaken for a model.
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
    staging = tempfile.mkdtemp(dir=cache_dir(), prefix=".partial-")
    try:
        for name in listing:
            relative = name[len(path):].lstrip("/")
            destination = os.path.join(staging, relative)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            fs.get_file(name, destination)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(target):  # another process may have won the race
            raise
    return target
