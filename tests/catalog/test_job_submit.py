"""`ray job submit` as the README shows it, against a real head (`ray start --head` with its dashboard and job
server on free local ports): the embedded default config runs from an uploaded working dir; and credentials given
to the cluster as environment variables never reach the outputs, manifests, summary, report, logs or the job's
metadata."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

import pytest
import s3fs
from support.catalog import REPO, manifests, outputs, small_catalog
from support.net import free_port, wait_for_url

from pipeline.example_catalog import lay_out_example_catalog
from pipeline.storage import Location

pytestmark = pytest.mark.slow

CANARY_KEY_ID = f"AKIACANARY{uuid.uuid4().hex[:10].upper()}"
CANARY_SECRET = f"dit4sr-canary-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A Ray head of its own, started as an operator would (its environment holds the cluster's S3 keys), stopped
    at the end however the tests went: SIGKILL to its process group, the session `ray start --block` was started
    in, which holds exactly the processes it started (the workers die with their raylet). `ray stop` would stop
    every Ray on the machine, the test session's own included; a SIGTERM to `ray start` waits on each process's
    graceful exit, about half a minute here, for a cluster whose state nobody needs any more."""
    temp = pathlib.Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))  # short: Ray's socket paths are bounded
    dashboard = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(AWS_ACCESS_KEY_ID=CANARY_KEY_ID, AWS_SECRET_ACCESS_KEY=CANARY_SECRET, AWS_DEFAULT_REGION="us-east-1",
               RAY_USAGE_STATS_ENABLED="0",
               # this Python's `ray` and `python` first, even where its venv is not activated
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--metrics-export-port": free_port()}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
         *(f"{flag}={port}" for flag, port in ports.items())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_url(f"{address}/api/version", head, "ray start --head (its job server)", timeout=180, interval=1)
        yield {"address": address, "temp": temp, "env": env}
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def ray_cli(head: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], cwd=REPO, env=head["env"], capture_output=True, text=True,
                          timeout=timeout)


def submit(head: dict, submission_id: str, *job_args: str, runtime_env: dict | None = None) -> str:
    """`ray job submit --working-dir .` as in the README; waits for the job and returns everything it printed."""
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    result = ray_cli(head, "job", "submit", "--address", head["address"], "--working-dir", ".",
                     "--submission-id", submission_id, *extra, "--", "python", "jobs/upscale_catalog.py", *job_args)
    return result.stdout + result.stderr


def job_info(head: dict, submission_id: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head["address"]).get_job_info(submission_id)


def test_submit_runs_the_embedded_default_from_an_uploaded_working_dir(ray_head, tmp_path):
    catalog, upscaled = tmp_path / "catalog", tmp_path / "upscaled"
    lay_out_example_catalog(Location(str(catalog), {}))  # examples appear by themselves only in ./data/catalog
    printed = submit(ray_head, "embedded-default", "--set", "model.path=bicubic", "--set", f"input.uri={catalog}",
                     "--set", f"output.uri={upscaled}")
    assert "Job 'embedded-default' succeeded" in printed, printed
    info = job_info(ray_head, "embedded-default")
    assert (info.status, info.driver_exit_code) == ("SUCCEEDED", 0)
    status = ray_cli(ray_head, "job", "status", "--address", ray_head["address"], "embedded-default")
    assert "Job 'embedded-default' succeeded" in status.stdout + status.stderr

    rows = manifests(upscaled)
    assert len(rows) == 5 and set(rows.status) == {"ok"} and (rows.out_width == 4 * rows.width).all()
    assert sorted(outputs(upscaled)) == sorted(rows.output_key)
    run = upscaled / "_manifests" / f"run={rows.run_id.iloc[0]}"
    assert json.loads((run / "_summary.json").read_text())["ok"] == 5 and (run / "_report.html").is_file()

    # what travelled in the working dir: the code and the small bundled model; no tests, history or weights
    unpacked = ray_head["temp"] / "session_latest" / "runtime_resources" / "working_dir_files"
    (package,) = [path for path in unpacked.glob("_ray_pkg_*") if path.is_dir()]
    files = [path.relative_to(package) for path in package.rglob("*") if path.is_file()]
    names = {str(path) for path in files}
    assert {"jobs/upscale_catalog.py", "configs/local.yaml", "pipeline/run.py", "dit4sr/files.py"} <= names
    assert not {path.parts[0] for path in files} & {".git", ".venv", "tests", "benchmarks", "data", "infra"}
    weights = [path for path in files if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin")]
    assert weights and all(path.parts[:2] == ("dit4sr", "bundled") for path in weights)  # model.path: bundled
    assert sum((package / path).stat().st_size for path in files) < 40 << 20


def test_credentials_from_the_cluster_environment_never_reach_outputs_logs_or_job_metadata(ray_head, bucket,
                                                                                          s3_server, tmp_path):
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server,
                           client_kwargs={"region_name": "us-east-1"})
    for key, data in {**small_catalog(3), "broken/empty.png": b""}.items():
        fs.pipe_file(f"{bucket}/in/{key}", data)
    # The keys are in the head's environment (as a Secret or an instance profile would provide them); only the
    # endpoint, which is no secret, goes in --runtime-env-json.
    printed = submit(ray_head, "credentials", "--config", "configs/s3_catalog.yaml", "--log-level", "DEBUG",
                     "--set", f"input.uri=s3://{bucket}/in", "--set", f"output.uri=s3://{bucket}/out",
                     "--set", "model.path=bicubic", "--set", "model.transformer=null",
                     "--set", "compute.gpus_per_actor=0", "--set", "compute.cpus_per_actor=1",
                     "--set", "compute.actors.max=1", "--set", "input.include=['**']",
                     runtime_env={"env_vars": {"AWS_ENDPOINT_URL_S3": s3_server}})
    info = job_info(ray_head, "credentials")
    assert info.driver_exit_code == 3, printed  # 3 ok, 1 failed (the empty file): the job ran over S3
    written = {key: fs.cat_file(key) for key in fs.find(f"{bucket}/out")}
    assert any(key.endswith("_report.html") for key in written) and any("_summary.json" in key for key in written)
    assert sum(key.endswith(".parquet") for key in written) >= 1

    logs = ray_cli(ray_head, "job", "logs", "--address", ray_head["address"], "credentials")
    listing = ray_cli(ray_head, "job", "list", "--address", ray_head["address"])
    assert '"input_finished"' in logs.stdout  # the DEBUG lines are there to be searched too
    metadata = json.dumps({"entrypoint": info.entrypoint, "metadata": info.metadata,
                           "runtime_env": info.runtime_env})
    session_logs = {str(path): path.read_bytes() for path in (ray_head["temp"] / "session_latest" / "logs").rglob("*")
                    if path.is_file()}
    assert session_logs
    for secret in (CANARY_SECRET, CANARY_KEY_ID):
        assert [key for key, data in written.items() if secret.encode() in data] == []
        for text in (printed, logs.stdout + logs.stderr, listing.stdout + listing.stderr, metadata):
            assert secret not in text
        assert [name for name, data in session_logs.items() if secret.encode() in data] == []
