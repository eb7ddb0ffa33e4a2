"""Credentials given in storage_options (moto's S3 accepts any key) reach no output, manifest, summary, report, lock
or log line — of the driver or of the Ray session's workers. (Credentials from the environment, under
`ray job submit`: test_job_submit.py.)"""

from __future__ import annotations

import logging
import pathlib
import uuid

import pytest
import ray
import s3fs
from support.catalog import job_config, small_catalog

from pipeline.config import validate_config
from pipeline.run import EXIT_INPUTS_FAILED, run_job


@pytest.mark.slow
def test_storage_option_credentials_are_written_nowhere(ray_local, bucket, s3_server, capsys, caplog):
    key_id, secret = f"AKIACANARY{uuid.uuid4().hex[:10].upper()}", f"dit4sr-canary-secret-{uuid.uuid4().hex}"
    options = {"key": key_id, "secret": secret, "endpoint_url": s3_server,
               "client_kwargs": {"region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options)
    for key, data in {**small_catalog(3), "broken/empty.png": b""}.items():
        fs.pipe_file(f"{bucket}/in/{key}", data)
    config = job_config(f"s3://{bucket}/in", f"s3://{bucket}/out", model={"path": "bicubic"})
    config["input"]["storage_options"] = config["output"]["storage_options"] = options
    caplog.set_level(logging.DEBUG, logger="pipeline")  # as --log-level DEBUG does (botocore's own debug log
    # prints the access key id in every request's Authorization header: it stays at the root's level)
    assert run_job(validate_config(config)) == EXIT_INPUTS_FAILED

    written = {key: fs.cat_file(key) for key in fs.find(f"{bucket}/out")}
    assert any(key.endswith("_report.html") for key in written) and any("_summary.json" in key for key in written)
    printed = capsys.readouterr()
    session_logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    logs = {str(path): path.read_bytes() for path in session_logs.rglob("*") if path.is_file()}
    for canary in (secret, key_id):
        assert [key for key, data in written.items() if canary.encode() in data] == []
        assert canary not in printed.out + printed.err + caplog.text
        assert [name for name, data in logs.items() if canary.encode() in data] == []
