"""A movie from each frame sequence (``video.sequence_fps``), besides its upscaled frames.

Where: once every frame of a sequence is committed (``clips.ClipFinisher``), a Ray task (``write_movie``) reads the
output frames back through the output location one at a time, encodes them with the catalog's video settings
(``media.video.movie``: codec, CRF, preset, pixel format and encoder options as for videos; frame i at i/fps; bit
depth kept as far as the codec goes, explicit colour tags) into a local file and commits it atomically; the
sequence's row follows, with the movie's key in ``movie_key``, its codec in ``codec`` and its length in
``duration_out``. A movie that cannot be made fails the sequence (``encode_failed``, ``write_failed``); its frames
stay committed and a re-run makes only the movie.

The movie's key depends on the sequence's key and the codec setting only (``movie_key``): the name before the
frame number, without trailing separators, in the sequence's folder, with the codec's container::

    reels/coffee/frame_%04d.png  ->  reels/coffee/frame.mp4     (auto, h264, h265; .mov: prores, dnxhr; .mkv: ffv1)
    reels/coffee/%06d.dpx        ->  reels/coffee/coffee.mp4    (no name before the number: the folder's)
    %04d.png                     ->  sequence.mp4               (at the root, unnamed)

Fingerprint: the rate and the encoder settings enter the sequence's fingerprint (``RunSpec.unit_fingerprint``), not
its segments': changing them remakes the movie, never the frames.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
from typing import Any

import media
from media.video.movie import MovieEncoder, movie_container, movie_settings

from . import manifest
from .spec import RunSpec, VideoSettings
from .storage import Location

_NUMBER = "%"  # sequence keys name the frame number printf-style: frame_%04d.png
_SEPARATORS = "_-. "


def movie_key(sequence_key: str, video: VideoSettings) -> str | None:
    """The movie's output key for a sequence (see the module notes); None when ``video.sequence_fps`` is unset."""
    if video.sequence_fps is None:
        return None
    path = pathlib.PurePosixPath(sequence_key)
    name = path.name[:path.name.rfind(_NUMBER)] if _NUMBER in path.name else path.stem
    name = name.rstrip(_SEPARATORS) or (path.parent.name if path.parent.name else "sequence")
    return str(path.parent / f"{name}{movie_container(video.encoding.codec)}")


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _frame(output: Location, key: str, max_pixels: int):
    """One committed output frame as float HxWx3 RGB in [0, 1] (gray replicated, alpha dropped), and its depth."""
    image = media.decode_image(output.read(key), key, max_pixels)
    return media.to_float_pixels(image.pixels)[..., :3], image.info.bit_depth


def encode_movie(output: Location, frame_keys: list[str], path: str, spec: RunSpec) -> dict[str, Any]:
    """Encode the committed frames at ``frame_keys`` (in order) into the local file ``path``: one frame in memory at
    a time. Returns the encoder's stats."""
    first, depth = _frame(output, frame_keys[0], spec.limits.max_output_pixels)
    height, width = first.shape[:2]
    settings, index = movie_settings(spec.video.encoding, len(frame_keys), width, height, spec.video.sequence_fps,
                                     depth)
    encoder = MovieEncoder(path, index, settings, width, height)
    try:
        encoder.add(first, 0)
        del first
        for number, key in enumerate(frame_keys[1:], start=1):
            frame, _ = _frame(output, key, spec.limits.max_output_pixels)
            try:
                encoder.add(frame, number)
            except ValueError as exc:  # another size than frame 0's
                raise media.MediaError(f"{key}: {exc}") from exc
        return encoder.finish()
    except BaseException:
        encoder.abort()
        raise


def write_movie(row: dict[str, Any], frame_keys: list[str], key: str, output: Location,
                spec: RunSpec) -> dict[str, Any]:
    """Ray task: make, commit and describe one sequence's movie; returns the sequence's row (``failed`` with
    ``encode_failed`` or ``write_failed`` when the movie cannot be made)."""
    row = {**row, "movie_key": key}
    temp = output.temp_path(key)
    step = "encode_failed"
    try:
        stats = encode_movie(output, frame_keys, temp, spec)
        sha256 = _sha256_file(temp)
        step = "write_failed"
        written = output.commit_file(key, temp)
    except Exception as exc:  # noqa: BLE001 - this sequence fails alone; its frames stay committed
        row.update(status="failed", error_type=step,
                   error_message=f"movie {key}: {type(exc).__name__}: {exc}"[:2000])
    else:
        fps = spec.video.sequence_fps
        row.update(codec=stats["codec"], duration_out=stats["duration_s"],
                   processing=f"movie {key}: {stats['codec']} {stats['pix_fmt']}, {stats['frames']} frames at "
                              f"{fps} fps, {written.size} bytes, sha256 {sha256}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
    row["finished_at"] = manifest.utcnow()
    row["seconds"] = (row["finished_at"] - row["started_at"]).total_seconds()
    return row
