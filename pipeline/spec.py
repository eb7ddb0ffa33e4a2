"""The run spec: everything a worker needs to turn a unit of work into output bytes, resolved once by the driver.

Workers never see the raw config: the spec carries the resolved settings (what the config fingerprint hashes)
and the few operational values that do not change bytes (model location, threads, limits). It is immutable and
small, so it travels to every actor and task unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from media.video import VideoEncoding

from .config import JobConfig, VideoConfig, fingerprint

# Bumped when the video layer's output bytes change for the same settings (a re-run then redoes videos):
# 2 = explicit colour tags on every output, BT.709 at HD sizes for SD sources, interlaced sources deinterlaced.
VIDEO_LAYER_VERSION = 2


def _frozen(mapping: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class VideoSettings:
    """What changes a clip's bytes beyond the photo settings: one typed record from the config to the actor."""

    segment_seconds: float
    noise: str  # consistent | independent
    deinterlace: str  # auto | on | off
    encoding: VideoEncoding  # its codec may be `auto`: resolved per clip (`VideoEncoding.for_clip`)
    sequence_fps: Fraction | None = None  # frame sequences also become a movie at this rate (pipeline.sequence_movie)
    deinterlace_rate: str = "frame"  # frame | field (one output frame per field, where a clip is deinterlaced)

    @classmethod
    def of(cls, video: VideoConfig) -> "VideoSettings":
        return cls(segment_seconds=video.segment_seconds, noise=video.noise, deinterlace=video.deinterlace,
                   deinterlace_rate=video.deinterlace_rate,
                   encoding=video.encoding(), sequence_fps=video.sequence_rate())

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


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    _settings: tuple[tuple[str, Any], ...]  # photo settings: model, sampler, seed, scale, output format
    video: VideoSettings  # what else changes a clip's bytes: segmenting, noise mode, deinterlacing, encoder
    # What workers need beyond the fingerprinted settings (none of it changes output bytes).
    model_path: str
    model_transformer: str | None
    model_release: str | None
    model_storage_options: tuple[tuple[str, Any], ...]
    device: str | None
    torch_threads: int
    max_input_pixels: int
    max_output_pixels: int
    base_seed: int  # per-unit seeds derive from it (engines without a seed setting still record theirs)
    frames_per_call: int
    measure_flicker: bool
    caption_storage_options: tuple[tuple[str, Any], ...] = ()  # upscale.caption.storage_options
    caption_threads: int = 1  # torch threads of a captioning or prompt-encoding actor (compute.caption.cpus_per_actor)

    @classmethod
    def resolve(cls, cfg: JobConfig, settings: dict[str, Any], run_id: str) -> "RunSpec":
        video = cfg.video
        return cls(
            run_id=run_id, _settings=_frozen(settings),
            video=VideoSettings.of(video),
            model_path=cfg.model.path, model_transformer=cfg.model.transformer, model_release=cfg.model.release,
            model_storage_options=_frozen(cfg.model.storage_options), device=cfg.model.device,
            torch_threads=cfg.compute.torch_threads or max(1, int(cfg.compute.cpus_per_actor)),
            max_input_pixels=cfg.limits.max_input_pixels, max_output_pixels=cfg.limits.max_output_pixels,
            base_seed=cfg.upscale.seed, frames_per_call=video.frames_per_call, measure_flicker=video.measure_flicker,
            caption_storage_options=_frozen(cfg.upscale.caption.storage_options),
            caption_threads=max(1, int(cfg.compute.caption.cpus_per_actor)))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    @property
    def storage_options(self) -> dict[str, Any]:
        return dict(self.model_storage_options)

    @property
    def caption(self) -> dict[str, Any] | None:
        """The resolved caption settings (``upscale.caption``; pipeline.captions), None when captions are off."""
        return self.settings.get("caption")

    @property
    def caption_fingerprint(self) -> str | None:
        """What a caption depends on besides the input: a caption stored with this fingerprint is reused."""
        return fingerprint(self.caption) if self.caption else None

    @property
    def compile(self) -> bool:
        """Whether DiT4SR actors compile their transformer (``compute.compile``, resolved at plan time)."""
        return "compile" in self.settings

    @property
    def scale(self) -> int:
        return int(self.settings["scale"])

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

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
