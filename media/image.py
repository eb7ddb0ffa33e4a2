"""Photos: decoding and encoding of catalog images: every input either becomes pixels plus the metadata needed to write
it back faithfully, or fails alone with a classified `MediaError`.

Decisions (each is a trade-off an operator may ask about):

- Pixels are returned in one of four layouts, L, LA, RGB or RGBA, with EXIF orientation already applied, as uint8,
  or uint16 for 16-bit PNG/TIFF (Pillow would silently truncate 16-bit colour to 8 bits, so those go through
  imagecodecs' libpng and tifffile).
- Palette images become RGB (L for an all-gray palette), plus alpha when they carry transparency, and are written
  back as such: quantising an upscaled image to a palette is lossy, so only GIF (which has no other option) is
  re-quantised (median cut, Floyd-Steinberg).
- CMYK sources are decoded with Pillow's (not colour-managed) CMYK->RGB conversion and written back as CMYK to JPEG
  and TIFF with their CMYK ICC profile, using the exact inverse of that conversion with full grey-component
  replacement; other formats get RGB without the CMYK profile.
- Alpha is kept wherever the output format stores it; formats without alpha (JPEG, BMP) get the image composited
  over white, GIF gets 1-bit transparency (alpha < 0.5).
- Animated GIF/WebP/AVIF, multi-image HEIF, multi-page TIFF and MPO JPEGs: only the first frame is decoded and
  written; `ImageInfo.frame_count` records how many there were.
- Grayscale sources are written back as grayscale (Rec. 601 luma, Pillow's weights) where the format has it.
- 16-bit sources are written at 16 bits to PNG and TIFF (gray+alpha as RGBA in TIFF), at 8 bits elsewhere;
  HEIF/AVIF with more than 8 bits are decoded to 8 bits (pillow-heif's and Pillow's default).
- ICC profile, EXIF (orientation reset to 1, pixel-dimension tags set to the new size) and XMP (orientation reset
  to 1) are written to JPEG, PNG, WebP, TIFF, AVIF and HEIF; a profile is only attached when its colour space
  matches the written pixels. TIFF gets EXIF's IFD0 tags but not its Exif/GPS sub-IFDs (no TIFF writer here can
  write them). An EXIF block that cannot be parsed is dropped rather than failing the photo.
- Every encoder setting that could vary between machines is pinned, so equal pixels and info give equal bytes.
- DPX and OpenEXR (film scans, VFX) are decoded and encoded by FFmpeg's codecs (``film.py``, which documents
  their decisions): DPX at its bit depth (10/12-bit codes as uint16 at full scale), EXR as float32 whose colour
  is converted from scene-linear to the sRGB curve, clipped to [0, 1] (highlights above 1.0 are clipped), and
  back on output; neither carries ICC, EXIF or XMP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import BinaryIO

import imagecodecs
import numpy as np
import pillow_heif
import tifffile
from PIL import ExifTags, Image, PngImagePlugin, UnidentifiedImageError

from . import film
from .errors import (
    CorruptImageError,
    EmptyFileError,
    EncodeError,
    NotAnImageError,
    TooLargeForFormatError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedImageError,
)

pillow_heif.register_heif_opener()
Image.init()  # load every Pillow plugin now: _sniff reads their signature checks from Image.OPEN


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What `encode_image` needs to write an image back like its source."""

    format: str  # Pillow's name for the source format: JPEG, MPO, PNG, WEBP, TIFF, BMP, GIF, AVIF, HEIF; DPX, EXR
    # Pillow's mode of the source ("P", "CMYK", "1", ...); "<layout>;16" for 16-bit sources; DPX/EXR: FFmpeg's
    # pixel format of the decoded source ("gbrp10le", "gbrpf16le", ...)
    mode: str
    channels: str  # layout of the decoded pixels: L, LA, RGB or RGBA
    # bits per sample of the source, kept in the output where the format allows: 8 or 16; DPX also 10 and 12;
    # EXR 16 (half) or 32 (float). Above 8 bits PNG and TIFF get 16.
    bit_depth: int
    has_alpha: bool
    width: int  # after orientation
    height: int
    orientation: int  # the source's EXIF orientation (1-8), already applied to the pixels
    frame_count: int  # frames/pages/images in the source; only the first is decoded
    icc_profile: bytes | None
    exif: bytes | None  # as in the source; orientation is reset to 1 when written
    xmp: bytes | None
    # Format-specific settings to write the source's format back like it: DPX byte order, transfer and
    # colorimetric codes, EXR compression.
    format_options: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    # HxWxC, C = len(info.channels) (1-4): uint8, uint16 (9-16 bit sources, at full 16-bit scale) or float32 in
    # [0, 1] (EXR, sRGB-encoded); may be read-only
    pixels: np.ndarray
    info: ImageInfo


@dataclasses.dataclass(frozen=True)
class _Format:
    pillow: str  # Pillow's save format name
    extension: str
    modes: tuple[str, ...]  # 8-bit modes the format stores, in Pillow's names
    modes16: tuple[str, ...]  # modes it stores at 16 bits per sample
    metadata: bool  # stores ICC profile, EXIF and XMP
    max_side: int | None  # largest width/height the format, or the codec that writes or reads it, handles


_FORMATS = {
    "png": _Format("PNG", ".png", ("L", "LA", "RGB", "RGBA"), ("L", "LA", "RGB", "RGBA"), True, None),
    "jpeg": _Format("JPEG", ".jpg", ("L", "RGB", "CMYK"), (), True, 65500),
    "webp": _Format("WEBP", ".webp", ("RGB", "RGBA"), (), True, 16383),
    # No 16-bit gray+alpha: Pillow cannot read that TIFF layout back.
    "tiff": _Format("TIFF", ".tif", ("L", "LA", "RGB", "RGBA", "CMYK"), ("L", "RGB", "RGBA"), True, None),
    "bmp": _Format("BMP", ".bmp", ("L", "RGB"), (), False, None),
    "gif": _Format("GIF", ".gif", ("L", "RGB", "RGBA"), (), False, 65535),
    # libavif refuses to decode sides above 32768; x265 to encode HEVC beyond level 6.2's sqrt(8 * 35651584).
    "avif": _Format("AVIF", ".avif", ("L", "RGB", "RGBA"), (), True, 32768),
    "heic": _Format("HEIF", ".heic", ("L", "RGB", "RGBA"), (), True, 16888),
    # Written by FFmpeg's encoders at the depth `film.encode` chooses (modes16 unused); no metadata chunks.
    "dpx": _Format("DPX", ".dpx", ("L", "RGB", "RGBA"), (), False, None),
    "exr": _Format("EXR", ".exr", ("L", "RGB", "RGBA"), (), False, None),
}
_ALIASES = {"jpg": "jpeg", "tif": "tiff", "heif": "heic"}
# Pillow format name of a source -> output format key for output_format="same".
_SOURCE_FORMATS = {
    "JPEG": "jpeg",
    "MPO": "jpeg",  # multi-picture JPEG as written by many cameras and phones
    "PNG": "png",
    "WEBP": "webp",
    "TIFF": "tiff",
    "BMP": "bmp",
    "GIF": "gif",
    "AVIF": "avif",
    "HEIF": "heic",
    "DPX": "dpx",  # by FFmpeg's codecs (film.py), never Pillow
    "EXR": "exr",
}
_FILM_FORMATS = (film.DPX, film.EXR)
_FILM_HEADER_BYTES = 1 << 16  # holds a DPX header (2 KiB) and any EXR header short of huge custom attributes
# Pillow's JPEG opener returns MPO itself.
_OPEN_FORMATS = tuple(f for f in _SOURCE_FORMATS if f != "MPO" and f not in _FILM_FORMATS)
OUTPUT_FORMATS = ("same", *_FORMATS)
SUPPORTED_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".avif", ".heic", ".heif",
     ".hif", ".dpx", ".exr"}
)

# Pillow modes of 8-bit sources -> decoded layout. "P" depends on transparency; anything else is unsupported.
_LAYOUTS = {"1": "L", "L": "L", "LA": "LA", "La": "LA", "PA": "RGBA", "RGB": "RGB", "RGBX": "RGB",
            "YCbCr": "RGB", "CMYK": "RGB", "RGBA": "RGBA", "RGBa": "RGBA"}
_CHANNEL_LAYOUTS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # Rec. 601, as Pillow's convert("L")
_ICC_SPACES = {b"GRAY": ("L", "LA"), b"RGB ": ("RGB", "RGBA"), b"CMYK": ("CMYK",)}
# EXIF tags worth carrying from a TIFF's IFD0, which also holds the TIFF's own structure (strips, bits, ...).
_TIFF_EXIF_TAGS = (270, 271, 272, 274, 305, 306, 315, 33432)
_XMP_ORIENTATION = (
    re.compile(rb'(tiff:Orientation=["\'])[0-9]'),
    re.compile(rb"(<tiff:Orientation>)[0-9]"),
)
# libaom's bitstream depends on its thread count (1 differs from more), so it is pinned: workers with different
# core counts must write identical bytes.
_AVIF_THREADS = 4


def output_extension(source_name: str, output_format: str) -> str:
    """The extension (with dot) of the output for `source_name`; "same" keeps the source's extension as written."""
    key = _format_key(output_format)
    if key == "same":
        return PurePosixPath(source_name).suffix
    return _FORMATS[key].extension


def to_float_pixels(pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels -> float32 RGB(A) in [0, 1], the input `encode_image` expects back: gray is replicated."""
    scale = np.float32(np.iinfo(pixels.dtype).max) if pixels.dtype.kind == "u" else np.float32(1)  # EXR: float
    values = pixels.astype(np.float32) / scale
    if values.shape[2] in (1, 2):  # L, LA
        values = np.concatenate([np.repeat(values[..., :1], 3, axis=-1), values[..., 1:]], axis=-1)
    return values


def decode_image(data: bytes, name: str, max_pixels: int) -> DecodedImage:
    """Decode the first frame of an image file; `name` is only used in error messages.

    The pixel count is checked against `max_pixels` from the header, before any pixel data is decoded.
    """
    if not data:
        raise EmptyFileError(f"{name}: file is empty (0 bytes)")
    if film.sniff(data):
        return _decode_film(data, name, max_pixels)
    kind = _sniff(data)
    with _classified(name, kind):
        im = _open(data, name, kind)
        width, height = im.size
        if width * height > max_pixels:
            raise TooManyPixelsError(
                f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                f"(checked from the {im.format} header, nothing decoded)"
            )
        if im.format == "PNG":
            # Pillow checks chunk CRCs only on verify(); without it a damaged IDAT can decode to wrong pixels.
            Image.open(io.BytesIO(data)).verify()
        frame_count = getattr(im, "n_frames", 1)
        source_exif = im.getexif()
        orientation = source_exif.get(ExifTags.Base.Orientation, 1)
        if orientation not in range(1, 9):
            orientation = 1
        exif = _tiff_exif(source_exif) if im.format == "TIFF" else _parseable_exif(im.info.get("exif"))
        xmp = im.info.get("xmp")
        icc = im.info.get("icc_profile") or None
        mode = im.mode
        pixels, layout, oriented = _read_pixels(im, data, name)
    if pixels.dtype == np.uint16:
        mode = f"{layout};16"
    if not oriented:
        pixels = _apply_orientation(pixels, orientation)
    info = ImageInfo(
        format=im.format,
        mode=mode,
        channels=layout,
        bit_depth=pixels.dtype.itemsize * 8,
        has_alpha=layout.endswith("A"),
        width=pixels.shape[1],
        height=pixels.shape[0],
        orientation=orientation,
        frame_count=frame_count,
        icc_profile=icc,
        exif=exif or None,
        xmp=(xmp.encode() if isinstance(xmp, str) else xmp) or None,
    )
    return DecodedImage(pixels=pixels, info=info)


def image_size(handle: BinaryIO, name: str) -> tuple[int, int]:
    """(width, height) as stored, from the header of the image file open in `handle` (for dry-run estimates: reads
    the first bytes only; EXIF orientation not applied)."""
    head = handle.read(_FILM_HEADER_BYTES)
    if film.sniff(head):
        return film.picture_size(head, name)
    handle.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(handle).size


def _decode_film(data: bytes, name: str, max_pixels: int) -> DecodedImage:
    decoded = film.decode(data, name, max_pixels)
    height, width = decoded.pixels.shape[:2]
    info = ImageInfo(format=decoded.format, mode=decoded.pix_fmt, channels=decoded.layout,
                     bit_depth=decoded.bit_depth, has_alpha=decoded.layout.endswith("A"), width=width, height=height,
                     orientation=1, frame_count=1, icc_profile=None, exif=None, xmp=None,
                     format_options=decoded.options)
    return DecodedImage(pixels=decoded.pixels, info=info)


def encode_image(pixels: np.ndarray, info: ImageInfo, output_format: str, quality: int) -> tuple[bytes, str]:
    """Encode float RGB(A) pixels in [0, 1] like the source described by `info`; returns (bytes, extension).

    `quality` (1-100) applies to JPEG, WebP, AVIF and HEIF. "same" writes the source's format.
    """
    key = _format_key(output_format)
    spec = _FORMATS[_SOURCE_FORMATS[info.format] if key == "same" else key]
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected HxWx3 or HxWx4 pixels, got shape {pixels.shape}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    height, width = pixels.shape[:2]
    if spec.max_side is not None and max(width, height) > spec.max_side:
        raise TooLargeForFormatError(
            f"{width}x{height} output exceeds {spec.pillow}'s limit of {spec.max_side} pixels per side"
        )
    # fmax/fmin also send NaN to 0 and infinities to the bounds, in two cheap passes.
    pixels = np.fmin(np.fmax(pixels.astype(np.float32, copy=False), 0.0), 1.0)
    alpha = pixels.shape[2] == 4
    if alpha and (info.format == film.EXR) != (spec.pillow == film.EXR):  # EXR's colour is premultiplied
        pixels = film.unpremultiply(pixels) if info.format == film.EXR else film.premultiply(pixels)
    sixteen = info.bit_depth > 8 and bool(spec.modes16)
    mode = _output_mode(info, alpha, spec.modes16 if sixteen else spec.modes)
    samples = _to_mode(pixels, mode)
    if spec.pillow in _FILM_FORMATS:
        same = info.format == spec.pillow
        return film.encode(samples, mode, spec.pillow, info.bit_depth, info.format_options if same else ()), \
            spec.extension
    samples = np.rint(samples * (65535 if sixteen else 255)).astype(np.uint16 if sixteen else np.uint8)
    icc = exif = xmp = None
    if spec.metadata:
        if info.icc_profile and mode in _ICC_SPACES.get(info.icc_profile[16:20], ()):
            icc = info.icc_profile
        if info.exif:
            exif = _output_exif(info.exif, width, height)
        if info.xmp:
            xmp = _XMP_ORIENTATION[1].sub(rb"\g<1>1", _XMP_ORIENTATION[0].sub(rb"\g<1>1", info.xmp))
    try:
        if spec.pillow == "TIFF":
            data = _write_tiff(samples, mode, icc, exif, xmp)
        elif sixteen:
            data = _write_png16(samples, icc, exif, xmp)
        else:
            data = _write_pillow(samples, mode, spec, quality, icc, exif, xmp)
    except (OSError, ValueError, RuntimeError) as e:
        raise EncodeError(
            f"{spec.pillow} encoder failed for a {width}x{height} {mode} image: {type(e).__name__}: {e}"
        ) from e
    return data, spec.extension


def _format_key(output_format: str) -> str:
    key = output_format.lower()
    key = _ALIASES.get(key, key)
    if key not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    return key


@contextlib.contextmanager
def _classified(name: str, kind: str) -> Iterator[None]:
    """Turn the exceptions codecs raise on bad data into MediaErrors that name the cause."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own global pixel limit; `max_pixels` is the limit that governs here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError as e:
        raise TooManyPixelsError(f"{name}: {e} (Pillow's own limit, Image.MAX_IMAGE_PIXELS)") from e
    except EOFError as e:
        raise TruncatedImageError(f"{name}: truncated {kind} data: unexpected end of file") from e
    except (OSError, SyntaxError, ValueError, RuntimeError, struct.error, zlib.error) as e:
        cause = f"{type(e).__name__}: {e}"
        if any(sign in str(e).lower() for sign in ("truncat", "end of file")):
            raise TruncatedImageError(f"{name}: truncated {kind} data ({cause})") from e
        raise CorruptImageError(f"{name}: corrupt {kind} data ({cause})") from e


def _sniff(data: bytes) -> str:
    """The supported format whose signature `data` starts with (by Pillow's own checks), else "image"."""
    for fmt in _OPEN_FORMATS:
        accept = Image.OPEN[fmt][1]
        if accept is not None and accept(data[:16]):
            return fmt
    return "image"


def _open(data: bytes, name: str, kind: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        pass
    if kind != "image":
        # Image.open hides why the matching plugin refused the file: ask that plugin alone, to report the cause.
        Image.OPEN[kind][0](io.BytesIO(data))
        raise CorruptImageError(f"{name}: has a {kind} signature but Pillow cannot parse its header")
    try:
        other = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise NotAnImageError(
            f"{name}: not an image: its {len(data)} bytes match no supported format (they start with {data[:8]!r})"
        ) from None
    raise UnsupportedImageError(
        f"{name}: {other.format} images are not supported (supported: {', '.join(sorted(_SOURCE_FORMATS))})"
    )


def _read_pixels(im: Image.Image, data: bytes, name: str) -> tuple[np.ndarray, str, bool]:
    """Pixels of the first frame, their layout, and whether the decoder already applied the orientation."""
    if im.format == "PNG" and data[24] == 16:  # IHDR bit depth
        pixels = imagecodecs.png_decode(data).reshape(im.height, im.width, -1)
        return pixels, _CHANNEL_LAYOUTS[pixels.shape[2]], False
    if im.format == "TIFF" and 16 in np.atleast_1d(im.tag_v2.get(258, 8)):  # BitsPerSample
        return (*_read_tiff16(data, name), False)
    im.load()
    if im.mode == "P":
        # Through RGB(A), which resolves palette transparency; an all-gray palette stays gray.
        rgb = "RGBA" if im.has_transparency_data else "RGB"
        pixels = np.asarray(im.convert(rgb))
        palette = np.asarray(im.getpalette("RGB")).reshape(-1, 3)
        if (palette == palette[:, :1]).all():
            rgb, pixels = rgb.replace("RGB", "L"), pixels[..., [0, 3] if rgb == "RGBA" else [0]]
        layout = rgb
    elif im.mode in _LAYOUTS:
        layout = _LAYOUTS[im.mode]
        pixels = np.asarray(im.convert(layout) if im.mode != layout else im)
    else:
        raise UnsupportedImageError(f"{name}: {im.format} images in Pillow mode {im.mode!r} are not supported")
    # Pillow's TIFF plugin transposes by the orientation tag itself while loading.
    return pixels.reshape(im.height, im.width, len(layout)), layout, im.format == "TIFF"


def _read_tiff16(data: bytes, name: str) -> tuple[np.ndarray, str]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        photometric = page.photometric
        pixels = page.asarray()
        if page.axes.startswith("S"):  # planar configuration: samples stored plane by plane
            pixels = np.moveaxis(pixels, 0, -1)
    pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)
    layouts = {
        tifffile.PHOTOMETRIC.MINISBLACK: {1: "L", 2: "LA"},
        tifffile.PHOTOMETRIC.RGB: {3: "RGB", 4: "RGBA"},
    }
    layout = layouts.get(photometric, {}).get(pixels.shape[2])
    if layout is None or pixels.dtype != np.uint16:
        raise UnsupportedImageError(
            f"{name}: 16-bit TIFF with photometric {photometric.name}, {pixels.shape[2]} samples and "
            f"{pixels.dtype} data is not supported"
        )
    return pixels, layout


def _apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip HxWxC pixels so that EXIF `orientation` becomes 1 (as Pillow's ImageOps.exif_transpose)."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a),
    }
    if orientation not in transforms:
        return pixels
    return np.ascontiguousarray(transforms[orientation](pixels))


def _tiff_exif(source: Image.Exif) -> bytes | None:
    """EXIF for a TIFF source: the descriptive IFD0 tags and the Exif/GPS IFDs, without the TIFF's structure."""
    exif = Image.Exif()
    for tag in _TIFF_EXIF_TAGS:
        if tag in source:
            exif[tag] = source[tag]
    ifds = [ifd for ifd in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo) if ifd in source]
    for ifd in ifds:
        exif.get_ifd(ifd).update(source.get_ifd(ifd))
    return exif.tobytes() if len(exif) or ifds else None


def _parseable_exif(raw: bytes | None) -> bytes | None:
    """`raw` if it is an EXIF block that can be rewritten on output; an unreadable one is dropped, not fatal."""
    if not raw:
        return None
    try:
        Image.Exif().load(raw)
    except (SyntaxError, ValueError, struct.error):
        return None
    return raw


def _output_exif(raw: bytes, width: int, height: int) -> bytes:
    exif = Image.Exif()
    exif.load(raw)
    if ExifTags.Base.Orientation in exif:
        exif[ExifTags.Base.Orientation] = 1
    if ExifTags.IFD.Exif in exif:
        ifd = exif.get_ifd(ExifTags.IFD.Exif)
        for tag, value in ((ExifTags.Base.ExifImageWidth, width), (ExifTags.Base.ExifImageHeight, height)):
            if tag in ifd:
                ifd[tag] = value
    return exif.tobytes()


def _output_mode(info: ImageInfo, alpha: bool, modes: tuple[str, ...]) -> str:
    """The first mode of the source's family among `modes`: alpha before gray, gray before colour."""
    if info.mode == "CMYK":
        candidates = ("CMYK", "RGB")
    elif info.channels in ("L", "LA"):
        candidates = ("LA", "RGBA", "L", "RGB") if alpha else ("L", "RGB")
    else:
        candidates = ("RGBA", "RGB") if alpha else ("RGB",)
    return next(m for m in candidates if m in modes)


def _to_mode(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Float HxWx3|4 RGB(A) -> float samples of `mode`; alpha a mode lacks is composited over white."""
    rgb, alpha = pixels[..., :3], pixels[..., 3:]
    if alpha.size and not mode.endswith("A"):
        rgb = rgb * alpha + (1.0 - alpha)
    if mode in ("L", "LA"):
        color = rgb @ _LUMA[:, None]
    elif mode == "CMYK":
        # Exact inverse of Pillow's CMYK->RGB, R = (1 - C)(1 - K), with full grey-component replacement.
        brightest = rgb.max(axis=-1, keepdims=True)
        cmy = 1.0 - np.divide(rgb, brightest, out=np.ones_like(rgb), where=brightest > 0)
        color = np.concatenate([cmy, 1.0 - brightest], axis=-1)
    else:
        color = rgb
    return np.concatenate([color, alpha], axis=-1) if mode.endswith("A") else color


def _write_pillow(
    samples: np.ndarray, mode: str, spec: _Format, quality: int, icc: bytes | None, exif: bytes | None,
    xmp: bytes | None,
) -> bytes:
    h, w = samples.shape[:2]
    if spec.pillow == "GIF" and mode != "L":
        image, options = _gif_palette(samples, mode)
    else:
        image, options = Image.frombytes(mode, (w, h), samples.tobytes()), {}
    if spec.pillow == "GIF":
        options["optimize"] = False  # an optimised gray palette reads back as a colour palette
    if spec.pillow in ("JPEG", "WEBP", "AVIF", "HEIF"):
        options["quality"] = quality
    if spec.pillow == "AVIF":
        options["max_threads"] = _AVIF_THREADS
    if icc:
        options["icc_profile"] = icc
    if exif:
        options["exif"] = exif
    if xmp:
        if spec.pillow == "PNG":
            options["pnginfo"] = _png_xmp(xmp)
        else:
            options["xmp"] = xmp
    out = io.BytesIO()
    image.save(out, spec.pillow, **options)
    return out.getvalue()


def _gif_palette(samples: np.ndarray, mode: str) -> tuple[Image.Image, dict]:
    """Quantise RGB(A) to a GIF palette; with alpha, index 255 is reserved for pixels with alpha < 0.5."""
    h, w = samples.shape[:2]
    rgb = Image.frombytes("RGB", (w, h), np.ascontiguousarray(samples[..., :3]).tobytes())
    colors = 255 if mode == "RGBA" else 256
    image = rgb.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    if mode != "RGBA":
        return image, {}
    transparent = Image.frombytes("L", (w, h), np.where(samples[..., 3] < 128, 255, 0).astype(np.uint8).tobytes())
    image.paste(255, mask=transparent)
    return image, {"transparency": 255}


def _png_xmp(xmp: bytes) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
    return info


def _write_png16(samples: np.ndarray, icc: bytes | None, exif: bytes | None, xmp: bytes | None) -> bytes:
    """16-bit PNG via libpng (Pillow cannot write 16-bit colour), with the metadata chunks Pillow would write."""
    png = imagecodecs.png_encode(samples if samples.shape[2] > 1 else samples[..., 0], level=6)
    chunks = io.BytesIO()
    if icc:
        PngImagePlugin.putchunk(chunks, b"iCCP", b"ICC Profile\0\0", zlib.compress(icc))
    if exif:
        PngImagePlugin.putchunk(chunks, b"eXIf", exif.removeprefix(b"Exif\0\0"))
    if xmp:
        for cid, data, _ in _png_xmp(xmp).chunks:
            PngImagePlugin.putchunk(chunks, cid, data)
    header_end = 8 + 8 + 13 + 4  # signature, then IHDR (always first, 13 bytes of data, CRC)
    return png[:header_end] + chunks.getvalue() + png[header_end:]


def _write_tiff(
    samples: np.ndarray, mode: str, icc: bytes | None, exif: bytes | None, xmp: bytes | None
) -> bytes:
    """TIFF via tifffile, the one writer here for 8 and 16 bits (Pillow cannot write 16-bit colour).

    Neither tifffile nor Pillow's libtiff writer can write EXIF sub-IFDs, so TIFF gets EXIF's descriptive IFD0
    tags (camera, date, artist, copyright, ...) but not the Exif and GPS IFDs.
    """
    tags = [(700, 1, len(xmp), xmp, True)] if xmp else []
    if exif:
        ifd0 = Image.Exif()
        ifd0.load(exif)
        tags += [(tag, "s", 0, ifd0[tag], True) for tag in _TIFF_EXIF_TAGS
                 if tag != ExifTags.Base.Orientation and isinstance(ifd0.get(tag), str)]
    photometric = {"L": "minisblack", "LA": "minisblack", "CMYK": "separated"}.get(mode, "rgb")
    out = io.BytesIO()
    tifffile.imwrite(
        out,
        samples if samples.shape[2] > 1 else samples[..., 0],
        photometric=photometric,
        planarconfig="contig" if samples.shape[2] > 1 else None,
        extrasamples=("unassalpha",) if mode.endswith("A") else None,
        compression="zlib",
        iccprofile=icc,
        extratags=tags,
        metadata=None,
    )
    return out.getvalue()
