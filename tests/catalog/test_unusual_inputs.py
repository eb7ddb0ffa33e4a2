"""Unusual but valid inputs through the whole job: each comes out ok, at the right size, mode and bit depth."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support.catalog import job_config, write_catalog

import media
from pipeline.config import validate_config
from pipeline.run import EXIT_OK, run_job


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(width: int, height: int, channels: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    top = 65535 if dtype == np.uint16 else 255
    return np.random.default_rng(seed).integers(0, top + 1, size=(height, width, channels)).astype(dtype)


def unusual_inputs() -> dict[str, tuple[bytes, tuple[int, int], str, int, str]]:
    """key -> (bytes, displayed (width, height), expected output layout, bit depth, output Pillow format)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    rgb = Image.fromarray(_noise(6, 4, 3))
    palette = Image.fromarray(_noise(6, 5, 3, seed=1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    rotated = rgb.copy()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    frames = [Image.fromarray(_noise(5, 4, 3, seed=s)).convert("P") for s in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return {
        "one-pixel.png": (_save(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG"), (1, 1), "RGB", 8, "PNG"),
        "strip.png": (_save(Image.fromarray(_noise(10000, 8, 3, seed=2)), "PNG"), (10000, 8), "RGB", 8, "PNG"),
        "cmyk.jpg": (_save(Image.frombytes("CMYK", (6, 4), _noise(6, 4, 4, seed=3).tobytes()), "JPEG", quality=95),
                     (6, 4), "RGB", 8, "JPEG"),
        "sixteen-bit.png": (_save(Image.fromarray(_noise(5, 3, 1, seed=4, dtype=np.uint16)[:, :, 0]), "PNG"),
                            (5, 3), "L", 16, "PNG"),
        "palette-transparent.png": (_save(palette, "PNG"), (6, 5), "RGBA", 8, "PNG"),
        "grey-alpha.png": (_save(Image.fromarray(_noise(4, 4, 2, seed=5)), "PNG"), (4, 4), "LA", 8, "PNG"),
        "exif-rotated.jpg": (_save(rotated, "JPEG", exif=exif.tobytes(), quality=95), (4, 6), "RGB", 8, "JPEG"),
        "animated.gif": (animated.getvalue(), (5, 4), "RGB", 8, "GIF"),
        "photo.webp": (_save(rgb, "WEBP", lossless=True), (6, 4), "RGB", 8, "WEBP"),
        "phone.heic": (_save(Image.fromarray(_noise(8, 6, 3, seed=6)), "HEIF", quality=90), (8, 6), "RGB", 8, "HEIF"),
        "ünï cødé/фото 1 (copy).png": (_save(rgb, "PNG"), (6, 4), "RGB", 8, "PNG"),
    }


@pytest.mark.slow
def test_unusual_inputs_come_out_right(ray_local, tmp_path):
    cases = unusual_inputs()
    write_catalog(tmp_path / "in", {key: case[0] for key, case in cases.items()})
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), output={"format": "same"},
                        compute={"batch_size": 4})
    assert run_job(validate_config(config)) == EXIT_OK
    rows = pq.read_table(sorted((tmp_path / "out").glob("_manifests/run=*/part-*.parquet"))).to_pandas()
    rows = rows.set_index("source_key")
    assert sorted(rows.index) == sorted(cases) and set(rows.status) == {"ok"}
    for key, (_, (width, height), layout, depth, fmt) in cases.items():
        row = rows.loc[key]
        assert row.output_key == key  # "same": every output keeps its input's key and format
        assert (row.width, row.height, row.out_width, row.out_height) == (width, height, 2 * width, 2 * height), key
        decoded = media.decode_image((tmp_path / "out" / key).read_bytes(), key, 10**8)
        assert decoded.pixels.shape[:2] == (2 * height, 2 * width), key
        assert (decoded.info.channels, decoded.info.bit_depth, decoded.info.format) == (layout, depth, fmt), key
    assert Image.open(tmp_path / "out" / "cmyk.jpg").mode == "CMYK"  # written back as CMYK
