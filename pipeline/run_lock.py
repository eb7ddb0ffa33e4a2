"""The run lock: a lease object under the output prefix, held by one run at a time.

Two runs over the same output (a nightly schedule whose previous run is still going) would plan the same inputs
and both commit them. So before planning, a run creates ``<output.uri>/_manifests/_lease.json`` with
create-if-absent semantics — a conditional PUT (``If-None-Match: *``) on S3, an exclusive create on local disks —
and renews it from a background thread every third of ``run.lock.ttl_s``. The lease names its holder and when
it expires. A second run that finds a live lease exits with EXIT_LOCKED, or waits up to ``run.lock.wait_s``.
A run that dies (SIGKILL, lost node) stops renewing; once its lease has expired the next run takes it over,
again atomically (``If-Match`` on the expired lease's ETag; on disks a compare-and-swap under a file lock), so
of several runs waiting for it exactly one gets it. A holder that is provably dead is taken over at once, without
waiting for expiry: one on this machine whose process is gone (same host name, boot and PID namespace, and no
process with its PID and start time), or one whose Ray job on this run's own Ray cluster has ended. Holders that
cannot be checked (another machine, another cluster) keep the TTL. ``break_lock`` (the job's ``--break-lock``)
takes over whatever holds it, for an operator who knows the holder is gone.

Expiry compares the wall clocks of the machines involved: keep ``ttl_s`` far above their skew.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from filelock import FileLock
from fsspec.asyn import sync

from dit4sr.files import write_atomic

from .config import ConfigError, LockConfig
from .manifest import MANIFEST_DIR
from .preflight import location_error
from .storage import Location, service_error, with_retries

log = logging.getLogger("pipeline")

LOCK_KEY = f"{MANIFEST_DIR}/_lease.json"  # the lock is held as a lease (it expires); runs of every version share it


class RunLocked(RuntimeError):
    """Another run holds the output's lease (and waiting, if configured, did not outlast it)."""


class LockLost(RuntimeError):
    """The lease changed since it was read: another run renewed, released or took it over."""


@dataclass(frozen=True)
class Held:
    """A lease as read from storage: its record and the version a conditional write must match."""

    record: dict[str, Any]
    version: str


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _machine() -> str | None:
    """This machine and PID namespace (Linux): PIDs are comparable only between processes that share both."""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot else None


def _process_started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if there is none:
    with the PID it names one process, whatever reuses the PID later."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[19] if stat else None


def _ray_job() -> dict[str, str]:
    """This process's Ray session and job, where it is connected to Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    return {"ray_session": context.get_session_name(), "ray_job_id": context.get_job_id()}


def dead_holder(record: dict[str, Any]) -> str | None:
    """Why the lease's holder is provably dead, or None when it is alive or cannot be checked from here."""
    pid, machine = record.get("pid"), _machine()
    if pid and machine and (record.get("host"), record.get("machine")) == (socket.gethostname(), machine):
        started = _process_started(int(pid))
        if started is None:
            return f"its process {pid} on this machine is gone"
        if started != record.get("process_started"):
            return f"its process {pid} on this machine is gone (the PID now belongs to another process)"
        return None
    session, job_id = record.get("ray_session"), record.get("ray_job_id")
    if session and job_id and _ray_job().get("ray_session") == session:
        # Ray's job table (GCS): a driver that died is marked dead by its raylet.
        from ray._private.state import jobs

        if any(job["JobID"] == job_id and job["IsDead"] for job in jobs()):
            return f"its Ray job {job_id} on this cluster has ended"
    return None


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


class _S3Store:
    """Conditional requests on S3 (and S3-compatible stores that implement them): the ETag is the version."""

    def __init__(self, location: Location):
        self.fs = location.fs
        self.path = location.path(LOCK_KEY)
        self.bucket, _, self.key = self.path.partition("/")

    def create(self, data: bytes) -> str:
        """FileExistsError when the object exists (s3fs maps the 412 of If-None-Match to it)."""
        return self._put(data, mode="create")

    def read(self) -> Held | None:
        async def get() -> tuple[bytes, str] | None:
            try:
                response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                return None
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        found = sync(self.fs.loop, get)
        return None if found is None else Held(_parse(found[0]), found[1])

    def swap(self, data: bytes, version: str) -> str:
        with _lost_when_changed():
            return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        with _lost_when_changed():
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        self.fs.invalidate_cache(self.path)

    def _put(self, data: bytes, **options: Any) -> str:
        response = self.fs.pipe_file(self.path, data, ContentType="application/json", **options)
        return response["ETag"]


@contextlib.contextmanager
def _lost_when_changed() -> Iterator[None]:
    """A conditional request refused (412 PreconditionFailed) or its object gone: the lease changed hands."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or service_error(exc)[0] == "PreconditionFailed":
            raise LockLost(str(exc)) from exc
        raise


class _LocalStore:
    """Local (and mounted) disks: an exclusive create (link of a complete temp file), and compare-and-swap of
    the whole record under an advisory file lock held for a few milliseconds. The version is the record's bytes.
    """

    def __init__(self, location: Location):
        self.fs = location.fs
        self.path = location.path(LOCK_KEY)
        self.directory = os.path.dirname(self.path)
        self.mutex = os.path.join(self.directory, "._lease.lock")

    def create(self, data: bytes) -> str:
        write_atomic(self.fs, self.path, data, exclusive=True)  # FileExistsError when a lease exists
        return data.decode()

    def read(self) -> Held | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return Held(_parse(data), data.decode())

    def swap(self, data: bytes, version: str) -> str:
        with FileLock(self.mutex):
            self._expect(version)
            write_atomic(self.fs, self.path, data)
        return data.decode()

    def delete(self, version: str) -> None:
        with FileLock(self.mutex):
            self._expect(version)
            os.unlink(self.path)

    def _expect(self, version: str) -> None:
        current = self.read()
        if current is None or current.version != version:
            raise LockLost(f"{self.path} changed since it was read")


def _parse(data: bytes) -> dict[str, Any]:
    """A lease's record; one that cannot be read (edited by hand, a foreign file) counts as long expired."""
    try:
        record = json.loads(data)
        record["expires_at"] = float(record["expires_at"])
        return record
    except (ValueError, KeyError, TypeError):
        return {"holder": "an unreadable lease", "token": None, "expires_at": 0.0}


def _store(location: Location) -> _S3Store | _LocalStore:
    if location.is_local:
        return _LocalStore(location)
    if hasattr(location.fs, "call_s3"):
        return _S3Store(location)
    raise ConfigError(
        f"run.lock: no atomic create-if-absent for {type(location.fs).__name__} ({location.uri}); "
        "set run.lock.enabled: false and make sure runs over this output never overlap")


class RunLock:
    """Context manager: acquires the output's lease (waiting up to ``wait_s``), renews it while the block runs,
    releases it at the end. Raises RunLocked when another run holds it."""

    def __init__(self, output: Location, config: LockConfig, *, break_lock: bool = False):
        self.output, self.config, self.break_lock = output, config, break_lock
        self.uri = output.url(LOCK_KEY)
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}/{os.getpid()}"
        self.acquired_at = time.time()
        self.lost = False
        self._held: Held | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)

    def __enter__(self) -> "RunLock":
        try:
            self._store = _store(self.output)
            self._acquire()
        except (RunLocked, ConfigError):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a missing output bucket: one line naming it
            raise location_error("output.uri", self.output.uri, exc) from exc
        self._renewer.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._renewer.join()
        if self.lost or self._held is None:
            return
        try:
            with_retries(lambda: self._store.delete(self._held.version))
        except LockLost:
            log.warning("run lock %s: changed by another run before release; left as it is", self.uri)
        except Exception as exc:  # noqa: BLE001 - the run's work is done; the lease just expires instead
            log.warning("run lock %s: could not release it (%s); it expires at %s", self.uri, exc,
                        _iso(self._held.record["expires_at"]))

    def _record(self) -> bytes:
        expires = time.time() + self.config.ttl_s
        pid = os.getpid()
        return json.dumps({
            "holder": self.holder, "token": self.token, "acquired_at": _iso(self.acquired_at),
            "expires_at": expires, "expires": _iso(expires), "ttl_s": self.config.ttl_s,
            # what dead_holder checks
            "host": socket.gethostname(), "pid": pid, "machine": _machine(), "process_started": _process_started(pid),
            **_ray_job(),
        }, indent=1).encode()

    def _acquire(self) -> None:
        deadline = time.monotonic() + self.config.wait_s
        poll = min(30.0, max(1.0, self.config.ttl_s / 10))
        announced = None
        while True:
            data = self._record()
            try:
                self._held = Held(json.loads(data), with_retries(lambda: self._store.create(data)))
                return
            except FileExistsError:
                pass
            current = with_retries(self._store.read)
            if current is None:
                continue  # released in between: try to create it again
            if current.record.get("token") == self.token:  # a retried create of ours had gone through
                self._held = current
                return
            holder, expired = current.record.get("holder"), _iso(current.record["expires_at"])
            if self.break_lock:
                why = f"--break-lock (it was renewed until {expired})"
            elif current.record["expires_at"] < time.time():
                why = f"it expired {expired}"
            else:
                why = dead_holder(current.record)
            if why:
                try:
                    self._held = Held(json.loads(data), self._store.swap(data, current.version))
                except LockLost:
                    continue  # another run took it over first: look again
                log.warning("run lock %s: took over the lease of %s: %s", self.uri, holder, why)
                return
            remaining = deadline - time.monotonic()
            held_by = (f"{current.record.get('holder')} (since {current.record.get('acquired_at')}, "
                       f"lease renewed until {_iso(current.record['expires_at'])})")
            if remaining <= 0:
                raise RunLocked(f"output {self.output.uri} is locked by another run: {held_by}. Not starting; "
                                "set run.lock.wait_s to wait for it")
            if announced != current.record.get("token"):
                announced = current.record.get("token")
                log.info("run lock %s: held by %s; waiting up to %.0fs", self.uri, held_by, remaining)
            time.sleep(min(poll, remaining))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.config.ttl_s / 3):
            data = self._record()
            try:
                version = with_retries(lambda: self._store.swap(data, self._held.version))
            except LockLost:
                self.lost = True
                log.error("run lock %s: lost — another run took it over (this run was stalled beyond %.0fs); "
                          "this run goes on, and inputs both runs finish are written twice with the same bytes",
                          self.uri, self.config.ttl_s)
                return
            except Exception as exc:  # noqa: BLE001 - try again next period; the lease lasts ttl_s
                log.warning("run lock %s: renewal failed (%s); retrying", self.uri, exc)
                continue
            self._held = Held(json.loads(data), version)
