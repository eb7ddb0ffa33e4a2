"""The run lock (pipeline.run_lock): one run at a time per output, on local disks and on S3 (moto's server, which
implements S3's conditional writes: If-None-Match on create, If-Match on renewal, takeover and release)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from support.catalog import Job, job_config, manifest_rows, session_ray_address, small_catalog, upload
from support.engines import gate_path

from pipeline.config import ConfigError, LockConfig, validate_config
from pipeline.run import EXIT_LOCKED, EXIT_OK, run_job
from pipeline.run_lock import LOCK_KEY, RunLock, RunLocked
from pipeline.storage import Location


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> tuple[Location, Location]:
    """(input, output) locations on a local disk or in a moto S3 bucket."""
    if request.param == "local":
        return Location(str(tmp_path / "in"), {}), Location(str(tmp_path / "out"), {})
    bucket, options = request.getfixturevalue("bucket"), request.getfixturevalue("s3_options")
    return Location(f"s3://{bucket}/in", options), Location(f"s3://{bucket}/out", options)


def lease_record(output: Location) -> dict | None:
    try:
        return json.loads(output.read(LOCK_KEY))
    except FileNotFoundError:
        return None


def write_expired_lease(output: Location, holder: str = "crashed-host/4242") -> None:
    output.write_atomic(LOCK_KEY, json.dumps({"holder": holder, "token": "stale", "acquired_at": "earlier",
                                               "expires_at": time.time() - 1}).encode())


def test_a_live_lease_keeps_a_second_run_out_until_released(store):
    _, output = store
    with RunLock(output, LockConfig(ttl_s=60)) as first:
        assert lease_record(output)["holder"] == first.holder
        with pytest.raises(RunLocked, match=f"is locked by another run: {first.holder}.*run.lock.wait_s"):
            RunLock(output, LockConfig()).__enter__()
    assert lease_record(output) is None  # released
    with RunLock(output, LockConfig()):
        pass


def test_a_store_without_atomic_create_is_a_config_error_naming_the_way_out():
    with pytest.raises(ConfigError, match=r"run\.lock: no atomic create-if-absent .*memory://out.*"
                                          r"set run\.lock\.enabled: false"):
        RunLock(Location("memory://out", {}), LockConfig()).__enter__()


def test_the_holder_renews_its_lease(store):
    _, output = store
    with RunLock(output, LockConfig(ttl_s=3)):
        first = lease_record(output)["expires_at"]
        deadline = time.monotonic() + 60
        while lease_record(output)["expires_at"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.1)
        assert lease_record(output)["expires_at"] > first


@pytest.mark.parametrize("situation", ["free", "expired"])
def test_of_runs_racing_for_the_lease_exactly_one_gets_it(store, situation):
    _, output = store
    if situation == "expired":
        write_expired_lease(output)
    contenders = [RunLock(output, LockConfig(ttl_s=60)) for _ in range(6)]
    start, winners, locked = threading.Barrier(len(contenders)), [], []

    def contend(lease: RunLock) -> None:
        start.wait()
        try:
            winners.append(lease.__enter__())
        except RunLocked:
            locked.append(lease)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(winners), len(locked)) == (1, len(contenders) - 1)
    assert lease_record(output)["token"] == winners[0].token
    winners[0].__exit__(None, None, None)
    assert lease_record(output) is None


def test_a_holder_whose_lease_was_taken_over_notices_and_leaves_it(store, caplog):
    _, output = store
    with RunLock(output, LockConfig(ttl_s=3)) as stalled:
        write_expired_lease(output, holder="the-other-run/1")  # as if another run had taken it over
        deadline = time.monotonic() + 60
        while not stalled.lost:
            assert time.monotonic() < deadline, "the holder never noticed"
            time.sleep(0.1)
    assert lease_record(output)["holder"] == "the-other-run/1"  # not deleted by the run that lost it
    assert "lost" in caplog.text


@pytest.fixture
def gate(ray_local):
    """The gated engine's gate, closed; opened at the end whatever happened, so no run stays stuck on it."""
    path = gate_path()
    for stale in (path, path.with_suffix(".waiting")):
        stale.unlink(missing_ok=True)
    yield path
    path.touch()


def _lock_config(input: Location, output: Location, **lock) -> tuple[dict, dict]:
    config = job_config(input.uri, output.uri, model={"path": "support.engines:gated"},
                        compute={"batch_size": 2, "actors": {"min": 1, "max": 1}}, run={"lock": lock})
    config["input"]["storage_options"] = input.storage_options
    config["output"]["storage_options"] = output.storage_options
    return config, {"RAY_ADDRESS": session_ray_address()}


@pytest.mark.slow
@pytest.mark.parametrize("store", ["s3"], indirect=True)  # a local output's lease: the tests beside and below
def test_overlapping_runs_and_a_killed_holder_commit_every_input_exactly_once(gate, store, tmp_path, caplog):
    source, output = store
    files = small_catalog(4)
    upload(source, files)
    config, env = _lock_config(source, output, ttl_s=5)
    holder = Job(config, tmp_path / "holder.yaml", env=env)  # a job process of its own, held mid-run by the gate
    holder.wait_for(gate.with_suffix(".waiting").exists, "the first run to start upscaling")
    held_by = lease_record(output)["holder"]
    assert held_by.endswith(f"/{holder.process.pid}")

    caplog.set_level(logging.INFO, logger="pipeline")
    assert run_job(validate_config(config)) == EXIT_LOCKED  # a second run while the first lives: refused
    assert f"output {output.uri} is locked by another run: {held_by} (since " in caplog.text

    config["run"]["lock"]["wait_s"] = 600  # a third run waits for it ...
    waited: dict = {}
    waiting = threading.Thread(target=lambda: waited.update(code=run_job(validate_config(config))))
    waiting.start()
    holder.wait_for(lambda: "waiting up to" in caplog.text, "the third run to wait for the lock")
    holder.kill()  # ... the first is SIGKILLed mid-run, its lease left behind ...
    gate.touch()
    waiting.join(timeout=600)
    assert waited["code"] == EXIT_OK  # ... and taken over: its process is gone
    assert f"took over the lease of {held_by}: its process {holder.process.pid} on this machine is gone" in caplog.text

    rows = manifest_rows(output)
    assert sorted(rows[rows.status == "ok"].source_key) == sorted(files)  # every input committed exactly once
    assert lease_record(output) is None


@pytest.mark.slow
def test_a_run_stopped_with_sigterm_releases_its_lease(gate, tmp_path):
    """`ray job stop` and Kubernetes stop a job with SIGTERM: the run unwinds and deletes its lease at once."""
    source, output = Location(str(tmp_path / "in"), {}), Location(str(tmp_path / "out"), {})
    upload(source, small_catalog(2))
    config, env = _lock_config(source, output, ttl_s=600)
    stopped = Job(config, tmp_path / "job.yaml", env=env)
    stopped.wait_for(gate.with_suffix(".waiting").exists, "the run to start upscaling")
    assert lease_record(output)["holder"].endswith(f"/{stopped.process.pid}")
    stopped.process.terminate()
    assert stopped.finish() == 128 + 15, stopped.log
    assert lease_record(output) is None  # the next run need not wait out the 600 s TTL


# -- a dead holder is taken over at once; --break-lock; the TTL for holders that cannot be checked -------------------
_HOLDER = """
import sys, time
from pipeline.config import LockConfig
from pipeline.run_lock import RunLock
from pipeline.storage import Location
with RunLock(Location(sys.argv[1], {}), LockConfig(ttl_s=600)):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_sigkilled_holder_on_this_machine_is_taken_over_at_once(tmp_path, caplog):
    """A real process holds the lease (TTL 600 s) and is SIGKILLed, as the OOM killer would: the next run does not
    wait for the TTL, and says whose lease it took and why."""
    output = Location(str(tmp_path / "out"), {})
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, output.uri], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        record = lease_record(output)
        assert record["holder"].endswith(f"/{holder.pid}") and record["expires_at"] > time.time() + 500
        with pytest.raises(RunLocked):  # alive: it keeps its lease
            RunLock(output, LockConfig()).__enter__()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    caplog.set_level(logging.INFO, logger="pipeline")
    with RunLock(output, LockConfig()) as lease:  # wait_s 0: taken at once, or RunLocked
        assert lease_record(output)["token"] == lease.token
    assert (f"took over the lease of {record['holder']}: its process {holder.pid} on this machine is gone"
            in caplog.text)


def test_a_reused_pid_does_not_keep_a_dead_holders_lease(tmp_path, caplog):
    """The PID is alive but belongs to another process (a later start time): the holder is dead."""
    output = Location(str(tmp_path / "out"), {})
    with RunLock(output, LockConfig(ttl_s=600)):
        record = lease_record(output)
    record.update(token="earlier", process_started=str(int(record["process_started"]) - 1),
                  expires_at=time.time() + 600)
    output.write_atomic(LOCK_KEY, json.dumps(record).encode())
    caplog.set_level(logging.INFO, logger="pipeline")
    with RunLock(output, LockConfig()):
        pass
    assert "(the PID now belongs to another process)" in caplog.text


def test_a_holder_that_cannot_be_checked_keeps_its_lease_until_it_expires(tmp_path):
    """Another machine's holder (or one on this machine whose process lives) is not second-guessed."""
    output = Location(str(tmp_path / "out"), {})
    with RunLock(output, LockConfig(ttl_s=600)):
        record = lease_record(output)
    record.update(token="elsewhere", holder="another-host/1", host="another-host", pid=1, expires_at=time.time() + 600)
    output.write_atomic(LOCK_KEY, json.dumps(record).encode())
    with pytest.raises(RunLocked, match="locked by another run: another-host/1 "):
        RunLock(output, LockConfig()).__enter__()
    assert lease_record(output)["token"] == "elsewhere"


def test_break_lock_takes_over_a_live_holder_and_names_it(store, caplog):
    _, output = store
    caplog.set_level(logging.INFO, logger="pipeline")
    with RunLock(output, LockConfig(ttl_s=600)) as live:
        with RunLock(output, LockConfig(), break_lock=True) as breaker:
            assert lease_record(output)["token"] == breaker.token
        assert f"took over the lease of {live.holder}: --break-lock (it was renewed until " in caplog.text
    assert live.lost or lease_record(output) is None  # the broken holder never deletes the new lease


@pytest.mark.slow
def test_a_holder_whose_ray_job_ended_is_taken_over_at_once(gate, tmp_path, caplog):
    """A holder on another machine of the same Ray cluster cannot be checked by its PID, but by its Ray job."""
    source, output = Location(str(tmp_path / "in"), {}), Location(str(tmp_path / "out"), {})
    upload(source, small_catalog(2))
    config, env = _lock_config(source, output, ttl_s=600)
    holder = Job(config, tmp_path / "holder.yaml", env=env)
    holder.wait_for(gate.with_suffix(".waiting").exists, "the first run to start upscaling")
    record = lease_record(output)
    assert record["ray_job_id"] and record["ray_session"]
    holder.kill()
    gate.touch()
    record.update(host="another-machine", machine=None)  # as if it had run on another node of this cluster
    output.write_atomic(LOCK_KEY, json.dumps(record).encode())
    caplog.set_level(logging.INFO, logger="pipeline")
    deadline = time.monotonic() + 60  # the raylet marks the job dead once it sees its driver gone
    while (code := run_job(validate_config(config))) == EXIT_LOCKED:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(1)
    assert code == EXIT_OK
    assert f"took over the lease of {record['holder']}: its Ray job {record['ray_job_id']} on this cluster has ended" \
        in caplog.text
