"""Decoding and encoding media, each kind in its own module, behind one error hierarchy (``error_type``).

A layer of its own, below both users: the catalog (``pipeline``) and the model library's single-machine CLI
(``dit4sr.cli``) import it, and it imports neither.

* ``image``: photos, one file = one unit of work (decode -> pixels + metadata -> encode like the source); also
  the frames of frame sequences.
* ``film``: DPX and OpenEXR (film scans, VFX), through FFmpeg's codecs, behind ``image``'s decode/encode.
* ``video``: video files, cut into segments of frames that are units of work of their own.

``kind_of`` decides a listed key's kind from its extension, so planning never opens a file to route it: every
extension that is not a video container's (``.dpx`` and ``.exr`` included) is an image, and numbered images in
``video.sequence_folders`` are frame sequences (``pipeline.planner.group_inputs``).
"""

from __future__ import annotations

from .errors import MediaError
from .image import (
    OUTPUT_FORMATS,
    SUPPORTED_EXTENSIONS,
    DecodedImage,
    ImageInfo,
    decode_image,
    encode_image,
    image_size,
    output_extension,
    to_float_pixels,
)

IMAGE = "image"
VIDEO = "video"
# Containers PyAV (libavformat) demuxes; anything else listed is an image candidate.
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts",
                              ".m2ts", ".mxf", ".wmv", ".flv", ".3gp", ".ogv"})

__all__ = [
    "IMAGE",
    "VIDEO",
    "VIDEO_EXTENSIONS",
    "OUTPUT_FORMATS",
    "SUPPORTED_EXTENSIONS",
    "DecodedImage",
    "ImageInfo",
    "MediaError",
    "decode_image",
    "encode_image",
    "image_size",
    "key_suffix",
    "kind_of",
    "output_extension",
    "to_float_pixels",
]


def key_suffix(key: str) -> str:
    """``PurePosixPath(key).suffix`` of a normalised key, without building a path (planning routes millions)."""
    name = key[key.rfind("/") + 1:]
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def kind_of(key: str) -> str:
    """The media kind of a listed key (by extension). Unknown extensions are treated as images, whose decoder
    sniffs the bytes and reports what the file really is."""
    return VIDEO if key_suffix(key).lower() in VIDEO_EXTENSIONS else IMAGE
