"""DPX and OpenEXR, the formats of film scans and VFX, decoded and encoded by FFmpeg's own codecs through PyAV.

Pixels never pass through a parser of ours: one packet holding the file's bytes goes to FFmpeg's ``dpx``/``exr``
decoder, and the ``dpx``/``exr`` encoder writes the output. The headers are read here only for what is needed
around FFmpeg: the size (the pixel limit is checked before anything is decoded), whether the file is complete
(FFmpeg's EXR decoder fills chunks missing at the end of a truncated file without an error), and what is written
back (DPX byte order, transfer and colorimetric codes; EXR compression).

Decisions:

- **DPX** code values are processed as stored, whatever the header's transfer characteristic says (printing
  density/log scans are upscaled in log; many writers, older FFmpeg among them, mark display-referred video as
  "linear"). Code values map to [0, 1] by the bit depth (10-bit 0..1023). 8-, 10-, 12- and 16-bit files are
  written back at their depth in the source's byte order, 10- and 12-bit RGB packed as FFmpeg writes them
  (32-bit words, method A); where FFmpeg's encoder has no layout at that depth (10/12-bit gray, 10/12-bit with
  alpha), at 16 bits. The output's transfer and colorimetric codes are the source's; the other header fields
  (film and TV headers: timecode, keycode, ...) are FFmpeg's defaults.
- **EXR** holds scene-linear values; the model works on display-referred [0, 1] RGB. Colour (RGB or Y) is
  converted from linear to the sRGB curve (IEC 61966-2-1) after clipping to [0, 1] and back to linear on output,
  so values in [0, 1] survive an unchanged round trip bit for bit at half precision, and **values above 1.0
  (highlights) and below 0 are clipped** (so are NaN/infinity, to 0 and the bounds). Primaries are not
  converted (ACES or wide-gamut EXRs come back in their own primaries). Alpha is not transferred: it is kept,
  clipped to [0, 1], and upscaled alongside the colour like any RGBA source's; colour stays premultiplied as
  OpenEXR stores it (it is un-premultiplied only when an EXR is written to another format, and a non-EXR source
  written as EXR is premultiplied). Half-float sources are written as half, float (and uint) ones as float, with
  the source's compression where FFmpeg's encoder has it (none, RLE, ZIPS, ZIP) and ZIP otherwise (lossless);
  channels other than R, G, B, A / Y (AOVs, depth, other layers or views) are not kept. The picture is the
  display window, as FFmpeg decodes it (data outside it is dropped, display area without data is 0); multi-part
  and deep files are `unsupported`. ZIP/ZIPS chunks are inflated once more here to find damage (FFmpeg leaves a
  chunk it cannot inflate black without an error); damage inside chunks of other compressions is found only
  where FFmpeg's decoder reports it.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import struct
import zlib

import av
import numpy as np

from .errors import (
    CorruptImageError,
    EncodeError,
    TooManyPixelsError,
    TruncatedImageError,
    UnsupportedImageError,
)

DPX = "DPX"
EXR = "EXR"
_DPX_MAGIC = {b"SDPX": ">", b"XPDS": "<"}
_EXR_MAGIC = b"v/1\x01"
_DPX_HEADER = 808  # generic file + first image element's descriptor, transfer, colorimetric, bit depth bytes
# EXR compression code -> scan lines per chunk (OpenEXR's table), and -> FFmpeg exr encoder option where it has it.
_EXR_LINES_PER_CHUNK = {0: 1, 1: 1, 2: 1, 3: 16, 4: 32, 5: 16, 6: 32, 7: 32, 8: 32, 9: 256}
_EXR_COMPRESSIONS = {0: "none", 1: "rle", 2: "zip1", 3: "zip16"}
_EXR_ZLIB = (2, 3)  # ZIPS, ZIP
_EXR_MULTIPART, _EXR_DEEP, _EXR_TILED = 0x1000, 0x800, 0x200


@dataclasses.dataclass(frozen=True)
class FilmImage:
    format: str  # DPX or EXR
    pixels: np.ndarray  # HxWxC: uint8 (8-bit), uint16 at full scale (9-16 bit), float32 sRGB-encoded in [0, 1] (EXR)
    layout: str  # L, LA, RGB or RGBA
    bit_depth: int  # of the source's samples: 8, 10, 12, 16 (DPX); 16 = half, 32 = float or uint (EXR)
    pix_fmt: str  # FFmpeg's pixel format of the decoded source
    options: tuple[tuple[str, str], ...]  # what the encoder needs to write it back like the source


def sniff(data: bytes) -> str | None:
    if data[:4] in _DPX_MAGIC:
        return DPX
    if data[:4] == _EXR_MAGIC:
        return EXR
    return None


def decode(data: bytes, name: str, max_pixels: int) -> FilmImage:
    kind = sniff(data)
    if kind == DPX:
        width, height, options, complete = _dpx_header(data, name)
    else:
        width, height, options, complete = _exr_header(data, name)
    if width * height > max_pixels:
        raise TooManyPixelsError(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                                 f"{max_pixels} (checked from the {kind} header, nothing decoded)")
    context = av.CodecContext.create(kind.lower(), "r")
    try:
        frames = context.decode(av.Packet(data)) + context.decode(None)
    except av.error.PatchWelcomeError as e:
        raise UnsupportedImageError(f"{name}: FFmpeg's {kind} decoder does not support this file ({e})") from e
    except av.FFmpegError as e:
        if not complete:
            raise TruncatedImageError(f"{name}: truncated {kind} data: {len(data)} bytes, the header declares "
                                      f"more (FFmpeg: {e})") from e
        raise CorruptImageError(f"{name}: corrupt {kind} data (FFmpeg's {kind.lower()} decoder: {e})") from e
    if not frames:
        raise CorruptImageError(f"{name}: FFmpeg's {kind.lower()} decoder returned no picture")
    frame = frames[0]
    pixels, layout, bits = _pixels(frame, name)
    if kind == EXR:
        bits = 16 if frame.format.components[0].bits == 16 else 32
        pixels = _exr_to_display(pixels, layout)
    return FilmImage(kind, pixels, layout, bits, frame.format.name, options)


def picture_size(head: bytes, name: str) -> tuple[int, int]:
    """(width, height) of the picture from the first bytes of a DPX/EXR file (its header; 64 KiB is plenty)."""
    if sniff(head) == DPX:
        if len(head) < _DPX_HEADER:
            raise TruncatedImageError(f"{name}: truncated DPX data: {len(head)} bytes, shorter than its header")
        return struct.unpack_from(_DPX_MAGIC[head[:4]] + "II", head, 772)
    x0, y0, x1, y1 = _exr_parse(head, name)[4]
    return x1 - x0 + 1, y1 - y0 + 1


def encode(samples: np.ndarray, mode: str, kind: str, bit_depth: int, options: tuple[tuple[str, str], ...]) -> bytes:
    """Float samples in [0, 1] of `mode` (L, RGB or RGBA; EXR: sRGB-encoded colour) -> a DPX/EXR file."""
    settings = dict(options)
    if kind == DPX:
        pix_fmt, bits = _dpx_pix_fmt(mode, bit_depth, settings.get("byte_order", "big"))
        codes = np.rint(samples * float(2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16)
        data = bytearray(_encode("dpx", pix_fmt, codes, {}))
        for key, offset in (("transfer", 801), ("colorimetric", 802)):
            if key in settings:
                data[offset] = int(settings[key])
        return bytes(data)
    linear = samples.astype(np.float32, copy=True)
    colour = 1 if mode == "L" else 3
    linear[..., :colour] = srgb_to_linear(linear[..., :colour])
    half = bit_depth <= 16
    if half:  # rounded to nearest here: FFmpeg's float->half conversion truncates
        linear = linear.astype(np.float16).astype(np.float32)
    pix_fmt = {"L": "grayf32le", "RGB": "gbrpf32le", "RGBA": "gbrapf32le"}[mode]
    encoder_options = {"format": "half" if half else "float", "compression": settings.get("compression", "zip16")}
    return _encode("exr", pix_fmt, linear, encoder_options)


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1's encoding curve, on values already in [0, 1]."""
    values = values.astype(np.float32, copy=False)
    curve = np.float32(1.055) * np.power(values, np.float32(1 / 2.4)) - np.float32(0.055)
    return np.where(values <= 0.0031308, values * np.float32(12.92), curve).astype(np.float32)


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float32, copy=False)
    curve = np.power((values + np.float32(0.055)) / np.float32(1.055), np.float32(2.4))
    return np.where(values <= 0.04045, values / np.float32(12.92), curve).astype(np.float32)


def premultiply(pixels: np.ndarray) -> np.ndarray:
    """sRGB-encoded straight-alpha RGBA -> sRGB-encoded colour whose linear values are premultiplied (EXR's)."""
    out = pixels.copy()
    out[..., :3] = linear_to_srgb(srgb_to_linear(pixels[..., :3]) * pixels[..., 3:])
    return out


def unpremultiply(pixels: np.ndarray) -> np.ndarray:
    """The inverse of `premultiply` where alpha > 0 (colour of fully transparent pixels is kept as it is)."""
    out = pixels.copy()
    alpha = pixels[..., 3:]
    linear = srgb_to_linear(pixels[..., :3])
    straight = np.divide(linear, alpha, out=linear.copy(), where=alpha > 0)
    out[..., :3] = linear_to_srgb(np.clip(straight, 0.0, 1.0))
    return out


# -- decoding ------------------------------------------------------------------------------------------------------
def _pixels(frame: av.VideoFrame, name: str) -> tuple[np.ndarray, str, int]:
    """HxWxC pixels of a decoded frame (integers at full scale of their dtype, floats as decoded), layout, bits."""
    fmt = frame.format
    components = fmt.components
    bits = components[0].bits
    alpha = any(c.is_alpha for c in components)
    if fmt.name.startswith(("gbrpf", "gbrapf", "grayf")):  # EXR: planar float, one plane per component
        dtype = np.dtype(("<" if fmt.name.endswith("le") else ">") + ("f2" if bits == 16 else "f4"))
        planes = []
        for component in components:
            plane = frame.planes[component.plane]
            rows = np.frombuffer(plane, dtype).reshape(frame.height, plane.line_size // dtype.itemsize)
            planes.append(rows[:, :frame.width].astype(np.float32))
        pixels = np.stack(planes, axis=-1)
    else:
        gray = len(components) - alpha == 1
        try:
            pixels = frame.to_ndarray()
        except ValueError:  # a layout PyAV cannot hand over as is (YCbCr DPX, ABGR, ...): via 8/16-bit RGB(A)
            target = ("rgba" if alpha else "rgb24") if bits <= 8 else ("rgba64le" if alpha else "rgb48le")
            pixels, gray = frame.reformat(format=target).to_ndarray(), False
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if gray and pixels.shape[2] > 2:
            raise UnsupportedImageError(f"{name}: decoded pixel format {fmt.name} is not supported")
        if 8 < bits < 16:  # 10/12-bit codes -> full 16-bit scale, exactly invertible by the encoder's rounding
            pixels = np.rint(pixels.astype(np.float64) * (65535 / (2**bits - 1))).astype(np.uint16)
        elif bits > 16 or pixels.dtype not in (np.uint8, np.uint16):
            raise UnsupportedImageError(f"{name}: decoded pixel format {fmt.name} is not supported")
    layouts = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    return np.ascontiguousarray(pixels), layouts[pixels.shape[2]], bits


def _exr_to_display(pixels: np.ndarray, layout: str) -> np.ndarray:
    colour = 1 if layout in ("L", "LA") else 3
    pixels = np.clip(np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    pixels[..., :colour] = linear_to_srgb(pixels[..., :colour])
    return pixels.astype(np.float32, copy=False)


def _dpx_header(data: bytes, name: str) -> tuple[int, int, tuple[tuple[str, str], ...], bool]:
    """(width, height, options, complete) from the generic header; `complete`: the file is as long as it says."""
    if len(data) < _DPX_HEADER:
        raise TruncatedImageError(f"{name}: truncated DPX data: {len(data)} bytes, shorter than its header")
    order = _DPX_MAGIC[data[:4]]
    image_offset, = struct.unpack_from(order + "I", data, 4)
    file_size, = struct.unpack_from(order + "I", data, 16)
    width, height = struct.unpack_from(order + "II", data, 772)
    if image_offset > len(data):
        raise TruncatedImageError(f"{name}: truncated DPX data: image data starts at byte {image_offset}, the file "
                                  f"has {len(data)}")
    options = [("byte_order", "big" if order == ">" else "little")]
    transfer, colorimetric = data[801], data[802]
    if transfer <= 12:  # SMPTE 268M's defined codes; 255 and others: undefined, left to the encoder
        options.append(("transfer", str(transfer)))
    if colorimetric <= 12:
        options.append(("colorimetric", str(colorimetric)))
    return width, height, tuple(options), len(data) >= file_size


def _exr_header(data: bytes, name: str) -> tuple[int, int, tuple[tuple[str, str], ...], bool]:
    """(width, height, options, True) from the header; raises TruncatedImageError when a chunk the offset table
    names is missing or cut short (FFmpeg's decoder would fill it with zeros, or garbage, without an error)."""
    attributes, table, flags, (x0, y0, x1, y1), (dx0, dy0, dx1, dy1), compression = _exr_parse(data, name)

    def truncated(what: str) -> TruncatedImageError:
        return TruncatedImageError(f"{name}: truncated EXR data ({len(data)} bytes): {what}")

    chunks = _exr_chunks(data, table, flags & _EXR_TILED, y1 - y0 + 1, compression, truncated)
    if compression in _EXR_ZLIB and not flags & _EXR_TILED:
        _exr_check_zlib(data, chunks, _exr_line_bytes(attributes.get("channels", b""), x1 - x0 + 1),
                        _EXR_LINES_PER_CHUNK[compression], y1 - y0 + 1, name)
    options = (("compression", _EXR_COMPRESSIONS.get(compression, "zip16")),)
    # The pixel limit applies to the larger of the two windows: the picture is the display window, but the data
    # window is what gets decompressed.
    width, height = dx1 - dx0 + 1, dy1 - dy0 + 1
    if (x1 - x0 + 1) * (y1 - y0 + 1) > width * height:
        width, height = x1 - x0 + 1, y1 - y0 + 1
    return width, height, options, True


def _exr_parse(data: bytes, name: str) -> tuple[dict[str, bytes], int, int, tuple[int, ...], tuple[int, ...], int]:
    """(attributes, where the offset table starts, version flags, data window, display window, compression)."""
    if len(data) < 8:
        raise TruncatedImageError(f"{name}: truncated EXR data: the header is cut short")
    flags = int.from_bytes(data[4:8], "little")
    if flags & (_EXR_MULTIPART | _EXR_DEEP):
        raise UnsupportedImageError(f"{name}: multi-part and deep EXR files are not supported")
    attributes, position = {}, 8
    while True:
        name_end = data.find(b"\0", position)
        if name_end == position:  # an empty name ends the header
            position += 1
            break
        type_end = data.find(b"\0", name_end + 1) if name_end > 0 else -1
        if type_end < 0 or type_end + 5 > len(data):
            raise TruncatedImageError(f"{name}: truncated EXR data: the header is cut short")
        size = int.from_bytes(data[type_end + 1:type_end + 5], "little", signed=True)
        start = type_end + 5
        if size < 0:
            raise CorruptImageError(f"{name}: corrupt EXR header (attribute of negative size)")
        if start + size > len(data):
            raise TruncatedImageError(f"{name}: truncated EXR data: the header is cut short")
        attributes[data[position:name_end].decode("latin-1")] = data[start:start + size]
        position = start + size
    try:
        data_window, display_window = (struct.unpack("<4i", attributes[key]) for key in ("dataWindow",
                                                                                           "displayWindow"))
        compression = attributes["compression"][0]
    except (KeyError, struct.error, IndexError):
        raise CorruptImageError(f"{name}: corrupt EXR header (no valid dataWindow, displayWindow or "
                                f"compression)") from None
    if any(window[2] < window[0] or window[3] < window[1] for window in (data_window, display_window)):
        raise CorruptImageError(f"{name}: corrupt EXR header (empty data or display window)")
    return attributes, position, flags, data_window, display_window, compression


def _exr_chunks(data: bytes, table: int, tiled: int, lines: int, compression: int,
                truncated) -> list[tuple[int, int]]:
    """(start, size) of the data of every chunk the offset table lists, each checked to lie whole inside `data`."""
    if not tiled and compression in _EXR_LINES_PER_CHUNK:
        count = math.ceil(lines / _EXR_LINES_PER_CHUNK[compression])
        head = 8  # scan line chunk: y, data size
    else:  # tiled (or a compression unknown here): the table runs up to the first chunk
        count, head = None, 20  # tile chunk: tile x, y, level x, y, data size
    offsets, position, chunks = [], table, []
    while count is None or len(offsets) < count:
        if count is None and offsets and position >= min(offsets):
            break
        if position + 8 > len(data):
            raise truncated("the chunk offset table is cut short")
        offset = int.from_bytes(data[position:position + 8], "little")
        if offset == 0 and count is not None:  # OpenEXR's mark for a chunk a writer never got to
            raise truncated(f"chunk {len(offsets)} of {count} was never written")
        offsets.append(offset)
        position += 8
    for index, offset in enumerate(offsets):
        if offset < position or offset + head > len(data):
            raise truncated(f"chunk {index} starts at byte {offset}, outside the file")
        size = int.from_bytes(data[offset + head - 4:offset + head], "little", signed=True)
        if size < 0 or offset + head + size > len(data):
            raise truncated(f"chunk {index} ends at byte {offset + head + size}")
        chunks.append((offset + head, size))
    return chunks


def _exr_line_bytes(channels: bytes, width: int) -> int | None:
    """Bytes of one uncompressed scan line for the `channels` (chlist) attribute; None with subsampled channels."""
    total, position = 0, 0
    while position < len(channels) and channels[position]:
        end = channels.find(b"\0", position)
        if end < 0 or end + 17 > len(channels):
            return None
        pixel_type, = struct.unpack_from("<i", channels, end + 1)
        x_sampling, y_sampling = struct.unpack_from("<ii", channels, end + 9)
        if (x_sampling, y_sampling) != (1, 1):
            return None
        total += (2 if pixel_type == 1 else 4) * width  # HALF; UINT and FLOAT are 4 bytes
        position = end + 17
    return total or None


def _exr_check_zlib(data: bytes, chunks: list[tuple[int, int]], line_bytes: int | None, lines_per_chunk: int,
                    lines: int, name: str) -> None:
    """ZIP/ZIPS chunks inflate to their size: FFmpeg's decoder leaves a damaged chunk's lines unwritten (zeros)
    without reporting an error, so damage is found here from zlib's own checksum."""
    if line_bytes is None:
        return
    for index, (start, size) in enumerate(chunks):
        expected = line_bytes * min(lines_per_chunk, lines - index * lines_per_chunk)
        if size >= expected:  # stored uncompressed: compression would not have made it smaller
            continue
        try:
            inflated = zlib.decompress(data[start:start + size])
        except zlib.error as e:
            raise CorruptImageError(f"{name}: corrupt EXR data: chunk {index} does not inflate ({e})") from e
        if len(inflated) != expected:
            raise CorruptImageError(f"{name}: corrupt EXR data: chunk {index} inflates to {len(inflated)} bytes, "
                                    f"not {expected}")


# -- encoding ------------------------------------------------------------------------------------------------------
def _dpx_pix_fmt(mode: str, bit_depth: int, byte_order: str) -> tuple[str, int]:
    """FFmpeg's DPX encoder pixel format for `mode` at the source's depth, and the depth it writes."""
    end = "be" if byte_order == "big" else "le"
    if bit_depth <= 8:
        return {"L": "gray", "RGB": "rgb24", "RGBA": "rgba"}[mode], 8
    if mode == "RGB" and bit_depth in (10, 12):
        return f"gbrp{bit_depth}{end}", bit_depth
    return {"L": "gray16", "RGB": "rgb48", "RGBA": "rgba64"}[mode] + end, 16


def _encode(codec: str, pix_fmt: str, samples: np.ndarray, options: dict[str, str]) -> bytes:
    height, width = samples.shape[:2]
    try:
        context = av.CodecContext.create(codec, "w")
        context.width, context.height, context.pix_fmt = width, height, pix_fmt
        context.time_base = fractions.Fraction(1, 1)
        context.options = options
        array = samples[..., 0] if samples.shape[2] == 1 else samples
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=pix_fmt)
        frame.pts = 0
        packets = context.encode(frame) + context.encode(None)
    except (av.FFmpegError, ValueError) as e:
        raise EncodeError(f"FFmpeg's {codec} encoder failed for a {width}x{height} {pix_fmt} image: "
                          f"{type(e).__name__}: {e}") from e
    return b"".join(bytes(packet) for packet in packets)
