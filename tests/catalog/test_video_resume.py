"""Kill and resume at segment granularity, with the bundled DiT4SR model (where the seed matters): a SIGKILLed
job's staged segments are kept, the re-run redoes only the rest, and the film is byte-identical to an
uninterrupted run's."""

from __future__ import annotations

import pytest
from support import video_clips
from support.catalog import Job, job_config, manifests, session_ray_address

from pipeline.config import validate_config
from pipeline.run import EXIT_OK, run_job

SEGMENTS = 8


def _config(tmp_path, output: str) -> dict:
    return job_config(
        str(tmp_path / "in"), str(tmp_path / output), model={"path": "bundled"}, upscale={"scale": 4},
        video={"segment_seconds": 0.08},  # 2 frames at 25 fps: 8 segments of 16 frames
        compute={"batch_size": 1, "actors": {"min": 1, "max": 1}, "torch_threads": 1},
        # the killed run's lease must not hold the re-run for long: it expires in 3 s, the re-run waits for it
        run={"progress_interval_s": 1, "lock": {"ttl_s": 3, "wait_s": 60}})


@pytest.mark.slow
def test_killed_film_resumes_its_unfinished_segments_with_identical_bytes(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    video_clips.write_clip(tmp_path / "in" / "film.mp4", frames=2 * SEGMENTS, size=(24, 16), audio=True)
    assert run_job(validate_config(_config(tmp_path, "reference"))) == EXIT_OK

    staging = tmp_path / "out" / "_staging" / "film.mp4"
    job = Job(_config(tmp_path, "out"), tmp_path / "job.yaml", env={"RAY_ADDRESS": session_ray_address()})
    job.wait_for(lambda: len(list(staging.glob("*.nut"))) >= SEGMENTS // 2, "half the film staged")
    job.kill()  # the driver at once: Ray ends its job's actor and tasks
    assert not (tmp_path / "out" / "film.mp4").exists()
    staged_before = {path.name for path in staging.glob("*.nut")}

    # the re-run in this process, on the session's Ray (a job process of its own costs seconds of imports)
    assert run_job(validate_config(_config(tmp_path, "out"))) == EXIT_OK
    assert (tmp_path / "out" / "film.mp4").read_bytes() == (tmp_path / "reference" / "film.mp4").read_bytes()
    assert not staging.exists()

    rows = manifests(tmp_path / "out")
    last = rows[rows.run_id == rows.run_id.max()]
    redone = last[last.unit == "segment"]
    assert set(redone.status) == {"staged"}
    # the re-run staged exactly the segments the killed run had not (segments staged but not yet recorded in a
    # committed manifest part are redone: a part is committed per batch, after its files)
    recorded = rows[(rows.run_id != rows.run_id.max()) & (rows.unit == "segment")]
    assert set(redone.unit_key).isdisjoint(recorded.unit_key)
    assert len(redone) + len(recorded) == SEGMENTS and len(recorded) >= len(staged_before) - 1 > 0
    ok = rows[rows.status == "ok"]
    assert list(ok.source_key) == ["film.mp4"]  # exactly one ok row, in the re-run
