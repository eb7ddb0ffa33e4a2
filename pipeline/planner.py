"""The per-unit planner: what each input of one share of the catalog becomes — done already (skipped), rejected, or
units of work to do — decided from its listing entry, its unit's latest row and the outputs it may have written.

A photo is one unit. A video (indexed from its packets: ``pipeline.video_index``) is cut into segments — frame
ranges that are units of their own, so a long film spreads over the whole actor pool; so is a frame sequence
(numbered images in a folder named by ``video.sequence_folders``). A clip whose GOP structure would make decoding
each segment from its keyframe quadratic (one keyframe for the whole clip) is decoded once here, each segment's
frames staged losslessly (``media.video.mezzanine``).

A unit is skipped when its latest ``ok``/``staged`` row (``pipeline.state``: the compacted state plus runs not yet
folded into it) has the same source identity (size + ETag/mtime), the same config fingerprint, and what it wrote
is still there unchanged; skipped inputs are counted, not written. Everything else is (re)processed; inputs
that cannot be processed safely are rejected here as ``failed`` rows. ``pipeline.plan`` runs one planner per bucket
of the catalog in Ray tasks, and one on the driver for the videos.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import media
from media import video
from media.video import mezzanine

from . import manifest, sequence_movie, video_index
from .engine import output_size_error
from .spec import RunSpec
from .storage import Entry, UnsafeKeyError, check_relative_key, glob_matcher

STAGING_DIR = "_staging"  # staged segment files, under the output; removed once their clip is committed
SEQUENCE_FRAMES_PER_SECOND = 24  # frame sequences carry no timing: segment_seconds counts frames at this rate
CAPTION_FIELDS = ("prompt", "caption", "caption_model", "caption_fingerprint", "caption_run_id")
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)(?P<suffix>\.[^./]+)$")


@dataclass
class SegmentTally:
    """What finishing a clip needs of its staged segments, summed as they arrive: counters, never their rows."""

    staged: int = 0
    frames_out: int = 0
    output_size: int = 0
    sizes: set[tuple[int, int]] = field(default_factory=set)  # distinct source frame sizes (a sequence may mix)
    out_size: tuple[int, int] | None = None  # the upscaled frame size
    flicker_pairs: int = 0
    output_motion: float = 0.0  # sum of flicker x reference_motion x pairs: the output's frame-to-frame change
    reference_motion: float = 0.0  # sum of reference_motion x pairs: the bicubic input's

    def add(self, segment: dict[str, Any]) -> None:
        self.staged += 1
        self.frames_out += segment.get("frames_out") or 0
        self.output_size += segment.get("output_size") or 0
        self.sizes.add((segment.get("width"), segment.get("height")))
        self.out_size = self.out_size or (segment.get("out_width"), segment.get("out_height"))
        if segment.get("flicker_pairs") and segment.get("flicker") is not None:
            weight = segment["reference_motion"] * segment["flicker_pairs"]
            self.flicker_pairs += segment["flicker_pairs"]
            self.output_motion += segment["flicker"] * weight
            self.reference_motion += weight

    def flicker(self) -> dict[str, Any]:
        """The clip's flicker over all its frame pairs (ratio of the summed motions, not a mean of ratios)."""
        if not self.reference_motion:
            return {}
        return {"flicker": self.output_motion / self.reference_motion, "flicker_pairs": self.flicker_pairs,
                "reference_motion": self.reference_motion / self.flicker_pairs}


@dataclass
class Clip:
    """A video or frame sequence of this run: its own manifest row and the segments that make it."""

    row: dict[str, Any]
    segment_keys: list[str]  # unit keys of every segment, in order
    segment_outputs: list[str | None]  # each segment's staged file (videos; sequences write frames), in order
    tally: SegmentTally = field(default_factory=SegmentTally)  # its staged segments (earlier runs', then this run's)
    index: video.VideoIndex | None = None  # videos: what assembly needs
    progressive: bool = True  # videos: tag the output progressive (False: an interlaced source kept woven)
    frame_outputs: list[str] = field(default_factory=list)  # sequences: every frame's output key
    staged_sources: list[str] = field(default_factory=list)  # decoded-once segments' frames: removed with the clip
    movie_key: str | None = None  # sequences with video.sequence_fps: the movie made of the frames (sequence_movie)
    caption_task: bytes | None = None  # the first segment's task: where the clip's caption frame is (captions)

    @property
    def complete(self) -> bool:
        return self.tally.staged == len(self.segment_keys)


@dataclass
class Planned:
    """What one planner decided (the driver's for videos, each planning task's for its bucket)."""

    todo: list[dict[str, Any]] = field(default_factory=list)  # images and segments, in stream order
    skipped: list[str] = field(default_factory=list)  # source keys of inputs already done (no rows: counted)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    clips: dict[str, Clip] = field(default_factory=dict)  # source key -> clip being made in this run
    stale_staging: list[str] = field(default_factory=list)  # staged files of clips already committed, stale indexes
    video_indexing: video_index.IndexStats | None = None  # how the videos were indexed (tasks, kept indexes, time)



def output_key(relative: str, extension: str) -> str:
    """The output's key: the input's relative key, with the output's extension."""
    suffix = media.key_suffix(relative)
    if not extension or extension == suffix:
        return relative
    return relative[:len(relative) - len(suffix)] + extension


def derive_seed(base_seed: int, identity: bytes) -> int:
    """A unit's seed from the job seed and the unit's content identity only — never its batch, worker or order."""
    digest = hashlib.sha256(base_seed.to_bytes(8, "little", signed=True) + identity).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


# -- grouping the listing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sequence:
    key: str  # printf-style pattern, as ffmpeg names image sequences: reel_01/frame_%06d.tif
    frames: tuple[Entry, ...]  # sorted by number
    numbers: tuple[int, ...]

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.frames)

    @property
    def identity(self) -> str:
        """Changes whenever any frame may have changed (names, sizes, ETags/mtimes)."""
        listing = "\n".join(f"{e.relative}\t{e.size}\t{e.identity}" for e in self.frames)
        return hashlib.sha256(listing.encode()).hexdigest()[:32]

    @property
    def content_identity(self) -> bytes:
        """The clip's identity for its seed: frame names (within the folder) and sizes, not where or when the
        folder was copied — frames are not read at plan time."""
        listing = "\n".join(f"{pathlib.PurePosixPath(e.relative).name}\t{e.size}" for e in self.frames)
        return hashlib.sha256(listing.encode()).digest()


def group_inputs(entries: list[Entry], sequence_folders: list[str]) -> tuple[list[Entry], list[Entry], list[Sequence]]:
    """Split the listing into photos, videos and frame sequences (numbered images in ``sequence_folders``)."""
    in_sequence_folder = glob_matcher(sequence_folders)
    images, videos, groups = [], [], {}
    for entry in entries:
        path = pathlib.PurePosixPath(entry.relative) if sequence_folders else None  # a million paths cost seconds
        numbered = path and _NUMBERED.match(path.name)
        if media.kind_of(entry.relative) == media.VIDEO:
            videos.append(entry)
        elif numbered and in_sequence_folder(str(path.parent) if path.parent.name else ""):
            key = (str(path.parent), numbered["prefix"], numbered["suffix"])
            groups.setdefault(key, []).append((int(numbered["number"]), numbered["number"], entry))
        else:
            images.append(entry)
    sequences = []
    for (folder, prefix, suffix), members in groups.items():
        if len(members) == 1:  # one numbered file is a photo
            images.append(members[0][2])
            continue
        members.sort(key=lambda member: member[0])
        widths = {len(digits) for _, digits, _ in members}
        padded = len(widths) == 1 and any(digits.startswith("0") for _, digits, _ in members)
        number = f"%0{widths.pop()}d" if padded else "%d"
        key = str(pathlib.PurePosixPath(folder) / f"{prefix}{number}{suffix}") if folder != "." else \
            f"{prefix}{number}{suffix}"
        sequences.append(Sequence(key, tuple(m[2] for m in members), tuple(m[0] for m in members)))
    images.sort(key=lambda entry: entry.relative)
    return images, videos, sorted(sequences, key=lambda sequence: sequence.key)


# -- the planner ---------------------------------------------------------------------------------------------------
class Planner:
    def __init__(self, spec: RunSpec, previous: Mapping[str, dict[str, Any]],
                 existing: dict[str, Entry], prompts: dict[str, str], *, dry_run: bool = False,
                 in_tasks: bool = False):
        """``previous``: the latest done row of each unit this planner may meet; ``existing``: the output entries
        its units may have written (both no more than its share of the catalog)."""
        self.spec = spec
        # A dry run writes nothing (no kept indexes, no decoded-once staging); Ray tasks wherever Ray is up.
        self.dry_run = dry_run
        self.in_tasks = in_tasks
        self.decoded_once: list[tuple[Entry, dict[str, Any], list[video.Segment], list[dict[str, Any]],
                                      dict[str, Any], video.VideoIndex]] = []  # ..., the source's index
        self.source, self.output = spec.input.location, spec.output.location
        self.plan = Planned()
        self.prompts, self.previous, self.existing = prompts, previous, existing
        self._fingerprints: dict[tuple[str, str | None], str] = {}
        self.claimed: dict[str, str] = {}

    # Rows -------------------------------------------------------------------------------------------------
    def row(self, key: str, unit: str, size: int, identity: str, **values: Any) -> dict[str, Any]:
        prompt = self.source_prompt(key)
        row = manifest.empty_row(
            run_id=self.spec.run_id, source_uri=self.source.url(key), source_key=key, source_size=size,
            source_etag_or_mtime=identity, prompt=None if prompt is None else self.spec.prompt_text(prompt),
            unit=unit, unit_key=key, config_fingerprint=self.unit_fingerprint(unit, prompt))
        row.update(values)
        if prompt is None:  # to be captioned, unless an earlier run's caption still holds
            row.update(caption_model=self.spec.caption.model, caption_fingerprint=self.spec.caption.fingerprint)
            self.reuse_caption(row, self.previous.get(key))
        return row

    def source_prompt(self, key: str) -> str | None:
        """The source's prompt as configured: its entry in prompts_uri, else the fixed prompt; None where it is
        to be captioned (upscale.caption)."""
        if not self.spec.takes_prompts:
            return ""
        if key in self.prompts:
            return self.prompts[key]
        return None if self.spec.caption else self.spec.prompt

    def reuse_caption(self, row: dict[str, Any], done: dict[str, Any] | None) -> bool:
        """Give ``row`` the caption of an earlier row of its unit made from the same source with the same caption
        settings (the unit state keeps each unit's latest done row)."""
        if done is None or done.get("caption") is None or done.get("caption_fingerprint") != \
                self.spec.caption.fingerprint or (done["source_size"], done["source_etag_or_mtime"]) != \
                (row["source_size"], row["source_etag_or_mtime"]):
            return False
        from .captions import set_caption

        set_caption(row, done["caption"], self.spec, done["caption_run_id"])
        return True

    def unit_fingerprint(self, unit: str, prompt: str | None) -> str:
        # Per planner (a few distinct prompts, a million rows): a cache on the method would keep every planner
        # a planning worker ever ran, and its bucket's rows, alive.
        key = (unit, prompt)
        if key not in self._fingerprints:
            # A per-source prompt changes that source's output only, so it goes into that row's fingerprint.
            self._fingerprints[key] = self.spec.unit_fingerprint(unit, self.spec.image_fingerprint(prompt))
        return self._fingerprints[key]

    def reject(self, row: dict[str, Any], error_type: str, message: str) -> None:
        self.plan.rejected.append({**row, "status": "failed", "error_type": error_type, "error_message": message})

    def claim(self, row: dict[str, Any], key: str) -> bool:
        """Give ``row`` the output ``key`` unless another input already has it (then reject the row)."""
        try:
            check_relative_key(row["source_key"] if row["unit"] != "sequence" else key)
        except UnsafeKeyError as exc:
            self.reject(row, exc.error_type, str(exc))
            return False
        if key in self.claimed:
            self.reject(row, "output_collision", f"output {key!r} is already the output of {self.claimed[key]!r}")
            return False
        self.claimed[key] = row["source_key"]
        row.update(output_key=key, output_uri=self.output.url(key))
        return True

    def done_before(self, row: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any] | None:
        """The unit's earlier row when it is done with the same source and settings and its output(s) are
        still there (unchanged, where one output key was recorded)."""
        done = self.previous.get(row["unit_key"])
        if done is None or done["config_fingerprint"] != row["config_fingerprint"] \
                or (done["source_size"], done["source_etag_or_mtime"]) != (row["source_size"],
                                                                           row["source_etag_or_mtime"]):
            return None
        if outputs is not None:
            return done if all(key in self.existing for key in outputs) else None
        out = self.existing.get(row["output_key"])
        if done["output_key"] != row["output_key"] or out is None \
                or (done["output_size"], done["output_etag_or_mtime"]) != (out.size, out.identity):
            return None
        return done

    def skip(self, row: dict[str, Any], outputs: list[str] | None = None) -> bool:
        done = self.done_before(row, outputs)
        if done is None:
            return False
        self.plan.skipped.append(row["source_key"])
        return True

    # Photos ---------------------------------------------------------------------------------------------------
    def add_image(self, entry: Entry) -> None:
        row = self.row(entry.relative, "image", entry.size, entry.identity)
        try:
            extension = media.output_extension(entry.relative, self.spec.output.format)
        except ValueError as exc:
            self.reject(row, "unsupported", str(exc))
            return
        if self.claim(row, output_key(entry.relative, extension)) and not self.skip(row):
            self.plan.todo.append(row)

    # Videos ---------------------------------------------------------------------------------------------------
    def add_videos(self, entries: list[Entry]) -> None:
        rows = {}
        for entry in entries:
            row = self.row(entry.relative, "video", entry.size, entry.identity)
            # An unchanged, committed clip is skipped before its file is even opened.
            done = self.previous.get(entry.relative)
            if done is not None and self.done_before({**row, "output_key": done["output_key"]}) is not None \
                    and self.claim(row, done["output_key"]):
                self.skip(row)
                self.sweep_staging(entry.relative)
                continue
            rows[entry.relative] = (entry, row)
        indexed, self.plan.video_indexing = video_index.index_videos(
            self.source, self.output, [video_source(entry) for entry, _ in rows.values()],
            max_seconds=self.spec.limits.max_video_seconds, in_tasks=self.in_tasks, write=not self.dry_run)
        for key, (entry, row) in rows.items():
            self.add_video(entry, row, indexed[key])
        self.stage_decoded_once()

    def add_video(self, entry: Entry, row: dict[str, Any], indexed: video_index.Indexed) -> None:
        if indexed.failure is not None:
            self.reject(row, indexed.failure.error_type, indexed.failure.message)
            return
        index = indexed.index
        limits = self.spec.limits
        row.update(width=index.width, height=index.height, source_format=f"{index.container}/{index.codec}",
                   frames_in=index.frames, duration_in=index.duration)
        if limits.max_video_seconds is not None and index.duration > limits.max_video_seconds:
            self.reject(row, "too_long", f"{index.duration:.1f} s is longer than limits.max_video_seconds="
                                         f"{limits.max_video_seconds}")
            return
        too_large = output_size_error(self.spec, index.width, index.height)
        if too_large:
            self.reject(row, "output_too_large", f"per frame: {too_large}")
            return
        try:
            encoding = self.spec.video.encoding.for_clip(index, index.width * self.spec.scale,
                                                         index.height * self.spec.scale)
            extension = video.output_container(entry.relative, index, encoding.codec)
        except media.MediaError as exc:
            self.reject(row, exc.error_type, str(exc))
            return
        if not self.claim(row, output_key(entry.relative, extension)) or self.skip(row):
            return
        rate = index.average_rate or (index.frames / index.duration if index.duration else 24)
        segment_frames = max(1, round(self.spec.video.segment_seconds * float(rate)))
        row["seed"] = seed = derive_seed(self.spec.seed, bytes.fromhex(index.content_sha256))
        deinterlaced = video.deinterlaces(index, self.spec.video.deinterlace)
        planned = video.plan_segments(index, segment_frames, deinterlace=self.spec.video.deinterlace,
                                      rate=self.spec.video.deinterlace_rate)
        field_rate = planned[0].field_rate
        row["processing"] = video_processing(index, deinterlaced, field_rate)
        # The output's timeline: the source's, or one frame per field (the time base halved) at field rate.
        output_index = video.field_rate_index(index) if field_rate else index
        per_frame = 2 if field_rate else 1
        # Rows carry a slim index (no per-frame tables) and each segment its own output timestamps.
        slim = dataclasses.replace(output_index, pts=(), keyframes=())
        segments = [self.segment_row(row, segment.start, segment.stop, seed, {
            "kind": "video", "segment": segment, "index": slim,
            "pts": output_index.pts[per_frame * segment.start:per_frame * segment.stop]})
            for segment in planned]
        facts = {"index": output_index, "progressive": deinterlaced or not index.interlaced}
        if mezzanine.uses_decoded_once(index, planned):
            self.decoded_once.append((entry, row, planned, segments, facts, index))  # all such clips at once, in tasks
        else:
            self.add_clip(row, segments, **facts)

    def stage_decoded_once(self) -> None:
        """Clips whose segments would each decode from a far keyframe: decode each clip once (a Ray task per clip)
        and stage every segment still to do as lossless frames, which its reader then carries instead of source
        packets. Staged frames of an earlier run are reused; a clip that FFV1 cannot carry exactly keeps the
        packet-copy path."""
        jobs, plans = [], {}
        for entry, row, planned, segments, facts, index in self.decoded_once:
            keys = [video_index.staged_source_key(self.staging_prefix(entry.relative), segment, video_source(entry))
                    for segment in planned]
            todo = [(segment, key, segment_row) for segment, key, segment_row in zip(planned, keys, segments)
                    if self.done_before(segment_row) is None]
            missing = tuple((segment, key) for segment, key, _ in todo if key not in self.existing)
            if missing and not self.dry_run:
                jobs.append(video_index.DecodedOnce(entry.relative, index, missing))
            plans[entry.relative] = todo
        failures = video_index.stage_decoded_sources(self.source, self.output, jobs, in_tasks=self.in_tasks)
        for entry, row, planned, segments, facts, index in self.decoded_once:
            failure = failures.get(entry.relative)
            if failure is video_index.FALLBACK or (self.dry_run and failure is None):
                self.add_clip(row, segments, **facts)
                continue
            if failure is not None:  # what earlier runs staged for it goes (this run's partial staging, next run)
                self.reject(row, failure.error_type, failure.message)
                prefix = self.staging_prefix(entry.relative) + "/"
                self.plan.stale_staging += [key for key in self.existing
                                            if key.startswith(prefix) and key.endswith(video_index.DECODED_SUFFIX)]
                continue
            cost = mezzanine.decode_cost(index, planned)
            done = f"decoded once (from its keyframes: {cost.packet_copy_ratio:.1f} frames decoded per frame)"
            row["processing"] = "; ".join(filter(None, [row.get("processing"), done]))
            for _, key, segment_row in plans[entry.relative]:
                segment_row["task"] = pickle.dumps({**pickle.loads(segment_row["task"]), "staged_source": key})
            self.add_clip(row, segments, staged_sources=[key for _, key, _ in plans[entry.relative]], **facts)
        self.decoded_once = []

    # Frame sequences ------------------------------------------------------------------------------------------
    def add_sequence(self, sequence: Sequence) -> None:
        row = self.row(sequence.key, "sequence", sequence.size, sequence.identity, frames_in=len(sequence.frames))
        gaps = [n for n in range(sequence.numbers[0], sequence.numbers[-1] + 1) if n not in set(sequence.numbers)]
        if gaps:
            self.reject(row, "sequence_gap", f"frames {sequence.numbers[0]}..{sequence.numbers[-1]} miss "
                                             f"{len(gaps)} number(s), first {gaps[0]}: a gap would shift every "
                                             "later frame; fill or rename the sequence")
            return
        frame_keys = [entry.relative for entry in sequence.frames]
        if not self.claim(row, sequence.key):
            return
        for key in frame_keys:  # frames keep their names and format
            self.claimed[key] = sequence.key
        movie = sequence_movie.movie_key(sequence.key, self.spec.video)  # with video.sequence_fps
        if movie is not None:
            if movie in self.claimed:
                self.reject(row, "output_collision", f"its movie {movie!r} is already the output of "
                                                     f"{self.claimed[movie]!r}")
                return
            self.claimed[movie] = sequence.key
        if self.skip(row, outputs=frame_keys + ([movie] if movie else [])):
            return
        per_segment = max(1, round(self.spec.video.segment_seconds * SEQUENCE_FRAMES_PER_SECOND))
        row["seed"] = seed = derive_seed(self.spec.seed, sequence.content_identity)
        segments = [self.segment_row(row, start, min(start + per_segment, len(frame_keys)), seed, {
            "kind": "sequence", "frames": frame_keys[start:start + per_segment]})
            for start in range(0, len(frame_keys), per_segment)]
        for segment in segments:  # frames do not depend on the movie's settings
            segment["config_fingerprint"] = self.unit_fingerprint("sequence_frames", self.source_prompt(sequence.key))
        self.add_clip(row, segments, frame_outputs=frame_keys, movie_key=movie)

    # Clips ----------------------------------------------------------------------------------------------------
    def segment_row(self, clip_row: dict[str, Any], start: int, stop: int, seed: int,
                    task: dict[str, Any]) -> dict[str, Any]:
        key = clip_row["source_key"]
        row = {**clip_row, "unit": "segment", "unit_key": f"{key}#{start}-{stop}", "frame_start": start,
               "frame_stop": stop, "frames_in": stop - start, "seed": seed, "output_uri": None,
               "task": pickle.dumps({**task, "clip_key": key, "clip_seed": seed})}
        if task["kind"] == "video":
            row["output_key"] = f"{self.staging_prefix(key)}/{start:09d}-{stop:09d}.nut"
            row["output_uri"] = self.output.url(row["output_key"])
        else:
            row["output_key"] = None
        return row

    def staging_prefix(self, source_key: str) -> str:
        return f"{STAGING_DIR}/{source_key}"

    def sweep_staging(self, source_key: str) -> None:
        prefix = self.staging_prefix(source_key) + "/"
        self.plan.stale_staging += [key for key in self.existing if key.startswith(prefix)]

    def sweep_orphaned_staging(self, videos: list[Entry]) -> None:
        """Staged segments of videos no longer listed (deleted, renamed, excluded) will never be assembled."""
        listed = {self.staging_prefix(entry.relative) + "/" for entry in videos}
        self.plan.stale_staging += [key for key in self.existing if key.startswith(STAGING_DIR + "/")
                                    and key[:key.rindex("/") + 1] not in listed]

    def add_clip(self, row: dict[str, Any], segments: list[dict[str, Any]], **facts: Any) -> None:
        # The clip's caption, where a segment done earlier has it (e.g. one of a killed run).
        if row["prompt"] is None and any(self.reuse_caption(row, self.previous.get(s["unit_key"])) for s in segments):
            for segment in segments:
                segment.update({name: row[name] for name in CAPTION_FIELDS})
        clip = Clip(row=row, segment_keys=[s["unit_key"] for s in segments],
                    segment_outputs=[s["output_key"] for s in segments], caption_task=segments[0]["task"], **facts)
        for segment in segments:
            # Sequence segments write frames straight to their final keys; video segments one staged file.
            done = self.done_before(segment, outputs=pickle.loads(segment["task"]).get("frames"))
            if done is None:
                self.plan.todo.append(segment)
            else:
                clip.tally.add({**segment, **done})
        # Staged files of other segment plans (e.g. another segment length) are no longer needed.
        wanted = {s["output_key"] for s in segments} | set(clip.staged_sources)
        self.plan.stale_staging += [key for key in self.existing
                                    if key.startswith(self.staging_prefix(row["source_key"]) + "/")
                                    and key not in wanted]
        self.plan.clips[row["source_key"]] = clip


def video_processing(index: video.VideoIndex, deinterlaced: bool, field_rate: bool = False) -> str | None:
    """What happens to a clip besides upscaling, for its manifest row."""
    done = []
    if deinterlaced:
        rate = "field rate: one frame per field" if field_rate else "frame rate"
        done.append(f"deinterlaced (bwdif, {rate}, {index.field_order} field order)")
    elif index.interlaced:
        done.append(f"interlaced ({index.field_order}) upscaled as progressive (video.deinterlace=off)")
    if index.clock_offset:
        done.append(f"timestamps from the file's start (its clock starts at {float(index.clock_offset):.3f} s)")
    return "; ".join(done) or None


def video_source(entry: Entry) -> video_index.VideoSource:
    return video_index.VideoSource(entry.relative, entry.size, entry.identity)

