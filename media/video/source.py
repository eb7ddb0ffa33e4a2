"""Opening a source and classifying what is wrong with it: empty, not a video, truncated, damaged, or of a codec this
FFmpeg build cannot decode. A file FFmpeg decodes is never called corrupt: errors raised here name the cause."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

import av

from ..errors import (
    CorruptVideoError,
    EmptyFileError,
    NotAVideoError,
    NoVideoStreamError,
    TruncatedError,
    UnsupportedCodecError,
)

Source = BinaryIO | str | os.PathLike

@contextlib.contextmanager
def opened(file: Source, name: str) -> Iterator[av.container.InputContainer]:
    if file_size(file) == 0:
        raise EmptyFileError(f"{name}: file is empty (0 bytes)")
    if is_path(file):
        file = os.fspath(file)
    else:
        file.seek(0)
    try:
        container = av.open(file, metadata_errors="replace")
    except av.FFmpegError as error:
        raise _unopenable(file, name, error) from error
    try:
        yield container
    finally:
        container.close()


def is_path(file: Source) -> bool:
    return isinstance(file, (str, os.PathLike))


def file_size(file: Source) -> int:
    if is_path(file):
        return os.path.getsize(file)
    position = file.tell()
    size = file.seek(0, os.SEEK_END)
    file.seek(position)
    return size


def video_stream(container, name: str):
    candidates = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not candidates:
        kinds = ", ".join(s.type for s in container.streams) or "nothing"
        raise NoVideoStreamError(f"{name}: no video stream ({container.format.name} with {kinds})")
    best = container.streams.best("video")
    stream = best if best in candidates else candidates[0]
    if stream.codec_context is None:
        raise UnsupportedCodecError(
            f"{name}: the video stream's codec has no decoder in this FFmpeg build (PyAV {av.__version__})"
        )
    return stream


def copied_streams(container, name: str) -> list[tuple[str, str]]:
    copied = []
    for stream in container.streams:
        if stream.type not in ("audio", "subtitle"):
            continue
        if stream.codec_context is None:
            raise UnsupportedCodecError(
                f"{name}: {stream.type} stream #{stream.index} is of a codec this FFmpeg build does not know, so "
                "it cannot be copied"
            )
        copied.append((stream.type, stream.codec_context.codec.canonical_name))
    return copied


def truncation(file: Source, name: str, detail: str = "", boxes: bool = True) -> TruncatedError | None:
    """A TruncatedError when the container's own structure claims more bytes than the file has. `boxes=False`
    skips walking MP4 boxes (a read per top-level box: only worth it once something already went wrong; an intact
    MP4's sample tables catch a cut mdat)."""
    declared, size = _declared_size(file, boxes)
    if declared is not None and declared > size:
        return TruncatedError(f"{name}: {detail}the file is {size} bytes but its container structure spans {declared}")
    return None


def _unopenable(file: Source, name: str, error: Exception) -> Exception:
    if truncated := truncation(file, name):
        return truncated
    if _container_kind(file) is not None:
        return CorruptVideoError(f"{name}: the container cannot be opened: {error}")
    return NotAVideoError(f"{name}: not a video file FFmpeg recognises ({error})")


def damaged(file: Source, name: str, detail: str) -> Exception:
    return truncation(file, name, f"{detail}; ") or CorruptVideoError(f"{name}: {detail}")


def _read_at(file: Source, offset: int, length: int) -> bytes:
    if is_path(file):
        with open(file, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)
    position = file.tell()
    try:
        file.seek(offset)
        return file.read(length)
    finally:
        file.seek(position)


_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"meta", b"moof", b"mfra",
              b"styp", b"sidx", b"pdin"}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"


def _container_kind(file: Source) -> str | None:
    head = _read_at(file, 0, 12)
    if head[4:8] in _ISO_BOXES:
        return "iso"
    if head.startswith(_EBML_MAGIC):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    return None


def _declared_size(file: Source, boxes: bool) -> tuple[int | None, int]:
    """(bytes the container's top-level structure claims, actual size): ISO-BMFF boxes, the Matroska segment and
    the AVI RIFF chunk state their sizes, so a cut file shows. None when the structure does not say."""
    size = file_size(file)
    kind = _container_kind(file)
    if kind == "iso" and boxes:
        return _iso_extent(file, size), size
    if kind == "matroska":
        return _matroska_extent(file), size
    if kind == "avi":
        riff = struct.unpack("<I", _read_at(file, 4, 4))[0]
        return 8 + riff, size
    return None, size


def _iso_extent(file: Source, size: int) -> int | None:
    position = 0
    while position < size:
        header = _read_at(file, position, 16)
        if len(header) < 8:
            return position + 8
        box_size, kind = struct.unpack(">I4s", header[:8])
        if box_size == 1:
            if len(header) < 16:
                return position + 16
            box_size = struct.unpack(">Q", header[8:16])[0]
        elif box_size == 0:
            return None  # the last box runs to the end of the file
        if box_size < 8 or not kind.isascii():
            return None
        position += box_size
    return position


def _matroska_extent(file: Source) -> int | None:
    head = _read_at(file, 0, 64)
    header_size, offset = _ebml_vint(head, 4)
    position = offset + header_size
    segment = _read_at(file, position, 12)
    if segment[:4] != b"\x18\x53\x80\x67":
        return None
    segment_size, data_start = _ebml_vint(segment, 4)
    if segment_size is None:
        return None  # unknown size: a live recording
    return position + data_start + segment_size


def _ebml_vint(data: bytes, offset: int) -> tuple[int | None, int]:
    first = data[offset]
    length = 8 - first.bit_length() + 1
    value = first & (0xFF >> length)
    for byte in data[offset + 1 : offset + length]:
        value = (value << 8) | byte
    unknown = value == (1 << (7 * length)) - 1
    return (None if unknown else value), offset + length


