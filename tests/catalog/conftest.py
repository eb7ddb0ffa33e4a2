"""Fixtures for the catalog pipeline tests: one real local Ray per session, a real S3 API (moto over HTTP)."""

from __future__ import annotations

import io
import os
import pathlib
import sys
import uuid

import numpy as np
import pytest
from PIL import Image

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent

# Plug-in test engines (catalog_test_engines) must import in Ray workers and in job subprocesses too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(REPO), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(HERE))

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


def image_bytes(width: int, height: int, fmt: str = "PNG", mode: str = "RGB", seed: int = 0, **options) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write_catalog(root: pathlib.Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def manifests(output: pathlib.Path):
    """Every committed manifest row under a local output folder, as a pandas frame."""
    import pyarrow.parquet as pq

    from pipeline.manifest import SCHEMA

    parts = sorted(output.glob("_manifests/run=*/part-*.parquet"))
    return (pq.read_table(parts) if parts else SCHEMA.empty_table()).to_pandas()


def outputs(root: pathlib.Path) -> dict[str, bytes]:
    """Every output object (not manifests, not hidden temp files) under a local output folder."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "_manifests" not in p.parts and not p.name.startswith(".")}


def small_catalog(count: int = 6) -> dict[str, bytes]:
    """Tiny, varied, valid inputs: a few folders, PNG and JPEG, odd sizes."""
    files = {}
    for i in range(count):
        fmt, ext = ("PNG", "png") if i % 2 == 0 else ("JPEG", "jpg")
        files[f"album{i % 3}/photo {i}.{ext}"] = image_bytes(5 + i, 4 + (i % 3), fmt, seed=i)
    return files


def job_config(input_uri: str, output_uri: str, **sections) -> dict:
    """A bicubic-engine job config as a dict; ``sections`` override whole keys per section."""
    config = {
        "input": {"uri": input_uri},
        "output": {"uri": output_uri, "format": "png"},
        "model": {"path": "bicubic"},
        "upscale": {"scale": 2},
        "compute": {"actors": {"min": 1, "max": 2}, "batch_size": 2, "cpus_per_actor": 1},
        "run": {"progress_interval_s": 1},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
