"""The catalog job against a real S3 API: moto's server on 127.0.0.1, reached over HTTP through s3fs."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import threading
import urllib.parse

import boto3
import pyarrow.dataset as pads
import s3fs
from catalog_support import image_bytes, job_config, small_catalog
from PIL import Image

from pipeline.config import validate_config
from pipeline.manifest import MANIFEST_DIR
from pipeline.run import EXIT_OK, execute, prepare, run_job


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
    again = s3_manifests(fs, bucket)
    assert (again.status == "skipped").sum() == len(files)


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
    summary = execute(plan, cfg)
    assert (summary["ok"], summary["failed"]) == (len(files) - 1, 2)

    rows = s3_manifests(fs, bucket).set_index("source_key")
    assert rows.loc["evil/../../escaped.png", "error_type"] == "unsafe_key"
    assert rows.loc[gone, "error_type"] == "missing_source"
    assert (rows.drop(index=["evil/../../escaped.png", gone]).status == "ok").all()
    assert not [key for key in fs.find(bucket) if "escaped" in key and not key.startswith(f"{bucket}/in/")]


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards S3 requests to moto, answering the first ``failures`` object GETs and PUTs each with
    503 SlowDown (throttling)."""

    def __init__(self, target: str, failures: int):
        self.target = urllib.parse.urlsplit(target)
        self.failures_left = {"GET": failures, "PUT": failures}
        self.injected = {"GET": 0, "PUT": 0}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server: _FlakyProxy = self.server  # type: ignore[assignment]
        is_object = "/in/" in self.path or "/out/" in self.path  # reads and writes of objects, not listings
        with server.lock:
            fail = is_object and server.failures_left.get(self.command, 0) > 0
            if fail:
                server.failures_left[self.command] -= 1
                server.injected[self.command] += 1
        if fail:
            payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        connection = http.client.HTTPConnection(server.target.hostname, server.target.port)
        connection.request(self.command, self.path, body=body, headers=dict(self.headers))
        response = connection.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_s3_throttling_is_retried_with_backoff(ray_local, bucket, s3_options, s3_server):
    fs = s3fs.S3FileSystem(**s3_options)
    files = small_catalog(4)
    upload(fs, f"{bucket}/in", files)
    proxy = _FlakyProxy(s3_server, failures=3)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        options = {**s3_options, "endpoint_url": f"http://127.0.0.1:{proxy.server_address[1]}"}
        assert run_job(validate_config(s3_config(bucket, options))) == EXIT_OK
    finally:
        proxy.shutdown()
    assert proxy.injected == {"GET": 3, "PUT": 3}
    rows = s3_manifests(fs, bucket)
    assert sorted(rows.source_key) == sorted(files) and set(rows.status) == {"ok"}
