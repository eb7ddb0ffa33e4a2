"""``dit4sr-upscale INPUT... -o OUTDIR``: super-resolve images and videos on one machine, without Ray.

Inputs are image or video files, directories (searched recursively) or fsspec URLs of either
(``s3://bucket/photos/``). Each image's output is ``OUTDIR/<name>.png`` (for a directory input, its path
relative to that directory); a video keeps its container (``.mp4`` stays ``.mp4``), frame timestamps, colour
tags and audio/subtitle streams, and all its frames share one noise field from ``--seed`` (no flicker from
noise) — through the same codec layer as the catalog job (``media.video``). Outputs are written to a
temporary name and renamed when complete, so a crash never leaves a partial file under the final name. An input
that cannot be read, is not an image, is truncated or exceeds ``--max-pixels`` fails alone with a one-line reason
on stderr; the others are
still processed. Exit codes as the catalog job's: 0 all written, 1 nothing could be done (an unloadable model, no
input naming anything) with one ``dit4sr-upscale: error:`` line, 2 a bad command line, 3 some inputs failed.

``--caption-model PATH`` prompts each input with its caption, as the paper runs DiT4SR "with LLaVA"
(``dit4sr.captioning``; greedy, so the same input always gets the same caption): every input is captioned first
(a video from the middle frame of its first segment, shared by all its frames), then the caption model is freed
and the DiT4SR model loads with its text encoders.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import fsspec
from PIL import Image

from .files import temp_name, write_atomic

if TYPE_CHECKING:
    import torch

# Inputs above this many pixels are refused before decoding (decompression bombs; x4 output is 16x larger).
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Job:
    source: str  # as the user can recognise it (URL or path)
    fs: fsspec.AbstractFileSystem
    path: str
    output: str  # relative output path, '/'-separated: .png for images, the source's name for videos


def _video_suffixes() -> frozenset[str]:
    from media import VIDEO_EXTENSIONS

    return VIDEO_EXTENSIONS


def is_video(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in _video_suffixes()


def _output_name(relative: str) -> str:
    """Images become PNGs; a video's container is chosen once it is indexed (its name is kept until then)."""
    return relative if is_video(relative) else PurePosixPath(relative).with_suffix(".png").as_posix()


def expand_inputs(inputs: list[str]) -> tuple[list[Job], list[tuple[str, str]]]:
    """Jobs for every image and video named by the inputs, and ``(input, reason)`` for inputs that name nothing."""
    from .image_processing import IMAGE_SUFFIXES  # torch: imported once there is work, not for --help

    suffixes = set(IMAGE_SUFFIXES) | _video_suffixes()
    jobs, errors = [], []
    for item in inputs:
        try:
            fs, path = fsspec.core.url_to_fs(item)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            prefix = "" if protocol in ("file", "local") else f"{protocol}://"
            if fs.isdir(path):
                found = sorted(p for p in fs.find(path) if PurePosixPath(p).suffix.lower() in suffixes)
                if not found:
                    errors.append((item, "directory contains no image or video files"))
                base = path.rstrip("/")
                for p in found:
                    jobs.append(Job(prefix + p, fs, p, _output_name(p[len(base):].lstrip("/"))))
            elif fs.isfile(path):
                jobs.append(Job(item, fs, path, _output_name(PurePosixPath(path).name)))
            else:
                errors.append((item, "no such file or directory"))
        except Exception as error:  # noqa: BLE001 - any listing failure is this input's failure alone
            errors.append((item, _reason(error)))
    return jobs, errors


def _reason(error: BaseException) -> str:
    message = " ".join(str(error).split()) or repr(error)
    return f"{type(error).__name__}: {message}"


def read_image(job: Job, max_pixels: int) -> Image.Image:
    data = job.fs.cat_file(job.path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise ValueError("not a recognised image file") from None
    except Image.DecompressionBombError:
        raise ValueError(f"more pixels than --max-pixels {max_pixels} (possible decompression bomb)") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ValueError(f"{image.width}x{image.height} = {pixels} pixels exceeds --max-pixels {max_pixels}")
    image.load()  # decode now, so truncated files fail here with their own message
    return image


def save_png(image: Image.Image, target: Path) -> None:
    """PNG under a temporary name in the target folder, then renamed: readers never see a partial file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(fsspec.filesystem("file"), str(target), buffer.getvalue())


def video_caption_frame(job: Job, segment_seconds: float = 4.0):
    """The frame a video's caption describes, as the catalog job chooses it with its default ``video`` settings:
    the middle frame of its first segment of about ``segment_seconds``, so both give a video the same caption."""
    from media import video

    with job.fs.open(job.path, "rb", block_size=1 << 20) as handle:
        index = video.index_video(handle, job.source)
        rate = index.average_rate or (index.frames / index.duration if index.duration else 24)
        segment = video.plan_segments(index, max(1, round(segment_seconds * float(rate))))[0]
        packets = video.extract_segment(handle, segment, job.source)
    frames = video.decode_segment(packets, segment, job.source)
    middle = next(frame for number, frame in enumerate(frames) if number == segment.output_frames // 2)
    frames.close()
    return middle


def caption_inputs(jobs: list[Job], captioner, max_pixels: int, quiet: bool) -> tuple[dict[str, str], list]:
    """Each input's caption (``--caption-model``): an image's own, a video's from its caption frame; returns the
    captions by source and ``(source, reason)`` for inputs that could not be captioned."""
    from tqdm.auto import tqdm

    captions, failures = {}, []
    for job in tqdm(jobs, desc="caption", unit="input", disable=quiet):
        try:
            image = video_caption_frame(job) if is_video(job.path) else read_image(job, max_pixels)
            captions[job.source] = captioner.caption(image)
            tqdm.write(f"{PROG}: caption {job.source}: {captions[job.source]}", file=sys.stderr)
        except Exception as error:  # noqa: BLE001 - a bad input fails alone
            reason = _reason(error)
            tqdm.write(_failed(job.source, reason), file=sys.stderr)
            failures.append((job.source, reason))
    return captions, failures


def has_text_encoders(model: str) -> bool:
    from .loading import TEXT_COMPONENTS, read_json, resolve_root

    try:
        index = read_json(resolve_root(model), "model_index.json", None)
    except Exception:  # noqa: BLE001 - an unreadable model is reported when it is loaded
        index = None
    return index is None or all(index.get(name) and index[name][0] for name in TEXT_COMPONENTS)


def load_captioner(path: str, device: str | None):
    """``dit4sr.ImageCaptioner`` from ``path``, checked first from its small files (one-line errors)."""
    from .captioning import ImageCaptioner, inspect_caption_model

    inspect_caption_model(path)
    return ImageCaptioner.from_pretrained(path, device=device)


def upscale_video(job: Job, pipe, scale: int, seed: int, settings: dict, output_dir: Path,
                  segment_frames: int = 48, frames_per_call: int = 4) -> Path:
    """Upscale one video segment by segment (never a whole film in memory), every frame from one noise field
    (and one prompt: ``settings``), then remux the segments with the source's audio and subtitles into the
    output."""
    from media import video

    def opened():
        return job.fs.open(job.path, "rb", block_size=1 << 20)

    with opened() as handle:
        index = video.index_video(handle, job.source)
    encoding = video.VideoEncoding().for_clip(index, index.width * scale, index.height * scale)
    extension = video.output_container(job.path, index, encoding.codec)
    target = output_dir / PurePosixPath(job.output).with_suffix(extension)
    with tempfile.TemporaryDirectory(prefix="dit4sr-video-") as folder:
        staged = []
        for number, segment in enumerate(video.plan_segments(index, segment_frames)):
            with opened() as handle:
                packets = video.extract_segment(handle, segment, job.source)
            encoder = video.SegmentEncoder(index, encoding, index.width * scale, index.height * scale)
            timestamps = iter(index.pts[segment.start:segment.stop])
            frames = video.decode_segment(packets, segment, job.source)
            while chunk := list(itertools.islice(frames, frames_per_call)):
                for image in pipe(chunk, upscale=scale, seed=seed, output_type="np", show_progress=False,
                                  **settings).images:
                    encoder.add(image, next(timestamps))
            staged.append(os.path.join(folder, f"{number:06d}.segment"))
            Path(staged[-1]).write_bytes(encoder.finish())
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.parent / temp_name(target.name)
        try:
            with opened() as handle:
                video.assemble(handle, staged, str(temporary), index, job.source, container=extension)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    return target


PROG = "dit4sr-upscale"
DESCRIPTION = """Super-resolve images and videos on one machine, without Ray.

Each image becomes OUTDIR/<name>.png (for a folder input, its path inside that folder); a video keeps its
container, timestamps, colour tags, audio and subtitles, all its frames from one noise field. A bad input fails
alone with one line; the others are still done. Outputs appear complete or not at all.

exit codes: 0 all written, 1 nothing could be done (one error line), 2 a bad command line, 3 some inputs failed"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image or video files, directories or fsspec URLs")
    parser.add_argument("-o", "--output-dir", required=True, help="local folder for the outputs (PNG for images)")
    parser.add_argument("--model", default="bundled", help="'bundled' (default), a model folder or an fsspec URL")
    parser.add_argument("--scale", type=int, default=4, help="upscaling factor (default 4)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's recommended)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: recommended)")
    parser.add_argument("--seed", type=int, default=0,
                        help="noise seed (default 0): the same seed, input and settings give the same output bytes")
    parser.add_argument("--tile-size", type=int, help="latent tile size (default: recommended)")
    parser.add_argument("--tile-overlap", type=int, help="latent tile overlap (default: recommended)")
    parser.add_argument("--color-fix", choices=("adain", "wavelet", "none"), help="default: recommended")
    parser.add_argument("--caption-model", metavar="PATH",
                        help="prompt each input with its caption by this image-text-to-text model (a Hugging Face "
                             "folder or fsspec URL, e.g. llava-hf/llava-1.5-13b-hf as downloaded), as the paper "
                             "runs DiT4SR; needs a model with text encoders")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to run (default auto: CUDA where there is a GPU, else the CPU)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the transformer's blocks (auto: on CUDA, where it pays for itself)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse inputs with more pixels than this (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def should_compile(choice: str, device: torch.device) -> bool:
    """Compiling costs tens of seconds once and halves a GPU's time per tile; on a CPU it rarely pays."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def _failed(item: str, reason: str) -> str:
    return f"{PROG}: failed {item}: {reason}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_pixels < 1:
        parser.error("--max-pixels must be positive")
    import pillow_heif
    from tqdm.auto import tqdm

    # Our own limit is checked explicitly; Pillow's (lower by default) must not pre-empt a larger one.
    Image.MAX_IMAGE_PIXELS = args.max_pixels
    pillow_heif.register_heif_opener()

    from .pipeline_dit4sr import DiT4SRPipeline

    jobs, failures = expand_inputs(args.inputs)
    for item, reason in failures:
        print(_failed(item, reason), file=sys.stderr)
    seen: dict[str, str] = {}
    unique = []
    for job in jobs:
        if job.output in seen:
            reason = f"output name {job.output} already taken by {seen[job.output]}"
            print(_failed(job.source, reason), file=sys.stderr)
            failures.append((job.source, reason))
        else:
            seen[job.output] = job.source
            unique.append(job)
    if not unique:
        return _error("nothing to upscale: no input names an image or video")

    device = None if args.device == "auto" else args.device
    captions: dict[str, str] = {}
    if args.caption_model:  # captions first, then the caption model goes: the two need not share the GPU
        if not has_text_encoders(args.model):
            return _error(f"--caption-model: model {args.model} has no text encoders to encode captions with (use a "
                          "root with text_encoder, _2 and _3, e.g. Stable Diffusion 3.5 Medium's)")
        try:
            captioner = load_captioner(args.caption_model, device)
        except Exception as error:  # noqa: BLE001 - reported as one line, like every other failure
            return _error(f"cannot load caption model {args.caption_model}: {_reason(error)}")
        captions, caption_failures = caption_inputs(unique, captioner, args.max_pixels, args.quiet)
        failures += caption_failures
        unique = [job for job in unique if job.source in captions]
        del captioner
        _free_gpu_memory()
    try:
        pipe = DiT4SRPipeline.from_pretrained(args.model, device=device, load_text_encoders=bool(captions))
    except Exception as error:  # noqa: BLE001 - reported as one line, like every other failure
        return _error(f"cannot load model {args.model}: {_reason(error)}")
    if should_compile(args.compile, pipe.execution_device):
        pipe.enable_compile()
    settings = {k: v for k, v in {
        "num_inference_steps": args.steps, "guidance_scale": args.guidance, "tile_size": args.tile_size,
        "tile_overlap": args.tile_overlap, "color_fix": args.color_fix,
    }.items() if v is not None}

    output_dir = Path(args.output_dir)
    written = 0
    for job in tqdm(unique, desc="upscale", unit="image", disable=args.quiet):
        prompted = {**settings, "prompt": captions.get(job.source, "")}
        try:
            if is_video(job.path):
                upscale_video(job, pipe, args.scale, args.seed, prompted, output_dir)
            else:
                image = read_image(job, args.max_pixels)
                result = pipe(image, upscale=args.scale, seed=args.seed, output_type="pil", show_progress=False,
                              **prompted).images[0]
                save_png(result, output_dir / job.output)
            written += 1
        except Exception as error:  # noqa: BLE001 - a bad input fails alone
            reason = _reason(error)
            tqdm.write(_failed(job.source, reason), file=sys.stderr)
            failures.append((job.source, reason))
    print(f"{PROG}: {written} written to {output_dir}, {len(failures)} failed", file=sys.stderr)
    return 3 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
