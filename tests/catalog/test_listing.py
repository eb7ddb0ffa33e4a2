"""Listing at scale: the parallel listing (Ray tasks fanned out over common prefixes) against a plain listing, and
planning from an S3 Inventory report (real format, on moto's S3 server) against planning from a listing."""

from __future__ import annotations

import gzip
import io
import json
import urllib.parse

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from support.catalog import image_bytes, job_config, write_catalog

from pipeline import listing
from pipeline.config import ConfigError, validate_config
from pipeline.plan import make_plan
from pipeline.spec import RunSpec
from pipeline.storage import Location


def nested_catalog() -> dict[str, bytes]:
    """Files at every depth: the root, 6 folders of 5 sub-folders (more prefixes than the fan-out aims for in the
    test), deeper ones, one excluded tree."""
    files = {"top.png": b"t", "notes.txt": b"n"}
    for a in range(6):
        files[f"f{a}/at-{a}.png"] = b"a" * (a + 1)
        for b in range(5):
            files[f"f{a}/s{b}/p{a}{b}.jpg"] = b"b" * (a + b + 1)
            files[f"f{a}/s{b}/deep/x/{a}{b}.png"] = b"c" * (b + 2)
    files["skip/me/there.png"] = b"s"
    return files


def sorted_rows(blocks) -> list[tuple]:
    return sorted((row["relative"], row["size"], row["identity"]) for row in listing.rows(blocks))


def plain(location: Location, include=None, exclude=None) -> list[tuple]:
    return [(e.relative, e.size, e.identity) for e in location.list(include, exclude)]


@pytest.mark.parametrize("globs", [{}, {"include": ["**/*.png", "*.png"], "exclude": ["skip/**", "f1/s2/**"]}])
def test_parallel_listing_equals_a_plain_listing_on_disk(ray_local, tmp_path, monkeypatch, globs):
    monkeypatch.setattr(listing, "LIST_TASKS", 4)  # fan out over 3 levels, then whole-prefix tasks
    write_catalog(tmp_path / "in", nested_catalog())
    location = Location(str(tmp_path / "in"), {})
    blocks = listing.list_blocks(location, **globs, in_tasks=True)
    assert len(blocks) >= 4 and all(listing.is_block_ref(block) for block in blocks)  # listed in Ray tasks
    assert sorted_rows(blocks) == plain(location, **globs) and len(plain(location, **globs)) > 20


@pytest.mark.slow
def test_parallel_listing_equals_a_plain_listing_on_s3(ray_local, bucket, s3_options, monkeypatch):
    monkeypatch.setattr(listing, "LIST_TASKS", 8)
    fs = s3fs.S3FileSystem(**s3_options)
    for key, data in nested_catalog().items():
        fs.pipe_file(f"{bucket}/in/{key}", data)
    fs.pipe_file(f"{bucket}/elsewhere.png", b"not under the prefix")
    location = Location(f"s3://{bucket}/in", s3_options)
    expected = plain(location, exclude=["skip/**"])
    assert sorted_rows(listing.list_blocks(location, exclude=["skip/**"], in_tasks=True)) == expected
    assert len(expected) == len(nested_catalog()) - 1 and all(len(identity) == 32 for _, _, identity in expected)
    assert listing.list_blocks(Location(f"s3://{bucket}/absent", s3_options), in_tasks=True) == []


# -- S3 Inventory --------------------------------------------------------------------------------------------------
KEYS = ["album/a photo.png", "album/plus+sign.png", "album/ünïcode é.jpg", "album/percent%20kept.png",
        "deep/er/b.png", "c.jpg", "raw/skip.png", "notes.txt"]
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass"
PARQUET_SCHEMA = ("message s3.inventory { required binary bucket (STRING); required binary key (STRING); "
                  "optional binary version_id (STRING); optional boolean is_latest; optional boolean is_delete_marker; "
                  "optional int64 size; optional int64 last_modified_date (TIMESTAMP(MILLIS,true)); "
                  "optional binary e_tag (STRING); optional binary storage_class (STRING);}")


def inventory_records(fs: s3fs.S3FileSystem, bucket: str) -> list[dict]:
    """What S3 Inventory reports for the bucket: every object (not only the input's prefix), plus what a
    versioned bucket adds: an old version and a delete marker of removed keys."""
    records = []
    for path, info in sorted(fs.find(bucket, detail=True).items()):
        records.append({"bucket": bucket, "key": path.split("/", 1)[1], "version_id": "v2", "is_latest": True,
                        "is_delete_marker": False, "size": info["size"], "last_modified_date": 1764633600000,
                        "e_tag": info["ETag"].strip('"'), "storage_class": "STANDARD"})
    records.append({**records[0], "key": "in/gone.png", "is_latest": False, "version_id": "v1"})
    records.append({**records[0], "key": "in/deleted.png", "is_delete_marker": True, "size": None, "e_tag": None})
    records.append({**records[0], "bucket": "another-bucket", "key": "in/foreign.png"})
    records.append({**records[0], "key": "in/folder/", "size": 0})  # a console-made "folder"
    return records


def csv_file(records: list[dict]) -> bytes:
    """Gzipped CSV as S3 Inventory writes it: no header, every value quoted, keys URL-encoded."""
    lines = []
    for record in records:
        values = [record["bucket"], urllib.parse.quote_plus(record["key"], safe="/"), record["version_id"],
                  str(record["is_latest"]).lower(), str(record["is_delete_marker"]).lower(),
                  "" if record["size"] is None else str(record["size"]), "2025-12-02T00:00:00.000Z",
                  record["e_tag"] or "", record["storage_class"]]
        lines.append(",".join(f'"{value}"' for value in values))
    return gzip.compress(("\n".join(lines) + "\n").encode())


def parquet_file(records: list[dict]) -> bytes:
    table = pa.Table.from_pylist(records, schema=pa.schema([
        ("bucket", pa.string()), ("key", pa.string()), ("version_id", pa.string()), ("is_latest", pa.bool_()),
        ("is_delete_marker", pa.bool_()), ("size", pa.int64()), ("last_modified_date", pa.timestamp("ms", "UTC")),
        ("e_tag", pa.string()), ("storage_class", pa.string())]))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_inventory(fs: s3fs.S3FileSystem, bucket: str, destination: str, file_format: str,
                    report: str = "2025-12-02T01-00Z") -> str:
    """An inventory report of ``bucket`` in ``destination`` as S3 writes one (two data files), returns its
    manifest's URI."""
    records = inventory_records(fs, bucket)
    config = f"inventory/{bucket}/nightly"
    halves = [records[: len(records) // 2], records[len(records) // 2:]]
    files = []
    for number, half in enumerate(halves):
        data = csv_file(half) if file_format == "CSV" else parquet_file(half)
        key = f"{config}/data/{number:04d}-{file_format.lower()}.{'csv.gz' if file_format == 'CSV' else 'parquet'}"
        fs.pipe_file(f"{destination}/{key}", data)
        files.append({"key": key, "size": len(data), "MD5checksum": "0" * 32})
    manifest = {"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{destination}", "version": "2016-11-30",
                "creationTimestamp": "1764637200000", "fileFormat": file_format,
                "fileSchema": CSV_SCHEMA if file_format == "CSV" else PARQUET_SCHEMA, "files": files}
    fs.pipe_file(f"{destination}/{config}/{report}/manifest.json", json.dumps(manifest).encode())
    return f"s3://{destination}/{config}/{report}/manifest.json"


def make_bucket(s3_server: str, name: str) -> None:
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=name)


def plan_of(config: dict):
    cfg = validate_config(config)
    plan = make_plan(RunSpec.resolve(cfg, "r"))
    return ([{k: v for k, v in row.items() if k != "task"} for row in plan.todo],
            sorted(plan.skipped), [(row["source_key"], row["error_type"]) for row in plan.rejected])


@pytest.mark.parametrize("file_format", ["CSV", "Parquet"])
def test_plan_from_an_s3_inventory_equals_the_plan_from_listing(ray_local, bucket, s3_options, s3_server,
                                                                file_format):
    fs = s3fs.S3FileSystem(**s3_options)
    for number, key in enumerate(KEYS):
        fs.pipe_file(f"{bucket}/in/{key}", image_bytes(4 + number, 3, "PNG", seed=number))
    fs.pipe_file(f"{bucket}/outside.png", image_bytes(3, 3))
    destination = f"{bucket}-inventory"
    make_bucket(s3_server, destination)
    manifest = write_inventory(fs, bucket, destination, file_format)
    base = job_config(f"s3://{bucket}/in", f"s3://{bucket}/out", input={"exclude": ["raw/**"]})
    base["input"]["storage_options"] = base["output"]["storage_options"] = s3_options

    listed = plan_of(base)
    from_inventory = plan_of({**base, "input": {**base["input"], "inventory": manifest}})
    assert from_inventory == listed
    todo, _, rejected = listed
    assert sorted(row["source_key"] for row in todo) == sorted(k for k in KEYS if not k.startswith("raw/"))
    assert rejected == []
    # the configuration's folder stands for its newest report
    older = write_inventory(fs, bucket, destination, file_format, report="2025-11-30T01-00Z")
    assert listing.find_manifest(manifest.rsplit("/", 2)[0], s3_options) == manifest != older


def test_inventory_errors_are_one_line(ray_local, bucket, s3_options, s3_server):
    fs = s3fs.S3FileSystem(**s3_options)
    fs.pipe_file(f"{bucket}/in/a.png", image_bytes(3, 3))
    destination = f"{bucket}-inventory"
    make_bucket(s3_server, destination)
    manifest = write_inventory(fs, bucket, destination, "CSV")
    wrong = job_config(f"s3://{bucket}-other/in", f"s3://{bucket}/out", input={"inventory": manifest})
    wrong["input"]["storage_options"] = wrong["output"]["storage_options"] = s3_options
    with pytest.raises(ConfigError, match=f"lists bucket '{bucket}', but input.uri .* is in bucket '{bucket}-other'"):
        plan_of(wrong)
    orc = json.loads(fs.cat_file(manifest.removeprefix("s3://")))
    fs.pipe_file(f"{destination}/orc/manifest.json", json.dumps({**orc, "fileFormat": "ORC"}).encode())
    with pytest.raises(ConfigError, match="is a 'ORC' inventory; configure the inventory as CSV or Parquet"):
        listing.read_manifest(f"s3://{destination}/orc/manifest.json", s3_options)
    with pytest.raises(ConfigError, match="no inventory manifest at"):
        listing.read_manifest(f"s3://{destination}/missing/manifest.json", s3_options)
    with pytest.raises(ConfigError, match="is not an s3:// URI"):
        validate_config(job_config("/data/in", "/data/out", input={"inventory": manifest}))
