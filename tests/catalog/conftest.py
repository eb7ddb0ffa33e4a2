"""Fixtures for the catalog pipeline tests: one real local Ray per session, a real S3 API (moto over HTTP)."""

from __future__ import annotations

import os
import pathlib
import uuid

import pytest
from support.catalog import REPO

# Plug-in test engines (support.engines) must import in Ray workers and in job subprocesses too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH")]))

RAY_CPUS = 4
RAY_FAKE_GPUS = 2


def start_local_ray() -> None:
    import ray

    ray.init(num_cpus=RAY_CPUS, num_gpus=RAY_FAKE_GPUS, object_store_memory=200 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="session")
def marker_dir(tmp_path_factory) -> pathlib.Path:
    """A folder shared with Ray workers (through the environment) for test engines' one-shot markers."""
    path = tmp_path_factory.mktemp("markers")
    os.environ["CATALOG_TEST_MARKERS"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_session(marker_dir):
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """The session's local Ray (restarted if a multi-node test replaced it)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_server) -> dict:
    return {"key": "testing", "secret": "testing", "endpoint_url": s3_server,
            "client_kwargs": {"region_name": "us-east-1"}}


@pytest.fixture
def bucket(s3_server) -> str:
    import boto3

    name = f"catalog-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name
