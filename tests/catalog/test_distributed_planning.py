"""Planning and folding as distributed work: the catalog split into many buckets planned by Ray tasks decides
exactly what one bucket on the driver decides (collisions, frame sequences, done units, changed sources, lost
outputs), and the unit state folded in buckets equals the state folded whole."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from support.catalog import image_bytes, job_config, write_catalog

from pipeline import manifest, plan, state
from pipeline.config import validate_config
from pipeline.run import EXIT_OK, run_job
from pipeline.spec import RunSpec
from pipeline.storage import Location


def decisions(cfg, **options):
    result = plan.make_plan(RunSpec.resolve(cfg, "r"), **options)
    todo = sorted((row["unit_key"], row["output_key"], row["source_size"], row["config_fingerprint"])
                  for row in result.todo)
    clips = {key: (clip.segment_keys, clip.tally.staged, clip.frame_outputs) for key, clip in result.clips.items()}
    rejected = sorted((row["source_key"], row["error_type"], row["error_message"]) for row in result.rejected)
    return todo, sorted(result.skipped), rejected, clips


@pytest.mark.slow
def test_planning_in_many_buckets_decides_what_one_bucket_decides(ray_local, tmp_path, monkeypatch):
    source, output = tmp_path / "in", tmp_path / "out"
    first = {f"album{i % 3}/p{i}.png": image_bytes(4 + i % 3, 4, seed=i) for i in range(12)}
    first.update({f"reel/frame_{n:04d}.png": image_bytes(5, 4, seed=100 + n) for n in range(1, 6)})
    write_catalog(source, first)
    config = job_config(str(source), str(output), video={"sequence_folders": ["reel", "scans"],
                                                         "segment_seconds": 0.1})
    cfg = validate_config(config)
    assert run_job(cfg) == EXIT_OK
    # Then: new photos, a changed one, a lost output, colliding inputs, a new sequence, an unsafe name.
    write_catalog(source, {"album0/p0.png": image_bytes(9, 9, seed=50), "new/a.png": image_bytes(3, 3),
                           "new/a.jpg": image_bytes(3, 3, "JPEG"), "album1/p1.jpg": image_bytes(3, 3, "JPEG"),
                           **{f"scans/s_{n:02d}.png": image_bytes(4, 4, seed=n) for n in range(3)},
                           "scans/gap_01.png": image_bytes(4, 4), "scans/gap_03.png": image_bytes(4, 4)})
    (output / "album2/p2.png").unlink()

    whole = decisions(cfg, in_tasks=False)
    monkeypatch.setattr(plan, "ROWS_PER_BUCKET", 3)  # several buckets for ~25 inputs
    assert decisions(cfg) == whole  # in Ray tasks
    assert decisions(cfg, in_tasks=False) == whole
    todo, skipped, rejected, clips = whole
    assert {unit for unit, *_ in todo} >= {"album0/p0.png", "album2/p2.png", "new/a.jpg", "scans/s_%02d.png#0-2"}
    assert "reel/frame_%04d.png" in skipped and "album0/p3.png" in skipped and len(skipped) == 10
    assert [(key, error) for key, error, _ in rejected] == [("album1/p1.png", "output_collision"),
                                                            ("new/a.png", "output_collision"),
                                                            ("scans/gap_%02d.png", "sequence_gap")]
    assert list(clips) == ["scans/s_%02d.png"]


def rows(run_id: str, keys: list[str], hour: int, status: str = "ok") -> pa.Table:
    when = dt.datetime(2026, 1, 1, hour, tzinfo=dt.timezone.utc)
    return manifest.to_table([manifest.empty_row(run_id=run_id, source_key=key, unit_key=key, unit="image",
                                                 status=status, output_key=key, finished_at=when,
                                                 source_etag_or_mtime=f"{run_id}-{key}") for key in keys])


@pytest.mark.parametrize("in_tasks", [False, True])
def test_folding_in_buckets_equals_folding_whole(ray_local, tmp_path, monkeypatch, in_tasks):
    def history(root):
        output = Location(str(root), {})
        for number, (keys, status) in enumerate([([f"k{i:02d}" for i in range(30)], "ok"),
                                                 ([f"k{i:02d}" for i in range(0, 30, 3)], "ok"),
                                                 ([f"k{i:02d}" for i in range(0, 30, 4)], "failed"),
                                                 ([f"k{i:02d}" for i in range(25, 40)], "ok")]):
            run_id = f"2026010{number}T000000000Z-r{number}"
            output.write_atomic(f"{manifest.run_dir(run_id)}/part-{number}.parquet",
                                manifest.table_bytes(rows(run_id, keys, number, status)))
            if number == 1:  # the state exists, then more runs come
                state.fold(output, in_tasks=in_tasks)
        return output

    whole = history(tmp_path / "whole")
    assert len(state.fold(whole, in_tasks=in_tasks)) == 2
    monkeypatch.setattr(state, "ROWS_PER_BUCKET", 4)
    split = history(tmp_path / "split")
    assert len(state.fold(split, in_tasks=in_tasks)) == 2
    tables = [state.read_state(output)[0].sort_by("unit_key") for output in (whole, split)]
    assert tables[0].equals(tables[1]) and tables[0].num_rows == 40
    latest = dict(zip(tables[0]["unit_key"].to_pylist(), tables[0]["run_id"].to_pylist()))
    assert latest["k00"] == "20260101T000000000Z-r1" and latest["k39"] == "20260103T000000000Z-r3"  # failed: not done
    assert latest["k04"] == "20260100T000000000Z-r0" and latest["k27"] == "20260103T000000000Z-r3"
    assert state.read_state(split)[1] == {f"2026010{n}T000000000Z-r{n}" for n in range(4)}


def test_the_streams_input_is_cut_where_it_is_read_and_capped(ray_local, monkeypatch):
    """The to-do blocks reach Ray Data as slices of a batch each, cut by the read tasks (not beforehand, where they
    would sit in the driver's memory), every row once; past ``MAX_STREAM_BLOCKS`` slices grow."""
    import ray

    tables = [pa.table({"n": list(range(start, start + size))}) for start, size in ((0, 10), (10, 0), (10, 7))]
    rows = plan.Rows([ray.put(tables[0]), tables[1], ray.put(tables[2])], 17)

    def blocks(dataset) -> list[list[int]]:
        return sorted(ray.get(ref)["n"].to_pylist() for bundle in dataset.iter_internal_ref_bundles()
                      for ref in bundle.block_refs)

    assert blocks(rows.dataset(4, 0.5)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16]]
    monkeypatch.setattr(plan, "MAX_STREAM_BLOCKS", 3)  # 17 rows in at most 3 blocks: 6 rows each
    assert blocks(rows.dataset(4, 0.5)) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13, 14, 15], [16]]
