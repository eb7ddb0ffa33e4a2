"""Small example catalogs made at run time from the photos scikit-image ships (no media in the repository):
photos, or a short film (a camera pan with a sound track) and a frame sequence (a slow zoom)."""

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


FILM_KEY = "films/astronaut pan.mp4"
REEL_FOLDER = "reels/coffee"
FILM_SIZE, FILM_FRAMES, FILM_RATE = (96, 64), 48, 24
REEL_FRAMES = 12


def _pan(photo: np.ndarray, frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """A left-to-right camera pan across `photo` (crops of `size` moving one pixel per frame)."""
    width, height = size
    top = (photo.shape[0] - height) // 2
    return [np.ascontiguousarray(photo[top:top + height, i:i + width]) for i in range(frames)]


def example_film(path: str) -> None:
    """A 2 s H.264 + AAC clip at 24 fps: a pan over the astronaut, with a 440 Hz tone."""
    import av

    photo = np.asarray(example_photo("astronaut", FILM_SIZE[0] + FILM_FRAMES))
    with av.open(path, "w") as container:
        video = container.add_stream("libx264", rate=FILM_RATE, options={"crf": "20", "threads": "1"})
        video.width, video.height, video.pix_fmt = *FILM_SIZE, "yuv420p"
        audio = container.add_stream("aac", rate=48000, layout="mono")
        for index, pixels in enumerate(_pan(photo, FILM_FRAMES, FILM_SIZE)):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())
        samples = FILM_FRAMES * 48000 // FILM_RATE
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode())


def lay_out_example_videos(location: Location) -> list[str]:
    """Write the example film and frame sequence under ``location`` and return their keys."""
    import tempfile

    keys = []
    with tempfile.TemporaryDirectory() as folder:
        film = f"{folder}/film.mp4"
        example_film(film)
        with open(film, "rb") as handle:
            location.write_atomic(FILM_KEY, handle.read())
        keys.append(FILM_KEY)
    photo = example_photo("coffee", 2 * MAX_SIDE)
    for index in range(REEL_FRAMES):  # a slow zoom into the cup
        inset = index * 2
        frame = photo.crop((inset, inset, photo.width - inset, photo.height - inset)).resize(
            (MAX_SIDE, MAX_SIDE * photo.height // photo.width), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        keys.append(f"{REEL_FOLDER}/frame_{index + 1:04d}.png")
        location.write_atomic(keys[-1], buffer.getvalue())
    return keys
