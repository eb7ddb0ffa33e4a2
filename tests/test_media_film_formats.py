"""DPX and OpenEXR, the formats of film scans and VFX, as photos and frame sequences: files made here by FFmpeg's own
dpx/exr encoders decode to the values that were encoded, come back out in their format and bit depth, fail with a
classified error when damaged, and go through a catalog job as frame sequences."""

from __future__ import annotations

import dataclasses
import fractions
import io
import pathlib
import struct

import av
import numpy as np
import pytest
from PIL import Image
from support.catalog import job_config, manifests, write_catalog

import media
from media import MediaError, decode_image, encode_image, to_float_pixels
from pipeline.planner import group_inputs
from pipeline.storage import Entry

LIMIT = 10_000_000
RNG = np.random.default_rng(2024)
HALF_ULP_AT_ONE = 2.0**-11  # spacing of half floats in [0.5, 1)


def ffmpeg_encode(codec: str, pix_fmt: str, samples: np.ndarray, **options: str) -> bytes:
    """One image written by FFmpeg's encoder (`samples` in PyAV's layout: HxWxC in RGB(A) order, or HxW)."""
    context = av.CodecContext.create(codec, "w")
    context.height, context.width = samples.shape[:2]
    context.pix_fmt, context.time_base, context.options = pix_fmt, fractions.Fraction(1, 1), options
    frame = av.VideoFrame.from_ndarray(samples, format=pix_fmt)
    frame.pts = 0
    return b"".join(bytes(packet) for packet in context.encode(frame) + context.encode(None))


def ffmpeg_decode(codec: str, data: bytes) -> av.VideoFrame:
    context = av.CodecContext.create(codec, "r")
    frames = context.decode(av.Packet(data)) + context.decode(None)
    assert len(frames) == 1
    return frames[0]


def raw_exr(data: bytes) -> tuple[np.ndarray, str]:
    """An EXR's linear values exactly as FFmpeg decodes them (HxWxC float32, RGB(A) order), and its pixel format."""
    frame = ffmpeg_decode("exr", data)
    dtype = np.float16 if "f16" in frame.format.name else np.float32
    planes = [np.frombuffer(frame.planes[c.plane], dtype).reshape(frame.height, -1)[:, :frame.width]
              for c in frame.format.components]
    return np.stack(planes, axis=-1).astype(np.float32), frame.format.name


def codes(levels: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random code values with both ends of the range present."""
    values = RNG.integers(0, levels, shape).astype(np.uint8 if levels <= 256 else np.uint16)
    values.flat[0], values.flat[-1] = 0, levels - 1
    return values


def twice(pixels: np.ndarray) -> np.ndarray:
    """What an engine returns at scale 2 (nearest-neighbour, so values are kept)."""
    return np.repeat(np.repeat(pixels, 2, axis=0), 2, axis=1)


# -- DPX -------------------------------------------------------------------------------------------------------------
# (FFmpeg pixel format written, bits, layout, PyAV array shape)
DPX_KINDS = {
    "rgb10-le": ("gbrp10le", 10, "RGB", (10, 14, 3)),
    "rgb10-be": ("gbrp10be", 10, "RGB", (10, 14, 3)),  # the scanners' packed 10-bit, big-endian
    "rgb12": ("gbrp12be", 12, "RGB", (10, 14, 3)),
    "rgb8": ("rgb24", 8, "RGB", (10, 14, 3)),
    "rgb16": ("rgb48be", 16, "RGB", (10, 14, 3)),
    "rgba8": ("rgba", 8, "RGBA", (10, 14, 4)),
    "rgba16": ("rgba64le", 16, "RGBA", (10, 14, 4)),
    "gray16": ("gray16be", 16, "L", (10, 14)),
}


@pytest.mark.parametrize("kind", list(DPX_KINDS))
def test_dpx_decodes_to_its_code_values_and_comes_back_at_its_depth(kind):
    pix_fmt, bits, layout, shape = DPX_KINDS[kind]
    source = codes(2**bits, shape)
    data = ffmpeg_encode("dpx", pix_fmt, source)
    decoded = decode_image(data, f"{kind}.dpx", LIMIT)
    info = decoded.info
    assert (info.format, info.channels, info.bit_depth, info.has_alpha) == ("DPX", layout, bits, "A" in layout)
    expected = source.reshape(*shape[:2], -1)
    # Integers at the full scale of their dtype: 8-bit as uint8, 10/12/16-bit as uint16 (code * 65535 / max).
    assert decoded.pixels.dtype == (np.uint8 if bits == 8 else np.uint16)
    assert np.array_equal(np.rint(decoded.pixels.astype(np.float64) * (2**bits - 1) / np.iinfo(
        decoded.pixels.dtype).max), expected)
    values = to_float_pixels(decoded.pixels)
    values = values[..., :1] if layout == "L" else values  # gray is replicated to RGB
    # Within half a step of the 16-bit scale of code / max: 7.7e-6, far below one 12-bit step (2.4e-4).
    assert np.abs(values - expected / (2**bits - 1)).max() <= 0.5 / 65535 + 1e-7

    # Unchanged pixels written as "same" are the same file content: format, pixel format, byte order, codes.
    written, extension = encode_image(to_float_pixels(decoded.pixels), info, "same", 95)
    assert extension == ".dpx" and written[:4] == data[:4]
    frame = ffmpeg_decode("dpx", written)
    assert frame.format.name.rstrip("lbe") == ffmpeg_decode("dpx", data).format.name.rstrip("lbe")
    assert np.array_equal(frame.to_ndarray(), source)
    assert written[801:803] == data[801:803]  # transfer and colorimetric codes

    upscaled = decode_image(encode_image(twice(to_float_pixels(decoded.pixels)), info, "same", 95)[0], "o.dpx", LIMIT)
    assert (upscaled.info.bit_depth, upscaled.info.channels) == (bits, layout)
    assert upscaled.pixels.shape == (shape[0] * 2, shape[1] * 2, len(layout))


def test_dpx_transfer_code_of_a_log_scan_is_kept():
    data = bytearray(ffmpeg_encode("dpx", "gbrp10be", codes(1024, (6, 8, 3))))
    data[801] = data[802] = 1  # printing density: a film scan's log code values
    decoded = decode_image(bytes(data), "scan.dpx", LIMIT)
    written = encode_image(twice(to_float_pixels(decoded.pixels)), decoded.info, "same", 95)[0]
    assert (written[801], written[802]) == (1, 1)


def test_ten_bit_gray_dpx_is_written_at_16_bits():
    """FFmpeg's DPX encoder has no 10-bit gray: the output keeps every code at 16 bits."""
    pixels = np.repeat(codes(1024, (6, 8, 1)), 3, axis=2)
    decoded = decode_image(ffmpeg_encode("dpx", "gbrp10le", pixels), "g.dpx", LIMIT)
    info = dataclasses.replace(decoded.info, channels="L")
    written = decode_image(encode_image(to_float_pixels(decoded.pixels), info, "same", 95)[0], "o.dpx", LIMIT)
    assert (written.info.channels, written.info.bit_depth) == ("L", 16)
    assert np.array_equal(np.rint(written.pixels[..., 0] / 65535 * 1023), pixels[..., 0])


# -- EXR -------------------------------------------------------------------------------------------------------------
def every_half_in_unit_range(width: int = 128) -> np.ndarray:
    """All 15,361 half floats in [0, 1] (forwards, backwards and forwards again in R, G, B) as an HxWx3 image."""
    halves = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16).astype(np.float32)
    planes = [halves, halves[::-1], halves]
    height = -(-halves.size // width)
    padded = [np.pad(p, (0, height * width - p.size)) for p in planes]
    return np.stack(padded, axis=-1).reshape(height, width, 3)


def test_half_exr_decodes_to_srgb_encoded_linear_values_and_round_trips_bit_exact():
    linear = every_half_in_unit_range()
    data = ffmpeg_encode("exr", "gbrpf32le", linear, format="half", compression="zip1")
    decoded = decode_image(data, "plate.exr", LIMIT)
    info = decoded.info
    assert (info.format, info.channels, info.bit_depth, info.mode) == ("EXR", "RGB", 16, "gbrpf16le")
    assert decoded.pixels.dtype == np.float32
    # Processed on the sRGB curve (IEC 61966-2-1), computed in float64 here.
    x = linear.astype(np.float64)
    reference = np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)
    assert np.abs(decoded.pixels - reference).max() < 1e-6
    assert decoded.pixels[0, 0, 0] == 0.0 and decoded.pixels[..., 0].max() >= 1 - 1e-7

    written, extension = encode_image(to_float_pixels(decoded.pixels), info, "same", 95)
    assert extension == ".exr"
    values, pix_fmt = raw_exr(written)
    assert pix_fmt == "gbrpf16le"  # half stays half
    assert np.array_equal(values, linear)  # every half in [0, 1] comes back bit for bit
    assert b"compression\0compression\0\x01\0\0\0\x02" in written  # ZIPS (FFmpeg's zip1), as the source


def test_exr_highlights_negatives_and_non_finite_values_are_clipped():
    linear = np.array([[[4.0, 1.0, 0.5], [-0.25, np.nan, np.inf], [0.18, 0.0, 1.5]]], np.float32)
    decoded = decode_image(ffmpeg_encode("exr", "gbrpf32le", linear, format="float"), "hot.exr", LIMIT)
    assert decoded.info.bit_depth == 32
    mid_grey = 1.055 * 0.18 ** (1 / 2.4) - 0.055
    assert decoded.pixels[0] == pytest.approx(np.array([[1.0, 1.0, 0.7353569], [0.0, 0.0, 1.0],
                                                        [mid_grey, 0.0, 1.0]]), abs=1e-6)
    written, _ = encode_image(to_float_pixels(decoded.pixels), decoded.info, "same", 95)
    values, pix_fmt = raw_exr(written)
    assert pix_fmt == "gbrpf32le"  # float stays float
    assert values[0] == pytest.approx(np.array([[1.0, 1.0, 0.5], [0.0, 0.0, 1.0], [0.18, 0.0, 1.0]]), abs=1e-6)


def test_float_exr_with_alpha_keeps_alpha_and_float_precision():
    linear = RNG.random((12, 10, 4), dtype=np.float32)
    decoded = decode_image(ffmpeg_encode("exr", "gbrapf32le", linear, format="float"), "a.exr", LIMIT)
    assert (decoded.info.channels, decoded.info.bit_depth, decoded.info.has_alpha) == ("RGBA", 32, True)
    assert np.array_equal(decoded.pixels[..., 3], linear[..., 3])  # alpha is not transferred
    values, pix_fmt = raw_exr(encode_image(to_float_pixels(decoded.pixels), decoded.info, "same", 95)[0])
    assert pix_fmt == "gbrapf32le"
    assert np.abs(values - linear).max() < 3e-7  # float32 rounding of the transfer and its inverse


def test_gray_half_exr():
    linear = RNG.random((6, 9), dtype=np.float32).astype(np.float16).astype(np.float32)
    decoded = decode_image(ffmpeg_encode("exr", "grayf32le", linear, format="half"), "y.exr", LIMIT)
    assert (decoded.info.channels, decoded.pixels.shape) == ("L", (6, 9, 1))
    values, pix_fmt = raw_exr(encode_image(to_float_pixels(decoded.pixels), decoded.info, "same", 95)[0])
    assert pix_fmt == "grayf16le" and np.array_equal(values[..., 0], linear)


def test_alpha_between_exr_and_straight_alpha_formats():
    """EXR's colour is premultiplied, PNG's is not: converting either way keeps what is seen."""
    straight = np.array([[[1.0, 0.5, 0.0, 0.5], [0.2, 0.4, 0.6, 1.0], [0.3, 0.3, 0.3, 0.0]]], np.float32)
    png = Image.fromarray(np.rint(straight * 255).astype(np.uint8), "RGBA")
    buffer = io.BytesIO()
    png.save(buffer, "PNG")
    decoded = decode_image(buffer.getvalue(), "t.png", LIMIT)
    values, _ = raw_exr(encode_image(to_float_pixels(decoded.pixels), decoded.info, "exr", 95)[0])
    srgb = np.rint(straight * 255) / 255
    linear = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    assert values[..., :3] == pytest.approx(linear[..., :3] * srgb[..., 3:], abs=HALF_ULP_AT_ONE)
    assert values[..., 3] == pytest.approx(srgb[..., 3], abs=HALF_ULP_AT_ONE)

    exr = decode_image(ffmpeg_encode("exr", "gbrapf32le", values, format="half"), "t.exr", LIMIT)
    back = decode_image(encode_image(to_float_pixels(exr.pixels), exr.info, "png", 95)[0], "back.png", LIMIT)
    assert back.info.bit_depth == 16  # EXR (half) to PNG is 16-bit
    assert np.abs(back.pixels[0, :2] / 65535 - srgb[0, :2]).max() < 2e-3  # straight alpha again where alpha > 0


# -- damaged files -----------------------------------------------------------------------------------------------
def film_files() -> dict[str, bytes]:
    return {
        "dpx": ffmpeg_encode("dpx", "gbrp10be", codes(1024, (16, 20, 3))),
        "exr-zip": ffmpeg_encode("exr", "gbrpf32le", RNG.random((40, 20, 3), dtype=np.float32), format="half",
                                 compression="zip16"),
        "exr-raw": ffmpeg_encode("exr", "gbrapf32le", RNG.random((16, 20, 4), dtype=np.float32), format="float",
                                 compression="none"),
    }


@pytest.mark.parametrize("kind", ["dpx", "exr-zip", "exr-raw"])
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, 0.999])
def test_truncated_dpx_and_exr_fail_as_truncated(kind, keep):
    data = film_files()[kind]
    cut = max(int(len(data) * keep), 8)
    assert cut < len(data)
    with pytest.raises(MediaError) as caught:
        decode_image(data[:cut], f"cut.{kind[:3]}", LIMIT)
    assert caught.value.error_type == "truncated", caught.value
    assert "truncated" in str(caught.value) and f"cut.{kind[:3]}" in str(caught.value)


def test_exr_with_a_chunk_never_written_is_truncated():
    data = bytearray(film_files()["exr-raw"])
    table = data.index(b"\0", data.index(b"lavc\0")) + 1  # the offset table follows the header's last attribute
    data[table + 8:table + 16] = bytes(8)  # OpenEXR's mark for a chunk an interrupted writer never wrote
    with pytest.raises(MediaError, match="chunk 1 of 16 was never written") as caught:
        decode_image(bytes(data), "render.exr", LIMIT)
    assert caught.value.error_type == "truncated"


def test_damaged_exr_and_dpx_are_corrupt():
    exr = bytearray(film_files()["exr-zip"])
    table = exr.index(b"\0", exr.index(b"lavc\0")) + 1
    first = int.from_bytes(exr[table:table + 8], "little")
    exr[first + 8:first + 40] = b"\xff" * 32  # zlib stream of the first chunk garbled
    with pytest.raises(MediaError, match="chunk 0 does not inflate") as caught:
        decode_image(bytes(exr), "bad.exr", LIMIT)
    assert caught.value.error_type == "corrupt"

    dpx = bytearray(film_files()["dpx"])
    struct.pack_into(">I", dpx, 772, 5000)  # a width the pixel data cannot hold, in a complete file
    with pytest.raises(MediaError) as caught:
        decode_image(bytes(dpx), "bad.dpx", LIMIT)
    assert caught.value.error_type == "corrupt"


def test_pixel_limit_is_checked_from_the_header():
    for name, data in film_files().items():
        with pytest.raises(MediaError, match="checked from the .* header") as caught:
            decode_image(data, name, 200)
        assert caught.value.error_type == "too_many_pixels"


def test_image_size_reads_the_picture_size_from_the_header():
    """What a dry run's estimate needs, from the first bytes only (Pillow cannot open DPX or EXR)."""
    files = film_files()
    assert media.image_size(io.BytesIO(files["dpx"]), "a.dpx") == (20, 16)
    assert media.image_size(io.BytesIO(files["exr-zip"][:400]), "a.exr") == (20, 40)  # header only
    png = io.BytesIO()
    Image.new("RGB", (7, 3)).save(png, "PNG")
    assert media.image_size(io.BytesIO(png.getvalue()), "a.png") == (7, 3)


# -- recognition -------------------------------------------------------------------------------------------------
def test_dpx_and_exr_are_images_and_numbered_ones_form_sequences():
    assert {".dpx", ".exr"} <= media.SUPPORTED_EXTENSIONS
    assert media.kind_of("scans/reel1/frame.0001.dpx") == media.kind_of("comp/v001.1001.EXR") == media.IMAGE
    assert media.output_extension("a/plate.1001.exr", "same") == ".exr"
    assert media.output_extension("a/photo.png", "dpx") == ".dpx"
    assert {"dpx", "exr"} <= set(media.OUTPUT_FORMATS)
    entries = [Entry(key, 1, "m") for key in
               [*(f"scan/r1_{i:06d}.dpx" for i in range(3)), *(f"comp/sh010.{i}.exr" for i in range(1001, 1004)),
                "stills/one.exr"]]
    images, videos, sequences = group_inputs(entries, ["scan", "comp"])
    assert [e.relative for e in images] == ["stills/one.exr"] and not videos
    assert [s.key for s in sequences] == ["comp/sh010.%d.exr", "scan/r1_%06d.dpx"]


# -- through the catalog job -------------------------------------------------------------------------------------
@pytest.mark.slow  # a whole job; decoding and writing of both formats are checked without one above
def test_dpx_and_exr_sequences_and_photos_through_a_catalog_job(ray_local, tmp_path: pathlib.Path):
    from pipeline.config import validate_config
    from pipeline.run import EXIT_OK, run_job

    y, x = np.mgrid[0:12, 0:16]
    files, sources = {}, {}
    # 7 frames each: two segments of 5 and 2 (segment_seconds 0.2 at 24 frames/s). Ramps (which bicubic x2 keeps)
    # with a level per frame: red steps by 90/1023 (DPX), blue by 1/8 (EXR) from one frame to the next.
    for i in range(1, 8):
        ramp = np.stack([x * 20 + i * 90, y * 80 + i, (x + y) * 30], -1).astype(np.uint16)
        sources[f"scans/reel1_{i:04d}.dpx"] = ramp
        files[f"scans/reel1_{i:04d}.dpx"] = ffmpeg_encode("dpx", "gbrp10be", ramp)
        linear = np.stack([x / 15, y / 11, np.full(x.shape, i / 8)], -1).astype(np.float16)
        sources[f"comp/sh010.{1000 + i}.exr"] = linear.astype(np.float32)
        files[f"comp/sh010.{1000 + i}.exr"] = ffmpeg_encode("exr", "gbrpf32le", linear.astype(np.float32),
                                                             format="half", compression="zip16")
    files["stills/plate.exr"] = files["comp/sh010.1001.exr"]
    files["stills/scan.dpx"] = files["scans/reel1_0001.dpx"]
    write_catalog(tmp_path / "in", files)
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), output={"format": "same"},
                        video={"segment_seconds": 0.2, "sequence_folders": ["scans", "comp"]})
    assert run_job(validate_config(config)) == EXIT_OK

    rows = manifests(tmp_path / "out")
    final = rows[rows.unit != "segment"].set_index("source_key")
    assert sorted(final.index) == ["comp/sh010.%d.exr", "scans/reel1_%04d.dpx", "stills/plate.exr",
                                   "stills/scan.dpx"]
    assert set(final.status) == {"ok"}, final[["status", "error_type", "error"]]
    assert final.loc["scans/reel1_%04d.dpx", "frames_out"] == 7
    segments = rows[rows.unit == "segment"]
    assert len(segments) == 4 and set(segments.status) == {"staged"}

    out = tmp_path / "out"
    for key, source in sources.items():
        data = (out / key).read_bytes()
        if key.endswith(".dpx"):
            frame = ffmpeg_decode("dpx", data)
            assert frame.format.name == "gbrp10le" and data[:4] == b"SDPX"  # 10-bit, big-endian as the source
            values = frame.to_ndarray().astype(np.float64) / 1023
            expected = source / 1023
        else:
            values, pix_fmt = raw_exr(data)
            assert pix_fmt == "gbrpf16le"  # half-float EXR stays half-float
            expected = source
        assert values.shape == (24, 32, 3)
        # Bicubic x2 (on the sRGB curve for EXR) shrunk back by 2x2 means is the source ramp, inside the border,
        # to 1e-3 on average (measured: 1e-8 DPX, 1e-4 EXR), far below the 0.03 a neighbouring frame would give.
        shrunk = values.reshape(12, 2, 16, 2, 3).mean(axis=(1, 3))
        assert np.abs(shrunk - expected)[2:-2, 2:-2].mean() < 1e-3, key
    assert (out / "stills/plate.exr").read_bytes()[:4] == b"v/1\x01"
    assert ffmpeg_decode("dpx", (out / "stills/scan.dpx").read_bytes()).format.name == "gbrp10le"
