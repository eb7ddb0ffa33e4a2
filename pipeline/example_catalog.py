"""A small example catalog made at run time from the photos scikit-image ships (no images in the repository)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .storage import Location

# (skimage.data loader, key in the catalog, Pillow format): a few folders and formats, colour and greyscale.
PHOTOS = (
    ("astronaut", "people/astronaut.jpg", "JPEG"),
    ("chelsea", "animals/chelsea the cat.png", "PNG"),
    ("coffee", "food/coffee.jpg", "JPEG"),
    ("rocket", "space/rocket.webp", "WEBP"),
    ("camera", "people/cameraman.png", "PNG"),
)
MAX_SIDE = 96  # small enough that the bundled model on a laptop CPU finishes in minutes, and worth upscaling


def example_photo(name: str, max_side: int = MAX_SIDE) -> Image.Image:
    import skimage.data

    image = Image.fromarray(np.asarray(getattr(skimage.data, name)()))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def lay_out_example_catalog(location: Location, max_side: int = MAX_SIDE) -> list[str]:
    """Write the example photos under ``location`` (atomically, like any output) and return their keys."""
    keys = []
    for name, key, image_format in PHOTOS:
        buffer = io.BytesIO()
        options = {"quality": 90} if image_format in ("JPEG", "WEBP") else {}
        example_photo(name, max_side).save(buffer, format=image_format, **options)
        location.write_atomic(key, buffer.getvalue())
        keys.append(key)
    return keys
