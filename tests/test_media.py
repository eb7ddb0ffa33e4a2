"""media with real codecs on images made here: bad inputs fail with the right error_type, unusual valid
inputs decode with the right size, orientation, layout and bit depth, and come back out of encode_image right."""

import io
import pickle

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import ExifTags, Image, ImageCms, ImageOps, PngImagePlugin

from media import (
    OUTPUT_FORMATS,
    SUPPORTED_EXTENSIONS,
    MediaError,
    decode_image,
    encode_image,
    output_extension,
    to_float_pixels,
)

LIMIT = 10_000_000
RNG = np.random.default_rng(1234)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/" '
    b'tiff:Orientation="6" dc:source="catalog-test-marker"/></rdf:RDF></x:xmpmeta>'
)
# What outputs must carry: the same packet, its orientation reset like EXIF's (pixels are stored upright).
XMP_UPRIGHT = XMP.replace(b'tiff:Orientation="6"', b'tiff:Orientation="1"')


def save(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def pattern(h: int, w: int, channels: int = 3) -> np.ndarray:
    """Smooth, asymmetric content: survives lossy codecs recognisably, and any rotation or flip changes it."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = [x / max(w - 1, 1), y / max(h - 1, 1), (x + 2 * y) / max(w + 2 * h - 3, 1), 1 - x / max(w - 1, 1)]
    return (np.stack(planes[:channels], axis=-1) * 255).round().astype(np.uint8)


def exif_bytes(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "TestCam"
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    ifd = exif.get_ifd(ExifTags.IFD.Exif)
    ifd[ExifTags.Base.DateTimeOriginal] = "2021:02:03 04:05:06"
    ifd[ExifTags.Base.ExifImageWidth] = 7  # the size the camera wrote: stale after upscaling
    return exif.tobytes()


def png_with_garbage_pixels(width: int, height: int) -> bytes:
    """A well-formed PNG that declares width x height but whose pixel data is garbage."""
    out = io.BytesIO()
    out.write(b"\x89PNG\r\n\x1a\n")
    PngImagePlugin.putchunk(out, b"IHDR", width.to_bytes(4, "big"), height.to_bytes(4, "big"), bytes([8, 2, 0, 0, 0]))
    PngImagePlugin.putchunk(out, b"IDAT", b"not zlib data")
    PngImagePlugin.putchunk(out, b"IEND", b"")
    return out.getvalue()


def upscale(decoded, factor: int = 2) -> np.ndarray:
    """What an engine returns: float RGB(A) in [0, 1], `factor` times larger."""
    return np.repeat(np.repeat(to_float_pixels(decoded.pixels), factor, axis=0), factor, axis=1)


def error_type(data: bytes, name: str, max_pixels: int = LIMIT) -> str:
    with pytest.raises(MediaError) as caught:
        decode_image(data, name, max_pixels)
    assert name in str(caught.value)
    return caught.value.error_type


# ---- invalid inputs ----------------------------------------------------------------------------------------------


def test_zero_byte_file_is_empty_file():
    assert error_type(b"", "empty.jpg") == "empty_file"


def test_truncated_jpeg_is_truncated():
    data = save(Image.fromarray(pattern(64, 64)), "JPEG")
    assert error_type(data[: len(data) // 2], "cut.jpg") == "truncated"
    assert error_type(data[:-20], "cut-end.jpg") == "truncated"


def test_text_file_named_png_is_not_an_image():
    assert error_type(b"just some notes, not pixels\n" * 10, "notes.png") == "not_an_image"


def test_png_with_corrupt_idat_crc_is_corrupt():
    data = bytearray(save(Image.fromarray(pattern(32, 32)), "PNG"))
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    data[idat + 4 + length] ^= 0xFF  # first CRC byte: the pixel data itself still inflates
    with pytest.raises(MediaError, match="IDAT") as caught:
        decode_image(bytes(data), "bad-crc.png", LIMIT)
    assert caught.value.error_type == "corrupt"


def test_png_with_corrupt_pixel_data_is_corrupt():
    data = bytearray(save(Image.fromarray(pattern(32, 32)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10 : idat + 20] = bytes(10)
    assert error_type(bytes(data), "bad-data.png") == "corrupt"


def test_png_with_corrupt_header_is_corrupt():
    data = bytearray(save(Image.fromarray(pattern(8, 8)), "PNG"))
    data[16] ^= 0xFF  # inside IHDR: its CRC no longer matches
    assert error_type(bytes(data), "bad-header.png") == "corrupt"


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # The pixel data is garbage: decoding would fail as corrupt, so too_many_pixels proves nothing was decoded.
    with pytest.raises(MediaError, match="3000x2000 = 6000000 pixels exceeds the limit of 5000000") as caught:
        decode_image(png_with_garbage_pixels(3000, 2000), "huge.png", 5_000_000)
    assert caught.value.error_type == "too_many_pixels"
    assert error_type(png_with_garbage_pixels(3000, 2000), "huge.png", 10_000_000) == "corrupt"


def test_pillow_decompression_bomb_is_too_many_pixels_even_under_a_higher_limit():
    assert error_type(png_with_garbage_pixels(30000, 30000), "bomb.png", max_pixels=10**10) == "too_many_pixels"


def test_known_but_unsupported_format_is_unsupported():
    with pytest.raises(MediaError, match="PPM images are not supported") as caught:
        decode_image(save(Image.fromarray(pattern(4, 4)), "PPM"), "old.ppm", LIMIT)
    assert caught.value.error_type == "unsupported"


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF", "BMP", "HEIF", "AVIF"])
def test_truncated_files_of_other_formats_fail_classified(fmt):
    data = save(Image.fromarray(pattern(64, 64)), fmt)
    assert error_type(data[: len(data) // 2], f"cut.{fmt.lower()}") in ("truncated", "corrupt")


# ---- unusual but valid inputs ------------------------------------------------------------------------------------


def test_one_pixel_image():
    decoded = decode_image(save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), "dot.png", LIMIT)
    assert decoded.pixels.tolist() == [[[10, 200, 30]]]
    data, ext = encode_image(upscale(decoded), decoded.info, "same", 90)
    assert ext == ".png"
    assert np.asarray(Image.open(io.BytesIO(data))).tolist() == [[[10, 200, 30]] * 2] * 2


def test_10000x8_strip():
    decoded = decode_image(save(Image.fromarray(pattern(8, 10000)), "PNG"), "strip.png", LIMIT)
    assert decoded.pixels.shape == (8, 10000, 3)
    assert (decoded.info.width, decoded.info.height) == (10000, 8)
    data, _ = encode_image(upscale(decoded), decoded.info, "same", 90)
    assert Image.open(io.BytesIO(data)).size == (20000, 16)


def test_cmyk_jpeg_decodes_to_rgb_and_is_written_back_as_cmyk_with_its_profile():
    cmyk = Image.fromarray(pattern(32, 48, 4), "CMYK")
    fake_cmyk_profile = bytes(16) + b"CMYK" + bytes(108)  # only the header's colour space field is inspected
    source = save(cmyk, "JPEG", quality=95, icc_profile=fake_cmyk_profile)
    decoded = decode_image(source, "print.jpg", LIMIT)
    expected = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
    assert decoded.info.mode == "CMYK" and decoded.info.channels == "RGB"
    np.testing.assert_array_equal(decoded.pixels, expected)

    data, ext = encode_image(to_float_pixels(decoded.pixels), decoded.info, "same", 95)
    written = Image.open(io.BytesIO(data))
    assert (ext, written.format, written.mode) == (".jpg", "JPEG", "CMYK")
    assert written.info["icc_profile"] == fake_cmyk_profile
    # The CMYK written is the inverse of the CMYK->RGB conversion used to decode, up to JPEG loss.
    assert np.abs(np.asarray(written.convert("RGB"), np.int16) - expected).mean() < 2.0
    # RGB outputs get RGB, and not the CMYK profile.
    png = Image.open(io.BytesIO(encode_image(to_float_pixels(decoded.pixels), decoded.info, "png", 95)[0]))
    assert png.mode == "RGB" and "icc_profile" not in png.info
    np.testing.assert_array_equal(np.asarray(png), expected)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png(channels):
    source = (RNG.random((6, 5, channels)) * 65535).astype(np.uint16)
    data = imagecodecs.png_encode(source if channels > 1 else source[..., 0])
    decoded = decode_image(data, "deep.png", LIMIT)
    assert decoded.pixels.dtype == np.uint16 and decoded.info.bit_depth == 16
    assert decoded.info.channels == ("L", "LA", "RGB", "RGBA")[channels - 1]
    np.testing.assert_array_equal(decoded.pixels, source)

    expected = np.repeat(np.repeat(source, 2, axis=0), 2, axis=1)
    for fmt in ("png", "tiff"):
        out, _ = encode_image(upscale(decoded), decoded.info, fmt, 90)
        again = decode_image(out, f"out.{fmt}", LIMIT)
        assert again.pixels.dtype == np.uint16
        if fmt == "tiff" and channels == 2:  # 16-bit TIFF stores gray+alpha as RGBA
            assert again.info.channels == "RGBA"
            np.testing.assert_array_equal(again.pixels[..., [0, 3]], expected)
        else:
            assert again.info.channels == decoded.info.channels
            np.testing.assert_array_equal(again.pixels, expected)
    eight = decode_image(encode_image(upscale(decoded), decoded.info, "webp", 90)[0], "out.webp", LIMIT)
    assert eight.pixels.dtype == np.uint8


def test_16bit_tiff_planar_and_oriented():
    source = (RNG.random((6, 5, 3)) * 65535).astype(np.uint16)
    out = io.BytesIO()
    tifffile.imwrite(out, np.moveaxis(source, -1, 0), photometric="rgb", planarconfig="separate",
                     extratags=[(274, 3, 1, 6, True)])
    decoded = decode_image(out.getvalue(), "scan.tif", LIMIT)
    assert decoded.info.mode == "RGB;16" and decoded.info.orientation == 6
    np.testing.assert_array_equal(decoded.pixels, np.rot90(source, -1))


def test_palette_png_with_transparency_becomes_rgba():
    palette = Image.fromarray((np.arange(64).reshape(8, 8) % 4).astype(np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    decoded = decode_image(save(palette, "PNG", transparency=3), "icon.png", LIMIT)
    assert (decoded.info.mode, decoded.info.channels, decoded.info.has_alpha) == ("P", "RGBA", True)
    assert decoded.pixels[0, :4].tolist() == [[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255], [9, 9, 9, 0]]
    written = Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "same", 90)[0]))
    assert (written.mode, written.size) == ("RGBA", (16, 16))
    assert np.asarray(written)[0, 6:8, 3].tolist() == [0, 0]


def test_grayscale_with_alpha():
    la = pattern(10, 12, 2)
    decoded = decode_image(save(Image.fromarray(la, "LA"), "PNG"), "mask.png", LIMIT)
    assert decoded.info.channels == "LA"
    np.testing.assert_array_equal(decoded.pixels, la)
    pixels = upscale(decoded)
    modes = {fmt: Image.open(io.BytesIO(encode_image(pixels, decoded.info, fmt, 95)[0])).mode
             for fmt in ("png", "tiff", "webp", "jpeg", "bmp", "gif", "avif", "heic")}
    assert modes == {"png": "LA", "tiff": "LA", "webp": "RGBA", "jpeg": "L", "bmp": "L", "gif": "P",
                     "avif": "RGBA", "heic": "RGBA"}
    png = np.asarray(Image.open(io.BytesIO(encode_image(pixels, decoded.info, "png", 95)[0])))
    np.testing.assert_array_equal(png, np.repeat(np.repeat(la, 2, axis=0), 2, axis=1))
    # JPEG has no alpha: the image is composited over white.
    jpeg = np.asarray(Image.open(io.BytesIO(encode_image(pixels, decoded.info, "jpeg", 100)[0])), np.float32)
    gray, alpha = pixels[..., 0] * 255, pixels[..., 3]
    assert np.abs(jpeg - (gray * alpha + 255 * (1 - alpha))).max() < 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow_exif_transpose(orientation):
    source = save(Image.fromarray(pattern(6, 9)), "PNG", exif=exif_bytes(orientation))
    decoded = decode_image(source, "o.png", LIMIT)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(source))))
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.info.orientation == orientation


@pytest.mark.parametrize("orientation", [6, 3])
def test_exif_rotated_jpeg(orientation):
    source = save(Image.fromarray(pattern(40, 64)), "JPEG", quality=95, exif=exif_bytes(orientation))
    decoded = decode_image(source, "phone.jpg", LIMIT)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(source))))
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.pixels.shape == ((64, 40, 3) if orientation == 6 else (40, 64, 3))
    assert decoded.info.orientation == orientation

    written = Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "same", 95)[0]))
    assert written.size == (decoded.info.width * 2, decoded.info.height * 2)
    exif = written.getexif()
    assert exif[ExifTags.Base.Orientation] == 1 and exif[ExifTags.Base.Make] == "TestCam"
    # Written the right way up: the top-left corner matches the rotated source's.
    corner = np.asarray(written, np.int16)[:2, :2].mean(axis=(0, 1))
    assert np.abs(corner - decoded.pixels[0, 0]).max() < 6


def test_tiff_orientation_is_applied_once():
    source = save(Image.fromarray(pattern(6, 9)), "TIFF", exif=exif_bytes(6))
    decoded = decode_image(source, "o.tif", LIMIT)
    np.testing.assert_array_equal(decoded.pixels, np.rot90(pattern(6, 9), -1))
    written = Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "jpeg", 90)[0]))
    exif = written.getexif()
    assert exif[ExifTags.Base.Orientation] == 1 and exif[ExifTags.Base.Make] == "TestCam"
    assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == "2021:02:03 04:05:06"
    assert ExifTags.Base.StripOffsets not in exif  # the TIFF's own structure is not carried as EXIF


def test_animated_gif_first_frame_and_frame_count():
    frames = [Image.new("RGB", (12, 10), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    source = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = decode_image(source, "anim.gif", LIMIT)
    assert decoded.info.frame_count == 3 and decoded.pixels.shape == (10, 12, 3)
    assert (decoded.pixels == [255, 0, 0]).all()
    written = Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "same", 90)[0]))
    assert (written.format, written.size, getattr(written, "n_frames", 1)) == ("GIF", (24, 20), 1)
    assert (np.asarray(written.convert("RGB")) == [255, 0, 0]).all()


def test_gif_keeps_binary_transparency():
    rgba = pattern(8, 8, 4)
    rgba[..., 3] = np.where(np.arange(8) < 4, 0, 255)[None, :]
    decoded = decode_image(save(Image.fromarray(rgba), "PNG"), "t.png", LIMIT)
    written = Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "gif", 90)[0])).convert("RGBA")
    assert np.asarray(written)[0, :, 3].tolist() == [0] * 8 + [255] * 8


def test_webp_with_alpha():
    rgba = pattern(16, 20, 4)
    decoded = decode_image(save(Image.fromarray(rgba), "WEBP", lossless=True, exact=True), "a.webp", LIMIT)
    assert decoded.info.format == "WEBP" and decoded.info.channels == "RGBA"
    np.testing.assert_array_equal(decoded.pixels, rgba)
    written = Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "same", 90)[0]))
    assert (written.format, written.mode, written.size) == ("WEBP", "RGBA", (40, 32))


@pytest.mark.parametrize(("fmt", "ext"), [("HEIF", ".heic"), ("AVIF", ".avif")])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_heic_and_avif(fmt, ext, mode):
    source = Image.fromarray(pattern(24, 32, len(mode)) if mode != "L" else pattern(24, 32, 1)[..., 0], mode)
    decoded = decode_image(save(source, fmt, quality=90), f"photo{ext}", LIMIT)
    assert decoded.info.format == fmt and decoded.info.channels == mode and decoded.pixels.shape[:2] == (24, 32)
    assert np.abs(decoded.pixels.astype(np.int16) - np.asarray(source).reshape(decoded.pixels.shape)).mean() < 4
    data, out_ext = encode_image(upscale(decoded), decoded.info, "same", 90)
    written = Image.open(io.BytesIO(data))
    assert (out_ext, written.format, written.mode, written.size) == (ext, fmt, mode, (64, 48))


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_orientation_is_applied(fmt):
    source = save(Image.fromarray(pattern(24, 40)), fmt, quality=95, exif=exif_bytes(6))
    decoded = decode_image(source, "turned", LIMIT)
    assert decoded.pixels.shape == (40, 24, 3)
    assert np.abs(decoded.pixels.astype(np.int16) - np.rot90(pattern(24, 40), -1)).mean() < 4
    written = Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "same", 90)[0]))
    assert written.size == (48, 80) and written.getexif().get(ExifTags.Base.Orientation, 1) == 1


def test_mpo_is_a_jpeg_with_frames():
    frames = [Image.fromarray(pattern(16, 16)), Image.new("RGB", (16, 16))]
    decoded = decode_image(save(frames[0], "MPO", save_all=True, append_images=frames[1:]), "dual.jpg", LIMIT)
    assert (decoded.info.format, decoded.info.frame_count) == ("MPO", 2)
    assert encode_image(upscale(decoded), decoded.info, "same", 90)[1] == ".jpg"


# ---- metadata, determinism, every source kind --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "tiff", "avif", "heic"])
def test_icc_exif_and_xmp_are_carried(fmt):
    source = save(Image.fromarray(pattern(16, 24)), "JPEG", quality=95, icc_profile=SRGB,
                  exif=exif_bytes(6), xmp=XMP)
    decoded = decode_image(source, "meta.jpg", LIMIT)
    written = Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, fmt, 90)[0]))
    assert written.info["icc_profile"] == SRGB
    exif = written.getexif()
    assert exif[ExifTags.Base.Make] == "TestCam" and exif.get(ExifTags.Base.Orientation, 1) == 1
    if fmt != "tiff":  # TIFF writers cannot write EXIF sub-IFDs: TIFF gets the IFD0 tags only
        assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == "2021:02:03 04:05:06"
        assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.ExifImageWidth] == written.size[0]
    xmp = written.info["xmp"]
    xmp = xmp.encode() if isinstance(xmp, str) else xmp
    assert xmp == XMP_UPRIGHT
    assert written.size == (32, 48)


def test_metadata_is_carried_to_16bit_png():
    out = io.BytesIO()
    tifffile.imwrite(out, (RNG.random((4, 4, 3)) * 65535).astype(np.uint16), photometric="rgb",
                     iccprofile=SRGB, extratags=[(700, 1, len(XMP), XMP, True)])
    decoded = decode_image(out.getvalue(), "deep.tif", LIMIT)
    assert decoded.info.icc_profile == SRGB and decoded.info.xmp == XMP
    info = decoded.info.__class__(**{**decoded.info.__dict__, "exif": exif_bytes(8)})
    written = Image.open(io.BytesIO(encode_image(upscale(decoded), info, "png", 90)[0]))
    assert written.info["icc_profile"] == SRGB and written.info["xmp"] == XMP_UPRIGHT
    assert written.getexif()[ExifTags.Base.Orientation] == 1
    assert decode_image(encode_image(upscale(decoded), info, "tiff", 90)[0], "o.tif", LIMIT).info.xmp == XMP_UPRIGHT


def test_unparseable_exif_is_dropped_not_fatal():
    decoded = decode_image(save(Image.new("RGB", (4, 4)), "JPEG", exif=b"Exif\0\0not a TIFF header"), "e.jpg", LIMIT)
    assert decoded.info.exif is None
    assert "exif" not in Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "jpeg", 90)[0])).info


def test_icc_profile_of_another_colour_space_is_not_attached():
    gray_profile = bytes(16) + b"GRAY" + bytes(108)
    decoded = decode_image(save(Image.fromarray(pattern(8, 8, 1)[..., 0]), "PNG", icc_profile=gray_profile),
                           "g.png", LIMIT)
    assert Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "png", 90)[0])).info[
        "icc_profile"] == gray_profile
    assert "icc_profile" not in Image.open(io.BytesIO(encode_image(upscale(decoded), decoded.info, "webp", 90)[0])).info


@pytest.mark.parametrize("fmt", [f for f in OUTPUT_FORMATS if f != "same"])
def test_encode_is_deterministic(fmt):
    source = save(Image.fromarray(pattern(40, 56, 4)), "PNG", icc_profile=SRGB, exif=exif_bytes(1))
    decoded = decode_image(source, "d.png", LIMIT)
    pixels = upscale(decoded)
    info = pickle.loads(pickle.dumps(decoded.info))  # as it reaches another worker
    assert encode_image(pixels, decoded.info, fmt, 80) == encode_image(pixels.copy(), info, fmt, 80)


def _source_kinds():
    def pil(mode, fmt, **options):
        if mode in ("L", "1"):
            image = Image.fromarray(pattern(12, 10, 1)[..., 0]).convert(mode)
        else:
            image = Image.fromarray(pattern(12, 10, len(mode)), mode)
        return save(image, fmt, **options)

    def png16(channels):
        return imagecodecs.png_encode((pattern(12, 10, channels).astype(np.uint16) * 257).squeeze())

    def tiff16():
        out = io.BytesIO()
        tifffile.imwrite(out, pattern(12, 10).astype(np.uint16) * 257, photometric="rgb")
        return out.getvalue()

    def palette_png():
        return save(Image.fromarray(pattern(12, 10)).quantize(16), "PNG", transparency=0)

    def gray_palette_png():
        return save(Image.fromarray(pattern(12, 10, 1)[..., 0]).convert("P"), "PNG")

    return {
        "jpeg-rgb": (lambda: pil("RGB", "JPEG"), "RGB", np.uint8, "JPEG"),
        "jpeg-gray": (lambda: pil("L", "JPEG"), "L", np.uint8, "JPEG"),
        "jpeg-cmyk": (lambda: pil("CMYK", "JPEG"), "CMYK", np.uint8, "JPEG"),
        "png-rgba": (lambda: pil("RGBA", "PNG"), "RGBA", np.uint8, "PNG"),
        "png-la": (lambda: pil("LA", "PNG"), "LA", np.uint8, "PNG"),
        "png-bilevel": (lambda: pil("1", "PNG"), "L", np.uint8, "PNG"),
        "png-palette": (palette_png, "RGBA", np.uint8, "PNG"),
        "png-gray-palette": (gray_palette_png, "L", np.uint8, "PNG"),
        "png16-gray": (lambda: png16(1), "L;16", np.uint16, "PNG"),
        "png16-rgb": (lambda: png16(3), "RGB;16", np.uint16, "PNG"),
        "png16-rgba": (lambda: png16(4), "RGBA;16", np.uint16, "PNG"),
        "tiff16-rgb": (tiff16, "RGB;16", np.uint16, "TIFF"),
        "webp-rgba": (lambda: pil("RGBA", "WEBP", lossless=True, exact=True), "RGBA", np.uint8, "WEBP"),
        "tiff-cmyk": (lambda: pil("CMYK", "TIFF"), "CMYK", np.uint8, "TIFF"),
        "tiff-la": (lambda: pil("LA", "TIFF"), "LA", np.uint8, "TIFF"),
        "bmp-rgb": (lambda: pil("RGB", "BMP"), "RGB", np.uint8, "BMP"),
        "gif-gray": (lambda: pil("L", "GIF"), "L", np.uint8, "GIF"),
        "avif-rgba": (lambda: pil("RGBA", "AVIF"), "RGBA", np.uint8, "AVIF"),
        "heic-rgb": (lambda: pil("RGB", "HEIF"), "RGB", np.uint8, "HEIF"),
    }


@pytest.mark.parametrize("kind", list(_source_kinds()))
def test_upscaled_output_keeps_size_and_mode_of_every_source_kind(kind):
    make, expected_mode, dtype, fmt = _source_kinds()[kind]
    decoded = decode_image(make(), f"src-{kind}", LIMIT)
    assert decoded.pixels.dtype == dtype and decoded.pixels.shape[:2] == (12, 10)
    data, ext = encode_image(upscale(decoded), decoded.info, "same", 90)
    assert ext == output_extension(f"x{ext}", "same")
    written = Image.open(io.BytesIO(data))
    assert written.format == fmt and written.size == (20, 24)
    again = decode_image(data, f"out-{kind}", LIMIT)
    assert again.pixels.dtype == dtype and again.pixels.shape == (24, 20, decoded.pixels.shape[2])
    assert again.info.channels == decoded.info.channels
    # Pillow names 8-bit modes; for 16-bit ones (which it reads as 8-bit) the decoder's own name is checked.
    assert (written.mode if dtype == np.uint8 else again.info.mode) == expected_mode


# ---- names and arguments -----------------------------------------------------------------------------------------


def test_output_extension():
    assert output_extension("s3://b/photos/IMG 1.JPG", "same") == ".JPG"
    assert output_extension("a/b.heic", "jpeg") == ".jpg"
    assert output_extension("a/b.png", "TIF") == ".tif"
    assert output_extension("a/b.png", "heif") == ".heic"
    assert {output_extension("x.png", f) for f in OUTPUT_FORMATS if f != "same"} <= SUPPORTED_EXTENSIONS
    with pytest.raises(ValueError, match="unknown output format 'jxl'"):
        output_extension("a.png", "jxl")


@pytest.mark.parametrize(("fmt", "limit"), [("webp", 16383), ("heic", 16888), ("avif", 32768), ("jpeg", 65500)])
def test_output_too_large_for_the_format_is_a_media_error(fmt, limit):
    info = decode_image(save(Image.new("RGB", (4, 4)), "PNG"), "p.png", LIMIT).info
    with pytest.raises(MediaError, match=f"limit of {limit} pixels per side") as caught:
        encode_image(np.zeros((2, limit + 1, 3), np.float32), info, fmt, 90)
    assert caught.value.error_type == "too_large_for_format"


def test_encode_clamps_out_of_range_and_non_finite_values():
    info = decode_image(save(Image.new("RGB", (2, 1)), "PNG"), "p.png", LIMIT).info
    pixels = np.array([[[np.nan, np.inf, -np.inf], [-0.5, 1.5, 0.5]]], np.float32)
    written = np.asarray(Image.open(io.BytesIO(encode_image(pixels, info, "png", 90)[0])))
    assert written.tolist() == [[[0, 255, 0], [0, 255, 128]]]


def test_encode_rejects_bad_pixels_and_quality():
    decoded = decode_image(save(Image.fromarray(pattern(4, 4)), "PNG"), "p.png", LIMIT)
    with pytest.raises(ValueError, match="HxWx3"):
        encode_image(np.zeros((4, 4, 2), np.float32), decoded.info, "png", 90)
    with pytest.raises(ValueError, match="quality"):
        encode_image(upscale(decoded), decoded.info, "jpeg", 0)

