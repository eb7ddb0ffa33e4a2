"""Job configuration: YAML files validated by pydantic, ``--set key=value`` overrides, and the fingerprint.

Unknown keys and wrong types are errors naming the offending key, so a typo in a nightly job's config fails
at submit time instead of silently running with a default.
"""

from __future__ import annotations

import hashlib
import json
import os
from fractions import Fraction
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dit4sr.validation import validation_problems
from media import OUTPUT_FORMATS


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the cause."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    uri: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    include: list[str] = Field(default_factory=lambda: ["**"])
    exclude: list[str] = Field(default_factory=list)
    # false: the globs ignore case, so "**/*.jpg" also takes IMG_0001.JPG and .Jpeg (cameras and phones write
    # upper case); true: exactly as written.
    case_sensitive: bool = False
    # Lay out a small example catalog when the input folder is empty or absent: true or "photos" (skimage
    # photos), "videos" (a short film with sound and a frame sequence, made from skimage photos). Only in the
    # folder the config file names: `--set input.uri=...` turns it off (load_config).
    example_catalog: bool | Literal["photos", "videos"] = False
    # An S3 Inventory report to plan from instead of listing input.uri (buckets of millions of keys): its
    # manifest.json, or the inventory configuration's folder (<destination prefix>/<source bucket>/<config id>/:
    # the newest report there). CSV or Parquet, with the Size and ETag fields; read with storage_options.
    inventory: str | None = None

    @model_validator(mode="after")
    def _inventory_of_a_bucket(self) -> "InputConfig":
        if self.inventory and not self.uri.startswith(("s3://", "s3a://")):
            raise ValueError(f"inventory: S3 Inventory lists a bucket, but input.uri {self.uri!r} is not an s3:// URI")
        return self


class OutputConfig(_Section):
    uri: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    format: Literal[OUTPUT_FORMATS] = "png"  # type: ignore[valid-type]
    quality: int = Field(95, ge=1, le=100)


class ModelConfig(_Section):
    # "bundled", a checkpoint root (path or fsspec URL), or "bicubic" (plain resize: tests and plumbing runs only).
    path: str = "bundled"
    # The official arrangement: `path` is a Stable Diffusion 3.5 Medium root (VAE, scheduler, text encoders) and
    # `transformer` a DiT4SR checkpoint root (its transformer/ folder, NULL_*.pt prompt embeddings).
    transformer: str | None = None
    release: Literal["v1", "r1"] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None  # None: CUDA when the actor holds a GPU, else CPU
    storage_options: dict[str, Any] = Field(default_factory=dict)


class CaptionConfig(_Section):
    """Each input's caption as its prompt, as the paper runs DiT4SR "with LLaVA" (dit4sr.captioning)."""

    # A Hugging Face image-text-to-text model folder (local path or fsspec URL; e.g. llava-hf/llava-1.5-13b-hf as
    # downloaded). None: no captions.
    model: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    question: str | None = None  # None: the official DiT4SR question (dit4sr.OFFICIAL_CAPTION_QUESTION)
    max_new_tokens: int = Field(512, ge=1)
    # Drop the answer's sentences about focus, bokeh, blur, depth... (the official remove_focus_sentences).
    filter_focus_sentences: bool = True
    # auto: bfloat16 where caption actors get GPUs, float32 on the CPU. Part of the fingerprint (it can change words).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class UpscaleConfig(_Section):
    scale: int = Field(4, ge=1, le=8)
    # None means "the model's recommended setting"; resolved before fingerprinting.
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    seed: int = 0
    tile_size: int | None = Field(None, ge=16)
    tile_overlap: int | None = Field(None, ge=0)
    color_fix: Literal["adain", "wavelet", "none"] | None = None
    prompt: str = ""
    # Optional Parquet/CSV table with columns `source` (path relative to input.uri) and `prompt`. With captions on,
    # a source listed there takes its prompt from the table and is not captioned.
    prompts_uri: str | None = None
    caption: CaptionConfig = Field(default_factory=CaptionConfig)

    @model_validator(mode="after")
    def _one_prompt_source(self) -> "UpscaleConfig":
        if self.caption.model and self.prompt:
            raise ValueError("prompt and caption.model exclude each other: a fixed prompt needs no captions "
                             "(leave prompt empty to caption each input)")
        return self


class LimitsConfig(_Section):
    max_input_pixels: int = Field(40_000_000, ge=1)
    max_output_pixels: int = Field(400_000_000, ge=1)  # per image and video frame; DiT4SR: also the canvas it samples
    max_video_seconds: float | None = Field(None, gt=0)  # longer videos fail alone (None: no limit)


def sequence_rate(value: float | str) -> Fraction:
    """Frames per second as an exact ratio: 24 -> 24, 23.976 -> 2997/125, "24000/1001" -> 24000/1001."""
    try:
        rate = Fraction(str(value).strip()).limit_denominator(1_000_000)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"frames per second: a number or a ratio such as 24000/1001, got {value!r}") from None
    if not 0 < rate <= 1000:
        raise ValueError(f"frames per second must be above 0 and at most 1000, got {value!r}")
    return rate


class VideoConfig(_Section):
    """Video files and frame sequences: how clips are cut, sampled and written back."""

    # Segments (units of work shared by the actor pool) span about this long; a short clip is one segment.
    segment_seconds: float = Field(4.0, gt=0)
    # consistent: every frame of a clip starts from one noise field (no flicker from noise);
    # independent: a seed per frame (for comparison only).
    noise: Literal["consistent", "independent"] = "consistent"
    # auto: H.264, or H.265 above 4K, above 8 bits and for HDR; prores (422 HQ/4444) and dnxhr (HQX/444) in MOV
    # and ffv1 (lossless, Matroska) for archive masters.
    codec: Literal["auto", "h264", "h265", "ffv1", "prores", "dnxhr"] = "auto"
    crf: int = Field(18, ge=0, le=51)
    preset: str = "medium"
    pix_fmt: str | None = None  # None: like the source (10-bit sources stay 10-bit where the codec allows)
    # Added to the encoder's options: tune, g (keyframe interval), x264-params/x265-params (appended to ours), ...
    encoder_options: dict[str, str | int | float] = Field(default_factory=dict)
    # Interlaced sources (tape, DV, DVD, broadcast): auto deinterlaces what is coded interlaced (FFmpeg's bwdif, one
    # frame per frame), on deinterlaces everything, off upscales woven fields (combing is magnified: wrong for
    # interlaced content).
    deinterlace: Literal["auto", "on", "off"] = "auto"
    # Where a clip is deinterlaced: frame keeps the source's frame rate (one frame per frame); field doubles it (one
    # frame per field, each at its field's time: 50i becomes 50p, smoother motion, twice the frames to upscale).
    deinterlace_rate: Literal["frame", "field"] = "frame"
    frames_per_call: int = Field(4, ge=1)  # frames sampled together (their tiles share transformer batches)
    measure_flicker: bool = True  # record each clip's flicker figure (output vs bicubic) in its manifest row
    # Folders (globs relative to input.uri) whose numbered image files are frame sequences, one clip per
    # folder and name pattern; elsewhere numbered images stay photos. Frames of a sequence share a pattern:
    # the same name with only the number changed (reel_01/frame_000001.tif, ...).
    sequence_folders: list[str] = Field(default_factory=list)
    # Also write each frame sequence as a movie at this many frames per second (24, 25, 29.97 or "24000/1001"),
    # beside its frames: reels/coffee/frame_%04d.png -> reels/coffee/frame.mp4 (.mov for prores/dnxhr, .mkv for
    # ffv1), encoded with the settings above. None: frames only (pipeline/sequence_movie.py).
    sequence_fps: float | str | None = None

    @field_validator("sequence_fps")
    @classmethod
    def _frame_rate(cls, value: float | str | None) -> float | str | None:
        if value is not None:
            sequence_rate(value)  # names the problem
        return value

    def sequence_rate(self) -> Fraction | None:
        """`sequence_fps` as an exact ratio (None when unset)."""
        return None if self.sequence_fps is None else sequence_rate(self.sequence_fps)

    @model_validator(mode="after")
    def _encodable(self) -> "VideoConfig":
        self.encoding()  # names the problem
        return self

    def encoding(self):
        from media.video import VideoEncoding

        return VideoEncoding(codec=self.codec, crf=self.crf, preset=self.preset, pix_fmt=self.pix_fmt,
                             encoder_options=self.encoder_options)


class ActorsConfig(_Section):
    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ActorsConfig":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class CaptionComputeConfig(_Section):
    """The captioning and prompt-encoding stages' actors (one pool each, these resources per actor)."""

    actors: ActorsConfig = Field(default_factory=ActorsConfig)
    gpus_per_actor: float | None = Field(None, ge=0)  # None: 1 where the upscaling actors get GPUs, else 0
    cpus_per_actor: float = Field(1, ge=0)
    batch_size: int = Field(4, ge=1)


class ComputeConfig(_Section):
    actors: ActorsConfig = Field(default_factory=ActorsConfig)
    gpus_per_actor: float = Field(0, ge=0)
    cpus_per_actor: float = Field(1, ge=0)
    batch_size: int = Field(4, ge=1)
    torch_threads: int | None = Field(None, ge=1)
    # torch.compile of the DiT4SR transformer's blocks, once per actor (dit4sr.compile). auto: on when actors get
    # GPUs and run on CUDA, off on the CPU. Compiled outputs differ from eager by rounding: part of the fingerprint.
    compile: Literal["auto", "on", "off"] = "auto"
    caption: CaptionComputeConfig = Field(default_factory=CaptionComputeConfig)

    @property
    def caption_gpus(self) -> float:
        """GPUs per captioning/prompt-encoding actor, ``caption.gpus_per_actor`` resolved."""
        if self.caption.gpus_per_actor is not None:
            return self.caption.gpus_per_actor
        return 1.0 if self.gpus_per_actor > 0 else 0.0

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value  # YAML on/off


class LockConfig(_Section):
    """The run lock (pipeline.run_lock): one run at a time per output.uri."""

    enabled: bool = True
    ttl_s: float = Field(300, ge=1)  # a dead run's lock is taken over this long after its last renewal
    wait_s: float = Field(0, ge=0)  # 0: exit at once (code 4) when another run holds it; else wait this long


class RunConfig(_Section):
    progress_interval_s: float = Field(30, gt=0)
    lock: LockConfig = Field(default_factory=LockConfig)


class JobConfig(_Section):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    upscale: UpscaleConfig = Field(default_factory=UpscaleConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    run: RunConfig = Field(default_factory=RunConfig)


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML config, apply ``key=value`` overrides (values parsed as YAML), and validate."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    written = data.get("input") if isinstance(data.get("input"), dict) else {}
    written_uri = written.get("uri")
    for assignment in overrides or []:
        _apply_override(data, assignment)
    _example_catalog_only_where_written(data, written_uri, overrides or [])
    return validate_config(data, source=str(path))


def _example_catalog_only_where_written(data: dict[str, Any], written_uri: Any, overrides: list[str]) -> None:
    """``input.example_catalog`` belongs to the folder its config file names. An ``input.uri`` given with --set
    is the user's own folder, which must exist: a mistyped one is an error, never a demo (unless the override
    asks for the example there too)."""
    section = data.get("input")
    asked = any(assignment.partition("=")[0].strip() == "input.example_catalog" for assignment in overrides)
    if isinstance(section, dict) and section.get("uri") != written_uri and not asked:
        section["example_catalog"] = False


def validate_config(data: dict[str, Any], source: str = "<dict>") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        problems = "".join(f"\n  {problem}" for problem in validation_problems(exc))
        raise ConfigError(f"invalid config {source}:{problems}") from None


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of resolved settings that change output bytes (see ``spec.RunSpec.fingerprint_fields``)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
