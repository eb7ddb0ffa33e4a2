"""Object storage through fsspec: listing with globs, safe output keys, atomic writes, retries with backoff."""

from __future__ import annotations

import errno
import logging
import mimetypes
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from dit4sr.files import temp_name, write_atomic

T = TypeVar("T")

log = logging.getLogger(__name__)

# S3 error codes / HTTP statuses worth retrying: throttling and server-side trouble, never "not found" or "denied".
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "BadGateway",
    "GatewayTimeout", "500", "502", "503", "504", "429",
}
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}


class UnsafeKeyError(ValueError):
    error_type = "unsafe_key"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from or during, once each."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def service_error(exc: BaseException) -> tuple[str, str]:
    """The (code, message) a storage service answered with, from anywhere in the exception's chain; ("", "")
    when no service answered (s3fs turns botocore's ClientError into an OSError raised from it)."""
    for current in _chain(exc):
        response = getattr(current, "response", None)
        if isinstance(response, dict) and response.get("Error"):
            return str(response["Error"].get("Code", "")), str(response["Error"].get("Message", ""))
    return "", ""


def _is_transient(exc: BaseException) -> bool:
    for current in _chain(exc):
        if isinstance(current, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(current, "response", None)  # botocore.exceptions.ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_CODES or status == 429 or status >= 500:
                return True
        if type(current).__module__.startswith(("aiohttp", "botocore")) and "Connection" in type(current).__name__:
            return True
    return False


def with_retries(operation: Callable[[], T], *, attempts: int = 6, base_delay: float = 0.2,
                 max_delay: float = 10.0) -> T:
    """Run ``operation``, retrying transient storage errors with exponential backoff and full jitter."""
    for attempt in range(attempts):
        try:
            return operation()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not transient
            if attempt == attempts - 1 or not _is_transient(exc):
                raise
            delay = random.uniform(0, min(max_delay, base_delay * 2 ** attempt))
            # One line per retry: throttling that the store's own client did not absorb shows in the logs.
            log.warning("storage: transient error (%s: %s); retry %d of %d in %.3f s", type(exc).__name__,
                        str(exc)[:200], attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _with_default_retries(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    if protocol in ("s3", "s3a"):
        options = dict(options)
        config_kwargs = dict(options.get("config_kwargs") or {})
        # botocore's adaptive mode backs off on throttling, 5xx and connection errors with client-side rate limiting.
        config_kwargs.setdefault("retries", {"max_attempts": 10, "mode": "adaptive"})
        options["config_kwargs"] = config_kwargs
    return options


def glob_matcher(patterns: list[str], *, case_sensitive: bool = True) -> Callable[[str], bool]:
    """Whether a relative key matches any of the globs (``**`` spans folders); ``case_sensitive=False`` lets
    ``*.jpg`` match ``IMG_0001.JPG`` too."""
    flags = 0 if case_sensitive else re.IGNORECASE
    compiled = [re.compile(glob_translate(pattern), flags) for pattern in patterns]
    return lambda path: any(regex.match(path) for regex in compiled)


def check_relative_key(relative: str) -> str:
    """Refuse keys that could address anything outside their root once joined to it."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or "\\" in relative or any(p in ("..", ".", "") for p in parts):
        raise UnsafeKeyError(f"key {relative!r} contains '..', '.', an empty segment or a backslash; refusing it "
                             "so that no output can escape output.uri")
    return relative


def identity(info: dict[str, Any]) -> str:
    """A string that changes whenever the object's content may have changed (ETag/generation, else mtime)."""
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            value = info[key]
            return repr(value) if isinstance(value, float) else str(value)
    return ""


@dataclass(frozen=True)
class Entry:
    relative: str
    size: int
    identity: str


@dataclass(frozen=True)
class Location:
    """A root (``uri``) on one filesystem. Picklable: workers rebuild the filesystem from uri + options."""

    uri: str
    storage_options: dict[str, Any]

    @cached_property
    def _fs_and_root(self) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = fsspec.core.split_protocol(self.uri)[0] or "file"
        fs, root = fsspec.core.url_to_fs(self.uri, **_with_default_retries(protocol, self.storage_options))
        return fs, root.rstrip("/")

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "uri", state["uri"])
        object.__setattr__(self, "storage_options", state["storage_options"])

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_and_root[0]

    @property
    def root(self) -> str:
        return self._fs_and_root[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, relative: str) -> str:
        return f"{self.root}/{check_relative_key(relative)}"

    def url(self, relative: str) -> str:
        return f"{self.uri.rstrip('/')}/{relative}"

    def contains(self, other: "Location") -> str | None:
        """The path of ``other`` relative to this root when it lies inside (or is) this root, else None."""
        if type(self.fs) is not type(other.fs):
            return None
        if other.root == self.root:
            return ""
        return other.root[len(self.root) + 1:] if other.root.startswith(self.root + "/") else None

    def list(self, include: list[str] | None = None, exclude: list[str] | None = None, *,
             case_sensitive: bool = True) -> list[Entry]:
        """Every file under the root (sorted by relative key), filtered by include/exclude globs."""
        self.fs.invalidate_cache(self.root)  # other processes write here: never answer from a cached listing
        if not with_retries(lambda: self.fs.exists(self.root)):
            return []
        found = with_retries(lambda: self.fs.find(self.root, detail=True))
        included = glob_matcher(include or ["**"], case_sensitive=case_sensitive)
        excluded = glob_matcher(exclude or [], case_sensitive=case_sensitive)
        entries = []
        for name, info in found.items():
            if info.get("type") == "directory":
                continue
            relative = name[len(self.root):].lstrip("/")
            if included(relative) and not excluded(relative):
                entries.append(Entry(relative, int(info.get("size") or 0), identity(info)))
        return sorted(entries, key=lambda entry: entry.relative)

    def read(self, relative: str) -> bytes:
        path = self.path(relative)
        return with_retries(lambda: self.fs.cat_file(path))

    def info(self, relative: str) -> dict[str, Any]:
        path = self.path(relative)
        return with_retries(lambda: self.fs.info(path))

    def remove(self, relative: str) -> None:
        path = self.path(relative)
        with_retries(lambda: self.fs.rm_file(path))

    def temp_path(self, relative: str) -> str:
        """A local path to build a large output in before ``commit_file``: beside the target on local disks (so
        the commit is a rename), in the system's temp folder otherwise."""
        path = self.path(relative)
        folder = os.path.dirname(path) if self.is_local else tempfile.gettempdir()
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, temp_name(os.path.basename(path)))

    def commit_file(self, relative: str, local_path: str) -> Entry:
        """Make a finished local file the object at ``relative`` atomically: a rename on local disks, an upload
        on object stores (multipart uploads become visible only when complete)."""
        path = self.path(relative)
        if self.is_local:
            os.replace(local_path, path)
        else:
            with_retries(lambda: self.fs.put_file(local_path, path))
            self.fs.invalidate_cache(path)
        info = self.info(relative)
        return Entry(relative, int(info["size"]), identity(info))

    def write_atomic(self, relative: str, data: bytes) -> Entry:
        """Write so that readers see the old object or the whole new one, never a part of it (see
        ``dit4sr.files.write_atomic``); returns the written object's entry."""
        path = self.path(relative)
        # S3: a Content-Type lets browsers and CDNs serve the output straight from the bucket.
        content_type = mimetypes.guess_type(path)[0] if "s3" in _protocols(self.fs) else None
        extra = {"ContentType": content_type} if content_type else {}
        with_retries(lambda: write_atomic(self.fs, path, data, **extra))
        self.fs.invalidate_cache(path)
        return Entry(relative, len(data), identity(self.info(relative)))
