"""Chaos: a catalog on (moto) S3 behind a proxy that throttles (503) and resets connections at random, upscaling
actors that kill themselves (each on its 5th image, until three have), and the job's driver SIGKILLed at random
moments (while it starts, and in the middle of the work) before a last run finishes.
In the end every input has exactly one ``ok`` row, every output is byte-identical to an uninterrupted run's,
and no temp file is left."""

from __future__ import annotations

import collections
import hashlib
import json
import random
import time

import pyarrow.dataset as pads
import pytest
import s3fs
from support.catalog import Job, image_bytes, job_config, session_ray_address
from support.fault_proxy import FaultProxy, random_faults

import media
from pipeline.config import validate_config
from pipeline.engine import BicubicEngine
from pipeline.manifest import MANIFEST_DIR, SCHEMA
from pipeline.run import EXIT_OK, run_job

INPUTS = 80
SEED = 20261126
FAULT_RATES = {"unavailable": 0.02, "slowdown": 0.01, "reset": 0.01, "reset_after": 0.01}


def _config(bucket: str, options: dict) -> dict:
    config = job_config(f"s3://{bucket}/in", f"s3://{bucket}/out", model={"path": "support.engines:chaos"},
                        compute={"batch_size": 8, "actors": {"min": 2, "max": 2}},
                        # a killed driver's lease expires in 3 s; the next run waits for it
                        run={"progress_interval_s": 5, "lock": {"ttl_s": 3, "wait_s": 60}})
    config["input"]["storage_options"] = config["output"]["storage_options"] = options
    return config


def _uninterrupted(files: dict[str, bytes]) -> dict[str, str]:
    """sha256 of each output as an uninterrupted run writes it: the photo stage's own decode, bicubic upscale and
    encode, in this process (a whole job would cost minutes here; test_error_types checks the job gives the same
    bytes)."""
    engine = BicubicEngine({"scale": 2})
    expected = {}
    for key, data in files.items():
        decoded = media.decode_image(data, key, 10**6)
        upscaled = engine.upscale(media.to_float_pixels(decoded.pixels), seed=0, prompt="")
        expected[key] = hashlib.sha256(media.encode_image(upscaled, decoded.info, "png", 95)[0]).hexdigest()
    return expected


def _objects(fs: s3fs.S3FileSystem, root: str) -> dict[str, str]:
    """sha256 of every object under ``root`` outside the manifests, by key relative to ``root``."""
    fs.invalidate_cache()
    return {key[len(root) + 1:]: hashlib.sha256(fs.cat_file(key)).hexdigest() for key in fs.find(root)
            if f"/{MANIFEST_DIR}/" not in key}


def _output_count(fs: s3fs.S3FileSystem, bucket: str) -> int:
    fs.invalidate_cache()
    return sum(f"/{MANIFEST_DIR}/" not in key for key in fs.find(f"{bucket}/out"))


def _ok_rows(fs: s3fs.S3FileSystem, root: str):
    """What a reader of ``<output>/_manifests/*/*.parquet`` sees, ok rows only."""
    fs.invalidate_cache()
    files = fs.glob(f"{root}/{MANIFEST_DIR}/*/*.parquet")
    rows = pads.dataset(files, schema=SCHEMA, format="parquet", filesystem=fs).to_table().to_pandas()
    return rows[rows.status == "ok"]


@pytest.mark.slow
def test_chaos_loses_and_duplicates_nothing(ray_local, marker_dir, bucket, s3_options, s3_server, tmp_path):
    rng = random.Random(SEED)
    fs = s3fs.S3FileSystem(**s3_options)
    files = {f"set{i % 7}/photo_{i:04d}.png": image_bytes(4 + i % 5, 3 + i % 4, seed=i) for i in range(INPUTS)}
    for key, data in files.items():
        fs.pipe_file(f"{bucket}/in/{key}", data)
    expected = _uninterrupted(files)

    # each actor process kills itself on its 5th image until three kills are recorded
    (marker_dir / "chaos.json").write_text(json.dumps({"kill_at": 5, "kill_budget": 3}))
    for old in marker_dir.glob("chaos-kill-*"):
        old.unlink()
    outcomes = []
    try:
        with FaultProxy(s3_server, random_faults(FAULT_RATES, SEED)) as proxy:
            config = _config(bucket, {**s3_options, "endpoint_url": proxy.url})
            env = {"RAY_ADDRESS": session_ray_address()}
            for attempt in ("starting", "working"):
                job = Job(config, tmp_path / f"{attempt}.yaml", env=env)
                if attempt == "starting":  # while it starts: planning, taking the run lock, starting actors
                    deadline = time.monotonic() + rng.uniform(1, 8)
                    kill_now = lambda: time.monotonic() > deadline  # noqa: E731
                else:  # in the middle of the work: after another 20-45% of the outputs (some batches committed)
                    target = _output_count(fs, bucket) + int(INPUTS * rng.uniform(0.2, 0.45))
                    kill_now = lambda: _output_count(fs, bucket) >= target  # noqa: E731
                while job.process.poll() is None and not kill_now():
                    time.sleep(0.1)
                if job.process.poll() is None:
                    job.kill()
                    outcomes.append("killed")
                else:
                    assert job.finish() == EXIT_OK, job.log
                    outcomes.append("finished")
            # the last run in this process (a job process of its own costs seconds of imports)
            assert run_job(validate_config(config)) == EXIT_OK
            outcomes.append("finished")
    finally:
        (marker_dir / "chaos.json").unlink()
    actor_kills = len(list(marker_dir.glob("chaos-kill-*")))

    rows = _ok_rows(fs, f"{bucket}/out")
    counts = collections.Counter(rows.source_key)
    lost = sorted(set(files) - set(counts))
    duplicated = sorted(key for key, count in counts.items() if count > 1)
    faults = dict(proxy.injected)
    print(f"\nchaos: {INPUTS} inputs, {len(outcomes)} runs ({outcomes.count('killed')} drivers SIGKILLed), "
          f"{sum(faults.values())} S3 faults injected and survived {faults}, {actor_kills} actors killed; "
          f"lost {len(lost)}, duplicated {len(duplicated)}")
    assert (lost, duplicated) == ([], [])
    assert set(counts) == set(files)
    assert rows.run_id.nunique() >= 2  # killed runs committed work that later runs kept, not redid

    outputs = _objects(fs, f"{bucket}/out")
    assert outputs == expected  # same keys, same bytes: no partial, stray, staged or temp object
    assert not [key for key in fs.find(f"{bucket}/out") if key.rsplit("/", 1)[-1].startswith(".")]
    assert dict(zip(rows.output_key, rows.output_sha256)) == expected
    assert sum(faults.values()) > 0 and outcomes.count("killed") > 0 and actor_kills > 0
