"""The catalog job against a real S3 API: moto's server on 127.0.0.1, reached over HTTP through s3fs."""

from __future__ import annotations

import hashlib
import io
import logging
import urllib.parse

import boto3
import pyarrow.dataset as pads
import pytest
import s3fs
from PIL import Image
from support.catalog import image_bytes, job_config, read_runs, small_catalog
from support.fault_proxy import FaultProxy, first_attempts

from pipeline import manifest
from pipeline.config import validate_config
from pipeline.manifest import MANIFEST_DIR
from pipeline.run import EXIT_OK, execute, prepare, run_job
from pipeline.storage import Location


def upload(fs: s3fs.S3FileSystem, prefix: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        fs.pipe_file(f"{prefix}/{key}", data)


def s3_config(bucket: str, options: dict, **sections) -> dict:
    config = job_config(f"s3://{bucket}/in", f"s3://{bucket}/out", **sections)
    config["input"]["storage_options"] = config["output"]["storage_options"] = options
    return config


def s3_manifests(fs: s3fs.S3FileSystem, bucket: str):
    parts = fs.glob(f"{bucket}/out/{MANIFEST_DIR}/run=*/part-*.parquet")
    return pads.dataset(parts, filesystem=fs, format="parquet").to_table().to_pandas()


def test_s3_end_to_end(ray_local, bucket, s3_options):
    fs = s3fs.S3FileSystem(**s3_options)
    files = small_catalog(5)
    upload(fs, f"{bucket}/in", files)
    config = s3_config(bucket, s3_options)
    assert run_job(validate_config(config)) == EXIT_OK

    rows = s3_manifests(fs, bucket)
    assert sorted(rows.source_key) == sorted(files) and set(rows.status) == {"ok"}
    for row in rows.itertuples():
        data = fs.cat_file(f"{bucket}/out/{row.output_key}")
        assert row.output_uri == f"s3://{bucket}/out/{row.output_key}"
        assert hashlib.sha256(data).hexdigest() == row.output_sha256
        assert row.output_etag_or_mtime == fs.info(f"{bucket}/out/{row.output_key}")["ETag"].strip('"')
        assert Image.open(io.BytesIO(data)).size == (row.width * 2, row.height * 2)
        assert fs.info(f"{bucket}/out/{row.output_key}")["ContentType"] == "image/png"
    assert fs.exists(f"{bucket}/out/{MANIFEST_DIR}/run={rows.run_id.iloc[0]}/_summary.json")

    assert run_job(validate_config(config)) == EXIT_OK  # the re-run downloads nothing and skips everything
    assert len(s3_manifests(fs, bucket)) == len(files)  # skipped inputs are counted, not written
    last = read_runs(Location(f"s3://{bucket}/out", s3_options)).to_pylist()[-1]
    assert (last["ok"], last["skipped"], last["exit_code"]) == (0, len(files), 0)


@pytest.mark.slow
def test_s3_key_with_dotdot_and_deleted_object_fail_alone(ray_local, bucket, s3_options, s3_server):
    fs = s3fs.S3FileSystem(**s3_options)
    files = small_catalog(3)
    upload(fs, f"{bucket}/in", files)
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="in/evil/../../escaped.png", Body=image_bytes(4, 4))
    cfg = validate_config(s3_config(bucket, s3_options, compute={"batch_size": 8}))

    plan = prepare(cfg)
    gone = sorted(files)[0]
    fs.rm(f"{bucket}/in/{gone}")  # deleted between listing and reading
    summary = execute(plan)
    assert (summary["ok"], summary["failed"]) == (len(files) - 1, 2)

    rows = s3_manifests(fs, bucket).set_index("source_key")
    assert rows.loc["evil/../../escaped.png", "error_type"] == "unsafe_key"
    assert rows.loc[gone, "error_type"] == "missing_source"
    assert (rows.drop(index=["evil/../../escaped.png", gone]).status == "ok").all()
    assert not [key for key in fs.find(bucket) if "escaped" in key and not key.startswith(f"{bucket}/in/")]


# botocore makes a single attempt, and s3fs does not retry a 503 ServiceUnavailable on its own: only the
# project's retry layer (pipeline.storage.with_retries) stands between such a 503 and a failed input.
ONE_ATTEMPT = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 1}}}


def _retries(records) -> list[tuple[int, float]]:
    """(retry number, seconds slept) of each retry ``with_retries`` logged."""
    return [(record.args[2], record.args[4]) for record in records
            if record.name == "pipeline.storage" and record.msg.startswith("storage: transient error")]


def test_storage_retries_back_off_exponentially(bucket, s3_options, s3_server, caplog):
    with FaultProxy(s3_server, first_attempts(3, methods=("GET", "PUT"))) as proxy:
        location = Location(f"s3://{bucket}/retry", {**s3_options, "endpoint_url": proxy.url, **ONE_ATTEMPT})
        with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
            location.write_atomic("a.png", b"payload")  # a PUT (then a HEAD, not faulted)
            assert location.read("a.png") == b"payload"  # a GET
    assert proxy.injected == {"unavailable": 6}  # the first 3 attempts of each
    retries = _retries(caplog.records)
    assert [number for number, _ in retries] == [1, 2, 3] * 2
    # full jitter: each delay drawn from [0, 0.2 s x 2^(retry-1)]
    assert all(0 <= delay <= 0.2 * 2 ** (number - 1) for number, delay in retries) and sum(d for _, d in retries) > 0
    # the retries really waited: each request's next attempt came at least its logged delay later
    attempts: dict = {}
    for at, method, path, _ in proxy.log:
        if method in ("GET", "PUT"):
            attempts.setdefault((method, path), []).append(at)
    gaps = [later - earlier for times in attempts.values() for earlier, later in zip(times, times[1:])]
    assert len(gaps) == 6 and all(gap >= delay for gap, (_, delay) in zip(gaps, retries))


@pytest.mark.slow
def test_s3_throttling_is_retried_with_backoff(ray_local, bucket, s3_options, s3_server):
    fs = s3fs.S3FileSystem(**s3_options)
    files = small_catalog(4)
    upload(fs, f"{bucket}/in", files)
    # every object request (source reads, output and manifest writes, their HEADs) is refused twice, then served;
    # manifest reads are spared here: see test_manifest_reads_survive_throttling
    throttle = first_attempts(2)

    def policy(method: str, path: str) -> str | None:
        return None if "/_manifests/" in path and method != "PUT" else throttle(method, path)

    with FaultProxy(s3_server, policy) as proxy:
        options = {**s3_options, "endpoint_url": proxy.url, **ONE_ATTEMPT}
        assert run_job(validate_config(s3_config(bucket, options))) == EXIT_OK
    faulted = {(method, path) for _, method, path, fault in proxy.log if fault}
    served = {(method, path) for _, method, path, fault in proxy.log if fault is None}
    sources = {f"/{bucket}/in/{urllib.parse.quote(key)}" for key in files}
    assert {path for method, path in faulted if method == "GET"} >= sources  # every source read was refused
    assert sum(method == "PUT" and "/out/" in path for method, path in faulted) >= len(files)  # and every write
    assert faulted <= served  # ... and each refused request was retried until it got through
    rows = s3_manifests(fs, bucket)
    assert sorted(rows.source_key) == sorted(files) and set(rows.status) == {"ok"}


def test_manifest_reads_survive_throttling(bucket, s3_options, s3_server):
    with FaultProxy(s3_server, first_attempts(2, methods=("GET", "HEAD"))) as proxy:
        output = Location(f"s3://{bucket}/out", {**s3_options, "endpoint_url": proxy.url, **ONE_ATTEMPT})
        manifest.write_part(output, "run-1", [manifest.empty_row(source_key="a.png", status="ok")])
        rows = manifest.read_manifests(output).to_pylist()
    assert proxy.injected["unavailable"] > 0 and [row["source_key"] for row in rows] == ["a.png"]
