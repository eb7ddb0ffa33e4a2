"""The catalog job end to end on local folders with a real local Ray (bicubic engine, tiny images)."""

from __future__ import annotations

import hashlib
import io
import json
import pathlib

import duckdb
import pytest
from PIL import Image
from support.catalog import (
    image_bytes,
    job_config,
    manifests,
    outputs,
    run_index,
    small_catalog,
    write_catalog,
)

from pipeline.config import validate_config
from pipeline.run import EXIT_INPUTS_FAILED, EXIT_OK, run_job


def run(config: dict) -> int:
    return run_job(validate_config(config))


def runs(output: pathlib.Path) -> list:
    """Manifest rows per run, oldest first."""
    frame = manifests(output)
    return [frame[frame.run_id == run_id] for run_id in sorted(frame.run_id.unique())]


@pytest.fixture
def catalog(tmp_path) -> tuple[pathlib.Path, pathlib.Path, dict[str, bytes]]:
    files = small_catalog(6)
    write_catalog(tmp_path / "in", files)
    return tmp_path / "in", tmp_path / "out", files


def test_local_end_to_end(ray_local, catalog):
    source, output, files = catalog
    assert run(job_config(str(source), str(output))) == EXIT_OK

    written = outputs(output)
    assert sorted(written) == sorted(str(pathlib.PurePosixPath(k).with_suffix(".png")) for k in files)
    for key, data in files.items():
        with Image.open(io.BytesIO(data)) as original, \
                Image.open(io.BytesIO(written[str(pathlib.PurePosixPath(key).with_suffix(".png"))])) as upscaled:
            assert upscaled.size == (original.width * 2, original.height * 2)
            assert upscaled.format == "PNG"
    rows = manifests(output)
    assert len(rows) == len(files) and set(rows.status) == {"ok"}
    assert set(rows.source_key) == set(files)
    for row in rows.itertuples():
        out_path = output / row.output_key
        assert row.output_uri == f"{output}/{row.output_key}"
        assert row.output_sha256 == hashlib.sha256(out_path.read_bytes()).hexdigest()
        assert row.source_size == len(files[row.source_key])
        assert (row.out_width, row.out_height) == (row.width * 2, row.height * 2)
        assert row.seconds > 0 and row.finished_at >= row.started_at and row.worker
    assert rows.config_fingerprint.nunique() == 1
    # readable by DuckDB too, and the run summary sits beside the manifests
    count = duckdb.sql(f"select count(*) from read_parquet('{output}/_manifests/*/part-*.parquet') "
                       "where status = 'ok'").fetchall()[0][0]
    assert count == len(files)
    summary = json.loads(next(output.glob("_manifests/run=*/_summary.json")).read_text())
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (len(files), 0, 0)
    assert not list(output.rglob(".*.tmp"))
    assert len(list(output.glob("_manifests/run=*/part-*.parquet"))) == 1  # the run's parts were compacted


@pytest.mark.slow  # the fast tier's re-run is test_pipeline_s3's
def test_rerun_and_compute_changes_reprocess_nothing(ray_local, catalog):
    source, output, files = catalog
    assert run(job_config(str(source), str(output))) == EXIT_OK
    before = outputs(output)
    config = job_config(str(source), str(output), compute={"actors": {"min": 2, "max": 2}, "batch_size": 5})
    assert run(config) == EXIT_OK
    assert len(runs(output)) == 1  # skipped inputs get no rows: the second run counts them
    second = run_index(output).iloc[-1]
    assert (second.skipped, second.ok, second.exit_code, second.outcome) == (len(files), 0, 0, "ok")
    assert outputs(output) == before


@pytest.mark.slow
def test_output_is_independent_of_batching_and_actor_count(ray_local, catalog):
    source, output, files = catalog
    other = output.parent / "other"
    assert run(job_config(str(source), str(output), compute={"batch_size": 1, "actors": {"min": 1, "max": 1}})) == 0
    assert run(job_config(str(source), str(other), compute={"batch_size": 4, "actors": {"min": 2, "max": 2}})) == 0
    assert outputs(output) == outputs(other)
    first, second = manifests(output), manifests(other)
    assert dict(zip(first.source_key, first.seed)) == dict(zip(second.source_key, second.seed))


@pytest.mark.slow
def test_output_inside_input_is_refused_before_any_work(ray_local, catalog):
    from pipeline.config import ConfigError

    source, _, files = catalog
    with pytest.raises(ConfigError, match="inside input.uri"):
        run(job_config(str(source), str(source / "upscaled")))
    assert not (source / "upscaled").exists()
    config = job_config(str(source), str(source / "upscaled"), input={"exclude": ["upscaled/**"]})
    assert run(config) == EXIT_OK
    assert run(config) == EXIT_OK  # the second run does not pick up the first run's outputs
    assert (run_index(source / "upscaled").iloc[-1][["ok", "skipped"]] == [0, len(files)]).all()


def test_dry_run_lists_and_estimates_without_loading_the_model(catalog, capsys):
    source, output, files = catalog
    config = job_config(str(source), str(output), model={"path": "support.engines:never_load"})
    assert run_job(validate_config(config), dry_run=True) == EXIT_OK
    printed = capsys.readouterr().out
    for key, data in files.items():
        width, height = Image.open(io.BytesIO(data)).size
        assert f"process {key} -> {pathlib.PurePosixPath(key).with_suffix('.png')}  {width}x{height}  tiles=1" \
            in printed
    assert f"{len(files)} to process, 0 to skip, 0 rejected; estimated cost {len(files)} tiles x 1 steps" in printed
    assert not output.exists()  # nothing written, not even a manifest


INVALID = {
    "empty.png": (b"", "empty_file"),
    "truncated.jpg": (image_bytes(64, 48, "JPEG", seed=1)[:300], "truncated"),
    "text.png": (b"this is not an image at all\n" * 4, "not_an_image"),
    "bomb.png": (image_bytes(300, 300, "PNG", seed=2), "too_many_pixels"),
    "huge-output.png": (image_bytes(90, 90, "PNG", seed=3), "output_too_large"),
}


def _corrupt_chunk_png() -> bytes:
    data = bytearray(image_bytes(16, 16, "PNG", seed=4))
    index = data.index(b"IDAT") + 10  # flip bytes inside the image data; the chunk's CRC no longer matches
    data[index:index + 4] = bytes(b ^ 0xFF for b in data[index:index + 4])
    return bytes(data)


def test_invalid_inputs_fail_alone_with_clear_error_types(ray_local, tmp_path):
    files = {key: data for key, (data, _) in INVALID.items()}
    files["corrupt-chunk.png"] = _corrupt_chunk_png()
    good = {f"good{i}.png": image_bytes(8, 8, seed=10 + i) for i in range(3)}
    write_catalog(tmp_path / "in", {**files, **good})
    # one batch holds everything, so good inputs share their batch with every bad one
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), compute={"batch_size": 16},
                        limits={"max_input_pixels": 200 * 200, "max_output_pixels": 4 * 80 * 80})
    assert run(config) == EXIT_INPUTS_FAILED
    rows = manifests(tmp_path / "out").set_index("source_key")
    assert len(rows) == len(files) + len(good)
    for key, (_, error_type) in INVALID.items():
        assert (rows.loc[key, "status"], rows.loc[key, "error_type"]) == ("failed", error_type), key
        assert rows.loc[key, "error_message"]
    assert rows.loc["corrupt-chunk.png", "status"] == "failed"
    assert rows.loc["corrupt-chunk.png", "error_type"] in ("corrupt", "truncated")
    assert (rows.loc[list(good), "status"] == "ok").all()
    assert sorted(outputs(tmp_path / "out")) == sorted(good)
    summary = json.loads(next((tmp_path / "out").glob("_manifests/run=*/_summary.json")).read_text())
    assert summary["failed"] == len(files) and summary["failures_by_type"]["empty_file"] == 1


@pytest.mark.slow
def test_fake_gpus_one_per_actor(ray_local, marker_dir, tmp_path):
    write_catalog(tmp_path / "in", small_catalog(8))
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), model={"path": "support.engines:gpu_probe"},
                        compute={"gpus_per_actor": 1, "actors": {"min": 2, "max": 2}, "batch_size": 1})
    assert run(config) == EXIT_OK
    assigned = [p.read_text() for p in marker_dir.glob("gpus-*")]
    assert assigned and all(len(ids.split(",")) == 1 for ids in assigned)
    assert {ids for ids in assigned} <= {"0", "1"}
    assert manifests(tmp_path / "out").worker.nunique() == len(assigned)
