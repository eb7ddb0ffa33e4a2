"""Finishing clips, once every segment of one is staged (``ClipFinisher``, on the driver, calls these as segments
come in).

* A video: its staged segment files are remuxed — packets copied, no second encode — with every audio and
  subtitle packet of the source into the output, built in a local temp file and committed atomically under its
  key; its manifest row follows, and only then are the staged segments removed (a crash in between leaves at
  worst staged files the next run sweeps, never a committed output without its row or a row without output).
* A frame sequence: its frames were written to their final keys by the segments, so finishing it only checks
  that they agree (one frame size) and sums them up in the sequence's row; with ``video.sequence_fps`` a Ray task
  then makes its movie from the committed frames (``sequence_movie``) before the row is committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Any

import ray

from media import video

from . import manifest, sequence_movie
from .plan import Plan
from .planner import Clip, SegmentTally
from .storage import Location


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _local_segments(output: Location, keys: list[str]):
    """Local paths of the staged segments: in place on local disks, else downloaded into a temp folder."""
    if output.is_local:
        yield [output.path(key) for key in keys]
        return
    with tempfile.TemporaryDirectory(prefix="dit4sr-segments-") as folder:
        paths = []
        for number, key in enumerate(keys):
            paths.append(os.path.join(folder, f"{number:06d}.segment"))
            output.fs.get_file(output.path(key), paths[-1])
        yield paths


def finish_video(row: dict[str, Any], segment_outputs: list[str], tally: SegmentTally, index: video.VideoIndex,
                 source: Location, output: Location, progressive: bool = True) -> dict[str, Any]:
    """Ray task: assemble and commit one video from its staged segment files (in order); returns its manifest row
    (``failed`` on any error)."""
    row = {**row, "started_at": manifest.utcnow()}
    temp = output.temp_path(row["output_key"])
    step = "assembly_failed"
    try:
        with _local_segments(output, segment_outputs) as paths, \
                source.fs.open(source.path(row["source_key"]), "rb", block_size=1 << 22) as handle:
            stats = video.assemble(handle, paths, temp, index, row["source_key"],
                                   container=os.path.splitext(row["output_key"])[1], progressive=progressive)
        sha256 = _sha256_file(temp)
        step = "write_failed"
        written = output.commit_file(row["output_key"], temp)
    except Exception as exc:  # noqa: BLE001 - this clip fails alone; its staged segments stay for a re-run
        error_type = getattr(exc, "error_type", step)
        row.update(status="failed", error_type=error_type, error_message=f"{type(exc).__name__}: {exc}"[:2000])
    else:
        row.update(status="ok", output_sha256=sha256, output_size=written.size,
                   output_etag_or_mtime=written.identity, frames_out=stats["frames"],
                   duration_out=stats["duration_s"], streams_copied=",".join(stats["streams_copied"]),
                   codec=stats["codec"], out_width=tally.out_size[0], out_height=tally.out_size[1],
                   **tally.flicker())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
    return _finished(row)


def finish_sequence(row: dict[str, Any], tally: SegmentTally) -> dict[str, Any]:
    """A frame sequence's row from its staged segments' tally (their frames are already at their final keys)."""
    row = {**row, "started_at": manifest.utcnow()}
    if len(tally.sizes) > 1:
        row.update(status="failed", error_type="sequence_mixed_sizes",
                   error_message=f"the sequence's frames have {len(tally.sizes)} sizes: {sorted(tally.sizes)}")
    else:
        (width, height), = tally.sizes
        row.update(status="ok", width=width, height=height, out_width=tally.out_size[0],
                   out_height=tally.out_size[1], frames_out=tally.frames_out, output_size=tally.output_size,
                   **tally.flicker())
    return _finished(row)


def _finished(row: dict[str, Any]) -> dict[str, Any]:
    row["finished_at"] = manifest.utcnow()
    row["seconds"] = (row["finished_at"] - row["started_at"]).total_seconds()
    return row


def remove_staged(output: Location, keys: list[str]) -> None:
    """Delete staged segment files (already gone is fine: a crash may have removed some)."""
    for key in keys:
        with contextlib.suppress(FileNotFoundError):
            output.remove(key)
    if output.is_local:  # object stores have no folders; local ones would stay behind empty
        for folder in {os.path.dirname(output.path(key)) for key in keys}:
            with contextlib.suppress(OSError):
                os.removedirs(folder)


class ClipFinisher:
    """Driver side: tallies staged segments per clip (counters, not rows) and finishes each clip once all of them
    are staged — videos in a Ray task (assembly reads the source's audio and writes the output), sequences right
    here."""

    def __init__(self, plan: Plan):
        self.clips, self.run_id = plan.clips, plan.run_id
        self.source, self.output = plan.spec.input.location, plan.spec.output.location
        self.pending: dict[ray.ObjectRef, Clip] = {}
        self.finished: list[dict[str, Any]] = []  # clip rows committed since the last drain_finished()
        self._finish = ray.remote(finish_video).options(num_cpus=1)
        self._movie, self.spec = ray.remote(sequence_movie.write_movie).options(num_cpus=1), plan.spec
        for clip in self.clips.values():  # clips whose segments were all staged by earlier runs
            self._maybe_finish(clip)

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row["unit"] != "segment":
                continue
            clip = self.clips[row["source_key"]]
            if row["status"] == "staged":
                clip.tally.add(row)
                self._maybe_finish(clip)
            elif clip.row.get("status") is None:  # the clip fails with its first failed segment
                frames = f"frames {row['frame_start']}-{row['frame_stop'] - 1}"
                self._commit({**clip.row, "status": "failed", "error_type": row["error_type"],
                              "error_message": f"{frames}: {row['error_message']}"[:2000]})
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        self._collect(ready)

    def wait(self) -> None:
        self._collect(list(self.pending))

    def drain_finished(self) -> list[dict[str, Any]]:
        """The clip rows committed since the last call (for the progress display; not kept)."""
        finished, self.finished = self.finished, []
        return finished

    def _maybe_finish(self, clip: Clip) -> None:
        if not clip.complete or clip.row.get("status") is not None:
            return
        clip.row["status"] = "finishing"
        if clip.index is None:
            row = finish_sequence(clip.row, clip.tally)
            if row["status"] == "ok" and clip.movie_key:  # video.sequence_fps: the frames also become a movie
                self.pending[self._movie.remote(row, clip.frame_outputs, clip.movie_key, self.output,
                                                self.spec)] = clip
            else:
                self._commit(row)
        else:
            self.pending[self._finish.remote(clip.row, clip.segment_outputs, clip.tally, clip.index, self.source,
                                             self.output, clip.progressive)] = clip

    def _collect(self, refs: list[ray.ObjectRef]) -> None:
        for ref, row in zip(refs, ray.get(refs)):
            clip = self.pending.pop(ref)
            self._commit(row)
            if row["status"] == "ok" and clip.index is not None:  # sequences stage nothing
                remove_staged(self.output, clip.segment_outputs + clip.staged_sources)

    def _commit(self, row: dict[str, Any]) -> None:
        self.clips[row["source_key"]].row["status"] = row["status"]
        manifest.write_part(self.output, self.run_id, [row])  # after the clip's output: rows follow outputs
        self.finished.append(row)
