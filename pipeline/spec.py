"""The run spec: everything past planning needs, resolved once from the validated config (``RunSpec.resolve``).

Settings travel from ``configs/`` through ``config.py`` (validated), here (resolved: model defaults filled in from
the model's small JSON files, ``auto`` values decided), to the module that acts on them — never the config itself.
The spec is immutable, typed and small, so it travels unchanged to every Ray task and actor. What changes output
bytes is what the config fingerprint hashes (``fingerprint_fields``); engines run from those same values, so what
was fingerprinted is exactly what runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from media.video import VideoEncoding

from .config import ConfigError, InputConfig, JobConfig, VideoConfig, fingerprint
from .storage import Location

# Bumped when the video layer's output bytes change for the same settings (a re-run then redoes videos):
# 2 = explicit colour tags on every output, BT.709 at HD sizes for SD sources, interlaced sources deinterlaced.
VIDEO_LAYER_VERSION = 2
BICUBIC_VERSION = "pil-bicubic-1"
# What ``compute.compile`` folds into the fingerprint when on: the compile scheme (dit4sr.compile). Eager runs
# carry no key, so their fingerprints are those of runs made before compiling existed.
COMPILE_SCHEME = "regional-dynamic-batch"
_QUALITY_FORMATS = ("jpeg", "webp", "avif", "heic", "same")


def engine_kind(path: str) -> str:
    """``model.path``: ``bicubic``, a plug-in factory (``package.module:factory``), or a DiT4SR root."""
    if path == "bicubic":
        return "bicubic"
    module, sep, _ = path.partition(":")
    if sep and "://" not in path and module.replace(".", "").replace("_", "").isalnum():
        return "plugin"
    return "dit4sr"


def plugin_factory(path: str) -> Any:
    """The ``factory(settings) -> Engine`` a plug-in ``model.path`` names."""
    module, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.path: cannot import engine factory {path!r}: {exc}") from exc


# -- the records -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InputSpec:
    """Where the inputs are and which files count (``input``), and the per-source prompts' table."""

    location: Location
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    case_sensitive: bool
    inventory: str | None
    prompts_uri: str | None  # upscale.prompts_uri, read with the input's storage options

    @classmethod
    def of(cls, section: InputConfig, prompts_uri: str | None = None) -> "InputSpec":
        return cls(Location(section.uri, section.storage_options), tuple(section.include), tuple(section.exclude),
                   section.case_sensitive, section.inventory, prompts_uri)


@dataclass(frozen=True, slots=True)
class OutputSpec:
    location: Location
    format: str  # a media.OUTPUT_FORMATS name or `same`
    quality: int | None  # for lossy formats only (None elsewhere: it changes no byte there)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Which engine runs and where its weights are (none of the operational fields changes output bytes)."""

    kind: str  # dit4sr | bicubic | plugin (engine_kind)
    path: str
    transformer: str | None
    release: str | None
    dtype: str
    storage_options: tuple[tuple[str, Any], ...]
    device: str | None  # None: CUDA when the actor holds a GPU, else CPU
    torch_threads: int
    compile: bool  # compute.compile resolved at plan time (DiT4SR only)
    identity: str | None = None  # DiT4SR: the hash of the model's JSON files and its files' names and sizes
    plugin_version: Any = None  # a plug-in factory's `version` attribute

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.storage_options)

    @property
    def root(self) -> str:
        """The model root (the bundled tiny model resolved)."""
        import dit4sr

        return dit4sr.BUNDLED_MODEL if self.path == "bundled" else self.path


@dataclass(frozen=True, slots=True)
class Sampler:
    """DiT4SR's sampler as every actor runs it: config > the model's recommended_settings.json > the official
    defaults (``dit4sr.OFFICIAL_SETTINGS``). All fields but ``version`` are ``DiT4SRPipeline`` call arguments."""

    version: str  # dit4sr.SAMPLER_VERSION
    num_inference_steps: int
    guidance_scale: float
    start_point: str
    tile_size: int
    tile_overlap: int
    tile_weighting: str
    color_fix: str
    process_size: int
    negative_prompt: str | None
    added_prompt: str | None
    vae_tiling: Any

    def call_arguments(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "version"}

    def prompt_text(self, prompt: str) -> str:
        from dit4sr import compose_prompt

        return compose_prompt(prompt, self.added_prompt)

    @property
    def negative_text(self) -> str | None:
        """The negative prompt where guidance uses it, else None."""
        return (self.negative_prompt or None) if self.guidance_scale > 1 else None


@dataclass(frozen=True, slots=True)
class Geometry:
    """The model's shape facts that decide DiT4SR's tile grid (``dit4sr.geometry``)."""

    vae_scale_factor: int
    patch_size: int
    pos_embed_max_size: int | None  # the transformer's largest latent side in patches (follows from the model)


@dataclass(frozen=True, slots=True)
class Captioning:
    """``upscale.caption`` resolved: what decides each caption (fingerprinted) and how its actors load the model."""

    model: str
    model_identity: str
    question: str
    max_new_tokens: int
    filter_focus_sentences: bool
    dtype: str
    version: str  # dit4sr.CAPTIONING_VERSION
    storage_options: tuple[tuple[str, Any], ...]

    def fingerprint_fields(self) -> dict[str, Any]:
        return {"model": self.model, "model_identity": self.model_identity, "question": self.question,
                "max_new_tokens": self.max_new_tokens, "filter_focus_sentences": self.filter_focus_sentences,
                "dtype": self.dtype, "version": self.version}

    @property
    def fingerprint(self) -> str:
        """What a caption depends on besides the input: a caption stored with this fingerprint is reused."""
        return fingerprint(self.fingerprint_fields())


@dataclass(frozen=True, slots=True)
class VideoSettings:
    """What changes a clip's bytes beyond the photo settings, and how clips are cut and sampled (``video``)."""

    segment_seconds: float
    noise: str  # consistent | independent
    deinterlace: str  # auto | on | off
    encoding: VideoEncoding  # its codec may be `auto`: resolved per clip (`VideoEncoding.for_clip`)
    sequence_fps: Fraction | None = None  # frame sequences also become a movie at this rate (pipeline.sequence_movie)
    deinterlace_rate: str = "frame"  # frame | field (one output frame per field, where a clip is deinterlaced)
    sequence_folders: tuple[str, ...] = ()
    frames_per_call: int = 4  # frames sampled together
    measure_flicker: bool = True

    @classmethod
    def of(cls, video: VideoConfig) -> "VideoSettings":
        return cls(segment_seconds=video.segment_seconds, noise=video.noise, deinterlace=video.deinterlace,
                   deinterlace_rate=video.deinterlace_rate, encoding=video.encoding(),
                   sequence_fps=video.sequence_rate(), sequence_folders=tuple(video.sequence_folders),
                   frames_per_call=video.frames_per_call, measure_flicker=video.measure_flicker)

    def fingerprint_fields(self) -> dict[str, Any]:
        # The encoder's pinned thread count shapes x264/x265 bitstreams: a change of it must redo videos.
        encoding = dataclasses.asdict(self.encoding)
        # deinterlace_rate only where it is not the default: the fingerprints of runs from before it stay valid.
        rate = {} if self.deinterlace_rate == "frame" else {"deinterlace_rate": self.deinterlace_rate}
        return {"segment_seconds": self.segment_seconds, "noise": self.noise, "deinterlace": self.deinterlace, **rate,
                **{key: encoding[key] for key in ("codec", "crf", "preset", "pix_fmt")},
                "encoder_options": [list(pair) for pair in self.encoding.encoder_options],
                "encoder_threads": self.encoding.threads, "video_layer": VIDEO_LAYER_VERSION}

    def movie_fingerprint_fields(self) -> dict[str, Any]:
        """What a sequence's movie depends on beyond its frames: the rate and the encoder."""
        fields = self.fingerprint_fields()
        for key in ("segment_seconds", "noise", "deinterlace", "deinterlace_rate"):
            fields.pop(key, None)
        return {**fields, "sequence_fps": str(self.sequence_fps)}


@dataclass(frozen=True, slots=True)
class Limits:
    max_input_pixels: int
    max_output_pixels: int  # per image and video frame; DiT4SR: also the canvas it samples
    max_video_seconds: float | None


@dataclass(frozen=True, slots=True)
class Stage:
    """One actor stage of the Ray Data stream: its pool and each actor's resources."""

    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    batch_size: int

    @property
    def threads(self) -> int:
        """torch threads of an actor of this stage (its CPUs, at least one)."""
        return max(1, int(self.cpus_per_actor))


@dataclass(frozen=True, slots=True)
class RunSpec:
    run_id: str
    scale: int
    seed: int  # the job's seed: per-unit seeds derive from it (engines without a seed setting still record theirs)
    prompt: str  # upscale.prompt (a per-source prompt of prompts_uri replaces it for its source)
    input: InputSpec
    output: OutputSpec
    model: ModelSpec
    sampler: Sampler | None  # DiT4SR only
    geometry: Geometry | None  # DiT4SR only
    caption: Captioning | None  # None: captions off
    video: VideoSettings
    limits: Limits
    upscaling: Stage  # compute: the upscaling actors
    captioning: Stage  # compute.caption: the captioning and prompt-encoding actors
    progress_interval_s: float

    @classmethod
    def resolve(cls, cfg: JobConfig, run_id: str) -> "RunSpec":
        """The spec of a run of ``cfg``. Raises ``ConfigError`` (one line) where the model or the caption model
        cannot run the config; reads the models' small JSON files only, never weights."""
        kind = engine_kind(cfg.model.path)
        upscale, compute = cfg.upscale, cfg.compute
        if kind == "bicubic" and (upscale.prompt or upscale.prompts_uri or upscale.caption.model):
            raise ConfigError("upscale.prompt / prompts_uri / caption.model: the bicubic engine takes no prompt")
        model = ModelSpec(kind=kind, path=cfg.model.path, transformer=cfg.model.transformer,
                          release=cfg.model.release, dtype=cfg.model.dtype,
                          storage_options=_frozen(cfg.model.storage_options), device=cfg.model.device,
                          torch_threads=compute.torch_threads or max(1, int(compute.cpus_per_actor)),
                          compile=kind == "dit4sr" and compile_enabled(cfg),
                          plugin_version=getattr(plugin_factory(cfg.model.path), "version", None)
                          if kind == "plugin" else None)
        sampler = geometry = None
        if kind == "dit4sr":
            model, sampler, geometry = _dit4sr(cfg, model)
        caption = None if kind == "bicubic" else _captioning(cfg)  # a caption model that cannot work fails here
        quality = cfg.output.quality if cfg.output.format in _QUALITY_FORMATS else None
        caption_stage = compute.caption
        return cls(
            run_id=run_id, scale=upscale.scale, seed=upscale.seed, prompt=upscale.prompt,
            input=InputSpec.of(cfg.input, upscale.prompts_uri),
            output=OutputSpec(Location(cfg.output.uri, cfg.output.storage_options), cfg.output.format, quality),
            model=model, sampler=sampler, geometry=geometry, caption=caption, video=VideoSettings.of(cfg.video),
            limits=Limits(cfg.limits.max_input_pixels, cfg.limits.max_output_pixels, cfg.limits.max_video_seconds),
            upscaling=Stage(compute.actors.min, compute.actors.max, compute.gpus_per_actor, compute.cpus_per_actor,
                            compute.batch_size),
            captioning=Stage(caption_stage.actors.min, caption_stage.actors.max, compute.caption_gpus,
                             caption_stage.cpus_per_actor, caption_stage.batch_size),
            progress_interval_s=cfg.run.progress_interval_s)

    # What changes output bytes ----------------------------------------------------------------------------------
    def fingerprint_fields(self) -> dict[str, Any]:
        """Everything that changes a photo's bytes, model defaults resolved: what the config fingerprint hashes, the
        run summary's ``settings`` and what plug-in factories receive. With captions on, the caption settings
        (``caption``) are part of it: they decide each input's prompt."""
        output = {"scale": self.scale, "output_format": self.output.format, "quality": self.output.quality}
        caption = {"caption": self.caption.fingerprint_fields()} if self.caption else {}
        model = self.model
        if model.kind == "bicubic":
            return {"engine": BICUBIC_VERSION, **output}
        if model.kind == "plugin":
            return {"engine": model.path, "version": model.plugin_version, "seed": self.seed, "prompt": self.prompt,
                    **output, **caption}
        sampler = self.sampler.call_arguments()
        return {"engine": "dit4sr", "sampler_version": self.sampler.version, "model": model.path,
                "transformer": model.transformer, "model_identity": model.identity, "release": model.release,
                "dtype": model.dtype, "seed": self.seed, "prompt": self.prompt, **sampler, **output,
                "vae_scale_factor": self.geometry.vae_scale_factor, "patch_size": self.geometry.patch_size,
                **({"compile": COMPILE_SCHEME} if model.compile else {}), **caption}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fingerprint_fields())

    @property
    def takes_prompts(self) -> bool:
        return self.model.kind != "bicubic"

    def image_fingerprint(self, prompt: str | None) -> str:
        """A photo's fingerprint with its source's own ``prompt`` (prompts_uri); None: the configured prompt, or a
        caption still to make — whose row has the caption settings instead, which decide its caption."""
        if prompt is None or not self.takes_prompts:
            return self.fingerprint
        fields = self.fingerprint_fields()
        fields.pop("caption", None)
        return fingerprint({**fields, "prompt": prompt})

    def unit_fingerprint(self, unit: str, image_fingerprint: str) -> str:
        """What a unit's bytes depend on: photos, the photo settings (prompt included); videos and their
        segments also segmenting, noise mode and encoder; a sequence's frames (``sequence_frames``: its segments)
        only the noise mode (frames are photos written in their own format); a sequence also its movie's rate and
        encoder when ``video.sequence_fps`` is set (the movie is remade, never the frames, when they change)."""
        if unit == "image":
            return image_fingerprint
        if unit in ("sequence", "sequence_frames"):
            frames = fingerprint({"image": image_fingerprint, "noise": self.video.noise, "output_format": "same"})
            if unit == "sequence_frames" or self.video.sequence_fps is None:
                return frames
            return fingerprint({"frames": frames, "movie": self.video.movie_fingerprint_fields()})
        return fingerprint({"image": image_fingerprint, **self.video.fingerprint_fields()})

    # Prompts ------------------------------------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        """The exact text a prompt conditions the model with (the manifest's ``prompt``): DiT4SR appends its
        ``added_prompt`` to non-empty prompts; other engines take the prompt as it is."""
        return self.sampler.prompt_text(prompt) if self.sampler else prompt

    @property
    def negative_text(self) -> str | None:
        """DiT4SR's negative prompt where guidance uses it, else None."""
        return self.sampler.negative_text if self.sampler else None

    # Sampler work -------------------------------------------------------------------------------------------------
    @property
    def steps_per_tile(self) -> int:
        """Denoising steps per tile (engines without steps: one)."""
        return self.sampler.num_inference_steps if self.sampler else 1


# -- resolution ------------------------------------------------------------------------------------------------------
def _frozen(mapping: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(mapping.items()))


def compile_enabled(cfg: JobConfig) -> bool:
    """``compute.compile`` resolved at plan time: auto is on exactly when actors get GPUs and run on CUDA."""
    if cfg.compute.compile != "auto":
        return cfg.compute.compile == "on"
    device = cfg.model.device
    return cfg.compute.gpus_per_actor > 0 and (device is None or device.startswith("cuda"))


def _model_root(cfg: JobConfig) -> Location:
    import dit4sr

    return Location(dit4sr.BUNDLED_MODEL if cfg.model.path == "bundled" else cfg.model.path,
                    cfg.model.storage_options)


def _transformer_root(cfg: JobConfig) -> Location:
    """Where the DiT4SR transformer (and its recommended settings) live: ``model.transformer`` or the main root."""
    return Location(cfg.model.transformer, cfg.model.storage_options) if cfg.model.transformer else _model_root(cfg)


def _read_json(root: Location, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(root.read(key))
    except FileNotFoundError:
        return None


def _dit4sr(cfg: JobConfig, model: ModelSpec) -> tuple[ModelSpec, Sampler, Geometry]:
    """Resolve the settings exactly as the pipeline will (config > recommended_settings.json > official
    defaults) from the model's small JSON files only, so planning and dry runs never load weights."""
    import dit4sr
    from dit4sr import effective_settings, read_recommended_settings

    root = _model_root(cfg)
    index = _read_json(root, "model_index.json")
    if index is None:
        raise ConfigError(f"model.path {cfg.model.path!r}: no model_index.json at {root.uri}")
    dit_root = _transformer_root(cfg)
    transformer = _read_json(dit_root, "transformer/config.json")
    if transformer is None:
        raise ConfigError(f"no transformer/config.json at {dit_root.uri}"
                          + ("" if cfg.model.transformer else ": set model.transformer to a DiT4SR root"))
    vae = _read_json(root, "vae/config.json") or {}
    try:
        recommended = read_recommended_settings(list(dict.fromkeys([root.uri, dit_root.uri])), root.storage_options)
    except ValueError as exc:
        raise ConfigError(f"model {cfg.model.path!r}: {exc}") from exc
    upscale = cfg.upscale
    sampler = effective_settings(recommended, num_inference_steps=upscale.steps,
                                 guidance_scale=upscale.guidance_scale, tile_size=upscale.tile_size,
                                 tile_overlap=upscale.tile_overlap, color_fix=upscale.color_fix)
    sampler.pop("tile_batch_size")  # changes rounding only, like batch sizes: not part of the fingerprint
    # The model's identity without downloading weights: its JSON files, and every file's name and size.
    files = [sorted((e.relative, e.size) for e in location.list() if not e.relative.startswith("."))
             for location in {root.uri: root, dit_root.uri: dit_root}.values()]
    identity = hashlib.sha256(json.dumps([index, transformer, vae, recommended, files], sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]
    patch_size = int(transformer.get("patch_size", 2))
    geometry = Geometry(
        vae_scale_factor=int(vae.get("downscale_factor") or 2 ** (len(vae.get("block_out_channels", [0])) - 1)),
        patch_size=patch_size, pos_embed_max_size=transformer.get("pos_embed_max_size"))
    resolved = Sampler(version=dit4sr.SAMPLER_VERSION, **sampler)
    has_text_encoders = all(index.get(name) and index[name][0] for name in dit4sr.TEXT_COMPONENTS)
    prompts = upscale.prompt or ("<per-source prompt>" if upscale.prompts_uri else "") \
        or ("<caption>" if upscale.caption.model else "")
    wanted = [text for text in (resolved.prompt_text(prompts), resolved.negative_text) if text]
    if wanted and not has_text_encoders:
        raise ConfigError(
            f"model {cfg.model.path!r} has no text encoders, so it cannot encode {wanted[0]!r}: leave "
            "upscale.prompt, prompts_uri and caption.model unset, and keep guidance_scale <= 1 unless the model "
            "ships text encoders")
    return dataclasses.replace(model, identity=identity), resolved, geometry


def _captioning(cfg: JobConfig) -> Captioning | None:
    """The caption settings that decide each caption, or None when captions are off. Raises ``ConfigError`` (one
    line) when the model folder cannot be a caption model."""
    caption = cfg.upscale.caption
    if not caption.model:
        return None
    from dit4sr.captioning import CAPTIONING_VERSION, OFFICIAL_CAPTION_QUESTION, inspect_caption_model

    try:
        identity = inspect_caption_model(caption.model, caption.storage_options)
    except (OSError, ValueError) as exc:
        from .preflight import describe

        cause = str(exc) if isinstance(exc, ValueError) else describe(exc)
        raise ConfigError(f"upscale.caption.model {caption.model}: {cause}") from None
    dtype = caption.dtype
    if dtype == "auto":  # as dit4sr.devices resolves it on the device the actors will have
        dtype = "bfloat16" if cfg.compute.caption_gpus > 0 else "float32"
    return Captioning(model=caption.model, model_identity=identity,
                      question=caption.question or OFFICIAL_CAPTION_QUESTION, max_new_tokens=caption.max_new_tokens,
                      filter_focus_sentences=caption.filter_focus_sentences, dtype=dtype, version=CAPTIONING_VERSION,
                      storage_options=_frozen(caption.storage_options))
