"""The run report: ``_report.html`` beside the run's manifests (``<output.uri>/_manifests/run=<id>/``).

One self-contained page — inline CSS, an inline SVG plot, thumbnails as data URIs and one line of inline script
per slider; nothing is fetched — that an operator opens from the bucket or disk: totals, throughput over the
run's whole wall time, failures by type with a few examples each, before/after sliders for a sample of photos (a
crop of the output at 1:1 against the same region of the source, enlarged without smoothing), and for a sample of
videos and frame sequences their first, middle and last frames the same way, with frames in and out, frames per
minute and the flicker figure of their manifest rows.

Rows are grouped by ``status`` and ``error_type`` only, so any unit of work (an image, a video segment) counts.
"""

from __future__ import annotations

import base64
import datetime as dt
import heapq
import html
import io
import json
import logging
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

import media
from media import video

from . import manifest
from .manifest import MANIFEST_DIR
from .spec import RunSpec
from .storage import Location

log = logging.getLogger("pipeline")

REPORT_NAME = "_report.html"
PAIRS = 6  # photos with a before/after slider per report
CLIPS = 4  # videos and frame sequences with first/middle/last frame sliders
CROP = 224  # output pixels shown 1:1 in a slider (each side)
CONTEXT = 112  # longest side of the whole-output thumbnail beside each slider
EXAMPLES = 3  # failure examples per error type
PROMPTS = 500  # outputs listed with their prompts
BUCKETS = 40  # bars in the throughput plot, at most
CLIP_UNITS = ("video", "sequence")  # rows of whole clips, finished from their segments' rows


def report_key(run_id: str) -> str:
    return f"{MANIFEST_DIR}/run={run_id}/{REPORT_NAME}"


def write_report(spec: RunSpec, summary: dict[str, Any]) -> str | None:
    """Render and commit the run's report from its committed manifest; returns its URI. Never fails the run: the
    outputs and manifests are committed already, so a report that cannot be made is logged and skipped."""
    try:
        source, output = spec.input.location, spec.output.location
        files = manifest.list_runs(output).get(summary["run_id"])
        digest = RunDigest.of_files(output, files.rows_from if files else [], summary)
        pairs = [pair for row in digest.pairs if (pair := _photo_pair(source, output, row, spec)) is not None]
        clips = [{**clip, "seconds": digest.clip_seconds(row)} for row in digest.clips
                 if (clip := _clip_frames(source, output, row, spec)) is not None]
        key = report_key(summary["run_id"])
        output.write_atomic(key, render(summary, digest, pairs, spec, clips).encode())
        return output.url(key)
    except Exception:  # noqa: BLE001
        log.warning("could not write the run report", exc_info=True)
        return None


def _sample(rows: Iterable[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The ``count`` rows whose source keys hash lowest, sorted by key: a sample spread over the catalog that the
    same rows always give, whatever their order (rows are streamed, never all held)."""
    ranked = heapq.nsmallest(count, rows, key=lambda row: (zlib.crc32(row["source_key"].encode()), row["source_key"]))
    return sorted(ranked, key=lambda row: row["source_key"])


def sample_pairs(rows: Iterable[dict[str, Any]], count: int = PAIRS) -> list[dict[str, Any]]:
    """Up to ``count`` ok rows with image outputs (``_sample``)."""
    return _sample((row for row in rows if row["status"] == "ok" and row.get("unit") in (None, "image")
                    and row.get("output_key") and media.kind_of(row["output_key"]) == media.IMAGE), count)


def sample_clips(rows: Iterable[dict[str, Any]], count: int = CLIPS) -> list[dict[str, Any]]:
    """Up to ``count`` finished videos and frame sequences (``_sample``)."""
    return _sample((row for row in rows if row["status"] == "ok" and row.get("unit") in CLIP_UNITS), count)


# Manifest columns the report reads (two streamed passes over the run's committed file).
REPORT_COLUMNS = ["unit", "status", "error_type", "error_message", "source_key", "output_key", "started_at",
                  "finished_at", "seconds", "width", "height", "out_width", "out_height", "frames_in", "frames_out",
                  "flicker", "codec", "processing", "prompt", "caption_model"]
_SECONDS_BINS = np.logspace(-4, 6, 20_001)  # per-unit seconds, 0.12 % wide bins: a median without keeping them all


@dataclass
class RunDigest:
    """What the report shows of a run's rows — counts, throughput bars, failure examples, the photos and clips
    sampled for sliders, each clip's first segment start, the spread of per-unit seconds — gathered from the
    manifest a batch at a time: bounded by the report and the run's clips, not by its rows."""

    processed: int = 0  # units of work this run processed (a clip counts through its segments)
    bars: list[Counter] = field(default_factory=list)  # units finished per time slice (ok / failed)
    slice_s: float = 1.0
    span_s: float = 0.0
    failures: dict[str, list] = field(default_factory=dict)  # error type -> [count, its first examples by key]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    clips: list[dict[str, Any]] = field(default_factory=list)
    clip_frames: int = 0  # frames out of the clips finished in this run
    clips_finished: int = 0
    segment_starts: dict[str, dt.datetime] = field(default_factory=dict)  # clip key -> its first segment's start
    prompted: list[dict[str, Any]] = field(default_factory=list)  # the first PROMPTS outputs with prompts, by key
    prompted_count: int = 0
    seconds: np.ndarray = field(default_factory=lambda: np.zeros(len(_SECONDS_BINS) + 1, np.int64))
    slowest: float | None = None

    @classmethod
    def of_files(cls, output: Location, keys: list[str], summary: dict[str, Any]) -> "RunDigest":
        digest, first, last = cls(), None, None
        for batch in manifest.iter_batches(output, keys, REPORT_COLUMNS):
            table = pa.Table.from_batches([batch])
            digest._add_failures(table)
            ok = table.filter(pc.equal(table["status"], "ok").fill_null(False)).to_pylist()
            digest.pairs = sample_pairs(digest.pairs + ok, PAIRS)
            finished = [row for row in ok if row.get("unit") in CLIP_UNITS]
            digest.clips = sample_clips(digest.clips + finished, CLIPS)
            digest.clips_finished += len(finished)
            digest.clip_frames += sum(row.get("frames_out") or 0 for row in finished)
            prompted = [row for row in ok if row.get("unit") != "segment" and row.get("prompt")]
            digest.prompted_count += len(prompted)
            digest.prompted = heapq.nsmallest(PROMPTS, digest.prompted + prompted, key=lambda row: row["source_key"])
            segments = table.filter(pc.and_(pc.equal(table["unit"], "segment").fill_null(False),
                                            table["started_at"].is_valid()))
            if segments.num_rows:
                for row in segments.group_by("source_key").aggregate([("started_at", "min")]).to_pylist():
                    known = digest.segment_starts.get(row["source_key"])
                    digest.segment_starts[row["source_key"]] = min(filter(None, [known, row["started_at_min"]]))
            done = table.filter(_processed(table))
            if not done.num_rows:
                continue
            digest.processed += done.num_rows
            times = pa.concat_arrays([done["started_at"].combine_chunks(), done["finished_at"].combine_chunks()])
            first = min(filter(None, [first, pc.min(times).as_py()]))
            last = max(filter(None, [last, pc.max(done["finished_at"]).as_py()]))
            seconds = done["seconds"].drop_null().to_numpy()
            if len(seconds):
                digest.seconds += np.bincount(np.searchsorted(_SECONDS_BINS, seconds), minlength=len(digest.seconds))
                digest.slowest = max(digest.slowest or 0.0, float(seconds.max()))
        if digest.processed:
            if summary.get("started_at"):  # the chart spans the run's whole wall time, planning included
                first = min(first, dt.datetime.fromisoformat(summary["started_at"]))
            span = max(1.0, summary.get("seconds") or 0.0, (last - first).total_seconds())
            digest._add_bars(output, keys, first, span)
        return digest

    def clip_seconds(self, clip: dict[str, Any]) -> float | None:
        """A clip's wall time in this run: from its first segment's start to the clip's commit (None when all its
        segments were done by earlier runs)."""
        start = self.segment_starts.get(clip["source_key"])
        return (clip["finished_at"] - start).total_seconds() if start and clip.get("finished_at") else None

    def _add_failures(self, table: pa.Table) -> None:
        failed = table.filter(pc.equal(table["status"], "failed").fill_null(False))
        if not failed.num_rows:
            return
        failed = failed.set_column(failed.schema.get_field_index("error_type"), "error_type",
                                   pc.fill_null(failed["error_type"], "unknown"))
        for error_type in failed["error_type"].unique().to_pylist():
            rows = failed.filter(pc.equal(failed["error_type"], error_type)).sort_by("source_key")
            entry = self.failures.setdefault(error_type, [0, []])
            entry[0] += rows.num_rows
            examples = entry[1] + rows.slice(0, EXAMPLES).select(["source_key", "error_message"]).to_pylist()
            entry[1] = sorted(examples, key=lambda row: row["source_key"])[:EXAMPLES]

    def _add_bars(self, output: Location, keys: list[str], first: dt.datetime, span: float) -> None:
        count = max(1, min(BUCKETS, self.processed))
        self.span_s, self.slice_s = span, span / count
        self.bars = [Counter() for _ in range(count)]
        for batch in manifest.iter_batches(output, keys, ["unit", "status", "finished_at"]):
            done = pa.Table.from_batches([batch]).filter(_processed(batch))
            since = pc.subtract(done["finished_at"], pa.scalar(first, done["finished_at"].type))
            slots = np.minimum(count - 1, (pc.cast(since, pa.int64()).to_numpy() / 1e6 / self.slice_s)
                               .astype(np.int64))
            failed = pc.equal(done["status"], "failed").to_numpy(zero_copy_only=False)
            for status, mask in (("failed", failed), ("ok", ~failed)):
                for slot, number in zip(*np.unique(slots[mask], return_counts=True)):
                    self.bars[slot][status] += int(number)

    def median_seconds(self) -> float | None:
        total = self.seconds.sum()
        if not total:
            return None
        slot = int(np.searchsorted(np.cumsum(self.seconds), (total + 1) / 2))
        edges = np.concatenate([[0.0], _SECONDS_BINS, [self.slowest or _SECONDS_BINS[-1]]])
        return float(np.sqrt(edges[slot] * edges[slot + 1])) if edges[slot] > 0 else float(edges[slot + 1]) / 2


def _processed(table: pa.Table | pa.RecordBatch) -> pa.Array:
    """Units of work this run processed (not skipped); a clip counts through its segments, not its own row."""
    return pc.and_(pc.and_(pc.not_equal(table["status"], "skipped").fill_null(True), table["finished_at"].is_valid()),
                   pc.invert(pc.is_in(table["unit"], pa.array(CLIP_UNITS))))


def _rgb(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Decoded like the pipeline decodes it (orientation applied), alpha flattened onto white."""
    return _to_image(media.decode_image(data, name, max_pixels).pixels)


def _to_image(decoded: np.ndarray) -> Image.Image:
    pixels = media.to_float_pixels(decoded)
    if pixels.shape[2] == 4:
        pixels = pixels[:, :, :3] * pixels[:, :, 3:] + (1 - pixels[:, :, 3:])
    return Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _photo_pair(source: Location, output: Location, row: dict[str, Any], spec: RunSpec) -> dict[str, Any] | None:
    try:
        before = _rgb(source.read(row["source_key"]), row["source_key"], spec.limits.max_input_pixels)
        after = _rgb(output.read(row["output_key"]), row["output_key"], spec.limits.max_output_pixels)
    except Exception as exc:  # noqa: BLE001 - e.g. the source changed since: that pair is left out
        log.info("report: no before/after for %s: %s", row["source_key"], exc)
        return None
    return {"row": row, **_pair(before, after)}


def _video_frames(location: Location, key: str, wanted: list[float], deinterlace: str = "auto",
                  rate: str = "frame") -> list[Image.Image]:
    """The frames at the given fractions of a video (0: first, 0.5: middle, 1: last), decoded as the pipeline
    decodes them (one-frame segments: only the packets from the keyframe before each are read)."""
    with location.fs.open(location.path(key), "rb", block_size=1 << 20) as handle:
        index = video.index_video(handle, key)
        segments = video.plan_segments(index, 1, deinterlace=deinterlace, rate=rate)
        frames = []
        for fraction in wanted:
            segment = segments[round(fraction * (len(segments) - 1))]
            frames.append(_to_image(next(iter(video.decode_segment(
                video.extract_segment(handle, segment, key), segment, key)))))
    return frames


def sequence_frame_keys(location: Location, pattern: str) -> list[str]:
    """The frames of a sequence key (``reels/coffee/frame_%04d.png``) present under ``location``, in order."""
    folder, _, name = pattern.rpartition("/")
    prefix, _, rest = name.partition("%")
    digits, _, suffix = rest.partition("d")
    number = rf"\d{{{int(digits)}}}" if digits else r"\d+"
    matches = re.compile(re.escape(prefix) + f"({number})" + re.escape(suffix) + "$")
    found = [(int(match[1]), entry.relative) for entry in location.list(include=[f"{folder}/*" if folder else "*"])
             if (match := matches.match(entry.relative.rpartition("/")[2]))]
    return [key for _, key in sorted(found)]


def _clip_frames(source: Location, output: Location, row: dict[str, Any], spec: RunSpec) -> dict[str, Any] | None:
    """First, middle and last frame of a finished clip, before and after."""
    wanted = (0.0, 0.5, 1.0)
    try:
        if row["unit"] == "video":
            before = _video_frames(source, row["source_key"], list(wanted), spec.video.deinterlace,
                                   spec.video.deinterlace_rate)
            after = _video_frames(output, row["output_key"], list(wanted))
        else:
            keys = sequence_frame_keys(source, row["source_key"])
            picked = [keys[round(fraction * (len(keys) - 1))] for fraction in wanted]
            before = [_rgb(source.read(key), key, spec.limits.max_input_pixels) for key in picked]
            after = [_rgb(output.read(key), key, spec.limits.max_output_pixels) for key in picked]
    except Exception as exc:  # noqa: BLE001 - e.g. the source changed since: that clip is left out
        log.info("report: no frames for %s: %s", row["source_key"], exc)
        return None
    labels = ("first frame", "middle frame", "last frame")
    return {"row": row, "frames": [{"label": label, **_pair(b, a)} for label, b, a in zip(labels, before, after)]}


def _pair(before: Image.Image, after: Image.Image) -> dict[str, Any]:
    """A slider's images: the centre crop of the output at 1:1 and the same region of the source, enlarged."""
    width, height = min(CROP, after.width), min(CROP, after.height)
    left, top = (after.width - width) // 2, (after.height - height) // 2
    sx, sy = before.width / after.width, before.height / after.height
    region = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    context = after.copy()
    context.thumbnail((CONTEXT, CONTEXT), Image.Resampling.LANCZOS)
    return {
        "width": width, "height": height,
        "before": _data_uri(before.resize((width, height), Image.Resampling.NEAREST, box=region)),
        "after": _data_uri(after.crop((left, top, left + width, top + height))),
        "context": _data_uri(context),
        # where the crop lies in the context thumbnail, in percent
        "box": [100 * left / after.width, 100 * top / after.height, 100 * width / after.width,
                100 * height / after.height],
    }


def _throughput_svg(digest: RunDigest) -> str:
    """Bars of units finished per minute over the run's whole wall time, from its start to its end (planning and
    finishing included; failed stacked on the rest), as inline SVG."""
    if not digest.processed:
        return "<p class=muted>Nothing was processed in this run.</p>"
    bars, width, span, count = digest.bars, digest.slice_s, digest.span_s, len(digest.bars)
    per_minute = 60 / width
    peak = max(sum(bar.values()) for bar in bars) * per_minute
    w, h, left, bottom, top = 720, 220, 56, 28, 12
    plot_w, plot_h = w - left - 12, h - bottom - top
    bar_w = plot_w / count
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
             'role="img" aria-label="inputs finished per minute over the run">']
    for fraction in (0, 0.5, 1):
        y = top + plot_h * (1 - fraction)
        parts.append(f'<line x1="{left}" x2="{w - 12}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{peak * fraction:.3g}</text>')
    for index, bar in enumerate(bars):
        x, base = left + index * bar_w, top + plot_h
        for status in ("ok", "failed"):
            if bar[status]:
                height = plot_h * bar[status] * per_minute / peak
                base -= height
                parts.append(f'<rect x="{x + 0.5:.1f}" y="{base:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                             f'height="{height:.1f}" class="{status}"><title>{bar[status]} {status}, '
                             f'{index * width:.0f}–{(index + 1) * width:.0f} s</title></rect>')
    unit, scale = ("min", 60) if span > 180 else ("s", 1)
    for fraction in (0, 0.5, 1):
        x = left + plot_w * fraction
        anchor = ("start", "middle", "end")[int(fraction * 2)]
        parts.append(f'<text x="{x:.1f}" y="{h - 8}" text-anchor="{anchor}">{span * fraction / scale:.3g} {unit}'
                     '</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2:.0f}" transform="rotate(-90 14 {top + plot_h / 2:.0f})" '
                 'text-anchor="middle">inputs / min</text></svg>')
    return "".join(parts)


def _failures(digest: RunDigest) -> str:
    if not digest.failures:
        return "<p class=muted>No failures.</p>"
    out = ["<table><thead><tr><th>error type</th><th>inputs</th><th>examples</th></tr></thead><tbody>"]
    for error_type, (count, examples) in sorted(digest.failures.items(), key=lambda item: (-item[1][0], item[0])):
        items = "".join(
            f"<li><code>{html.escape(row['source_key'])}</code> — {html.escape((row.get('error_message') or '')[:300])}"
            "</li>" for row in examples)
        more = f"<li class=muted>and {count - EXAMPLES} more</li>" if count > EXAMPLES else ""
        out.append(f"<tr><td><code>{html.escape(error_type)}</code></td><td class=num>{count}</td>"
                   f"<td><ul>{items}{more}</ul></td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _slider(pair: dict[str, Any], caption: str) -> str:
    left, top, width, height = pair["box"]
    return (
        f'<figure class=pair><div class=compare style="--pos:50%">'
        f'<div class=frame style="width:{pair["width"]}px;height:{pair["height"]}px">'
        f'<img class=after src="{pair["after"]}" width={pair["width"]} height={pair["height"]} alt="after">'
        f'<img class=before src="{pair["before"]}" width={pair["width"]} height={pair["height"]} alt="before">'
        '<span class="tag l">before</span><span class="tag r">after</span></div>'
        '<input type=range min=0 max=100 value=50 aria-label="before / after" '
        'oninput="this.parentNode.style.setProperty(\'--pos\', this.value + \'%\')"></div>'
        f'<span class=context><img src="{pair["context"]}" alt="whole output">'
        f'<i style="left:{left:.1f}%;top:{top:.1f}%;width:{width:.1f}%;height:{height:.1f}%"></i></span>'
        f'<figcaption>{caption}</figcaption></figure>')


def _keys(row: dict[str, Any]) -> str:
    """What was upscaled into what: the source's key and the output's (a photo may change format)."""
    source, output = row["source_key"], row.get("output_key") or row["source_key"]
    return (f'<code class=source>{html.escape(source)}</code>' if source == output else
            f'<code class=source>{html.escape(source)}</code> → <code class=output>{html.escape(output)}</code>')


def _size(row: dict[str, Any]) -> str:
    return (f"{row['width']}×{row['height']} → {row['out_width']}×{row['out_height']}"
            if row.get("width") and row.get("out_width") else "")


def _pairs_html(pairs: list[dict[str, Any]]) -> str:
    if not pairs:
        return "<p class=muted>No photos were upscaled in this run.</p>"
    out = []
    for pair in pairs:
        row = pair["row"]
        details = [_size(row), f"{row['seconds']:.1f} s" if row.get("seconds") is not None else ""]
        out.append(_slider(pair, f'{_keys(row)}<br>{" · ".join(filter(None, details))}{_prompt_line(row)}'))
    return "".join(out)


def _prompt_line(row: dict[str, Any]) -> str:
    if not row.get("prompt"):
        return ""
    source = f" (caption by <code>{html.escape(row['caption_model'])}</code>)" if row.get("caption_model") else ""
    return f"<br><span class=prompt>prompt{source}: {html.escape(row['prompt'])}</span>"


def _prompts_html(digest: RunDigest) -> str:
    """Each output of the run with the prompt it was made with (photos and whole clips; at most ``PROMPTS``), or
    nothing where every output had the null prompt."""
    prompted = digest.prompted
    if not prompted:
        return ""  # all with the null prompt: nothing to show
    out = ["<h2>Prompts</h2><table><thead><tr><th>output</th><th>prompt</th></tr></thead><tbody>"]
    for row in prompted:
        caption = (f"<br><span class=muted>caption by <code>{html.escape(row['caption_model'])}</code></span>"
                   if row.get("caption_model") else "")
        out.append(f"<tr><td>{_keys(row)}</td><td>{html.escape(row['prompt'])}{caption}</td></tr>")
    out.append("</tbody></table>")
    if digest.prompted_count > len(prompted):
        out.append(f"<p class=muted>and {digest.prompted_count - len(prompted)} more: the manifests' "
                   "<code>prompt</code> column has every one.</p>")
    return "".join(out)


def _clips_html(clips: list[dict[str, Any]]) -> str:
    if not clips:
        return "<p class=muted>No videos or frame sequences were finished in this run.</p>"
    out = []
    for clip in clips:
        row, seconds = clip["row"], clip.get("seconds")
        facts = [
            ("kind", row["unit"]),
            ("frames in", row.get("frames_in")), ("frames out", row.get("frames_out")),
            ("size", _size(row) or None),
            ("frames / min", f"{row['frames_out'] / seconds * 60:.1f}" if seconds and row.get("frames_out") else None),
            ("flicker", f"{row['flicker']:.2f}" if row.get("flicker") is not None else None),
            ("codec", row.get("codec")),
        ]
        table = "".join(f"<tr><th>{name}</th><td class=num data-fact=\"{name}\">{html.escape(str(value))}</td></tr>"
                        for name, value in facts if value is not None)
        extra = f'<p class=muted>{html.escape(row["processing"])}</p>' if row.get("processing") else ""
        out.append(f'<section class=clip><h3>{_keys(row)}</h3><table class=facts>{table}</table>{extra}'
                   + "".join(_slider(frame, frame["label"]) for frame in clip["frames"]) + "</section>")
    return ("<p class=muted>Flicker: the mean change between consecutive output frames over the same for the "
            "bicubic-upscaled input (1.0: no more change than the input).</p>" + "".join(out))


_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px;color:#1d232a}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.muted{color:#6b7480}code{font-size:12.5px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:16px 0}
.card{border:1px solid #dde2e8;border-radius:8px;padding:8px 14px;min-width:90px}
.card b{display:block;font-size:20px}.card.failed b{color:#b3261e}.card.ok b{color:#1b7f3b}
svg text{font-size:11px;fill:#4a525c}svg .grid{stroke:#e4e8ec}svg .ok{fill:#3d9a5b}svg .failed{fill:#d0453b}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #e4e8ec;padding:6px 8px;text-align:left;
vertical-align:top}td.num{text-align:right}ul{margin:0;padding-left:18px}
.pair{display:inline-grid;grid-template-columns:auto auto;gap:2px 10px;margin:0 24px 22px 0;vertical-align:top}
.frame{position:relative;line-height:0;border:1px solid #c9cfd6}
.frame img{position:absolute;left:0;top:0;image-rendering:pixelated}
.frame img.before{clip-path:inset(0 calc(100% - var(--pos)) 0 0)}
.frame::after{content:"";position:absolute;top:0;bottom:0;left:var(--pos);border-left:2px solid #fff;
box-shadow:0 0 2px #000}
.tag{position:absolute;top:4px;font-size:11px;line-height:1.4;background:#0009;color:#fff;padding:0 5px;
border-radius:3px}.tag.l{left:4px}.tag.r{right:4px}
.compare input{display:block;width:100%;margin:6px 0 0}
figcaption{grid-column:1/3;font-size:12px}
.context{position:relative;align-self:start;line-height:0}
.context i{position:absolute;border:1px solid #ff0;outline:1px solid #0008}
details pre{font-size:12px;background:#f5f7f9;padding:8px;overflow:auto}
.prompt{display:inline-block;max-width:560px;color:#4a525c}
.clip{border-top:1px solid #e4e8ec;padding-top:8px}.clip h3{font-size:14px;margin:4px 0 8px}
table.facts{width:auto;margin:0 0 10px}table.facts th{font-weight:normal;color:#6b7480}
"""


def render(summary: dict[str, Any], digest: RunDigest, pairs: list[dict[str, Any]], spec: RunSpec,
           clips: list[dict[str, Any]] | None = None) -> str:
    median = digest.median_seconds()
    timing = f"median {median:.2f} s, slowest {digest.slowest:.2f} s per unit of work" if median is not None else ""
    cards = [("", summary["inputs"], "inputs"), ("ok", summary["ok"], "ok"), ("failed", summary["failed"], "failed"),
             ("", summary["skipped"], "skipped (already done)"), ("", f"{summary['seconds']:.1f} s", "wall time"),
             ("", summary.get("items_per_min") or 0, "inputs / min")]
    if digest.clips_finished:
        cards += [("", digest.clip_frames, "frames (videos, sequences)"),
                  ("", summary.get("frames_per_min") or 0, "frames / min")]
    cards_html = "".join(f'<div class="card {css}"><b>{html.escape(str(value))}</b>{label}</div>'
                         for css, value, label in cards)
    settings = json.dumps(summary.get("settings", {}), indent=2, sort_keys=True, default=str)
    written = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Run {html.escape(summary['run_id'])} — dit4sr catalog</title><style>{_STYLE}</style></head>
<body>
<h1>Run {html.escape(summary['run_id'])}</h1>
<div class=muted>{html.escape(spec.input.location.uri)} → {html.escape(spec.output.location.uri)} · config
<code>{html.escape(summary['config_fingerprint'])}</code> · report written {written}</div>
<div class=cards>{cards_html}</div>
<div class=muted>{timing}</div>
<h2>Throughput over the run</h2>
{_throughput_svg(digest)}
<h2>Failures by type</h2>
{_failures(digest)}
<h2>Photos: before / after</h2>
<p class=muted>A crop of each output at full resolution against the same region of its source, enlarged without
smoothing; drag the slider. The small picture shows where the crop lies.</p>
{_pairs_html(pairs)}
<h2>Videos and frame sequences</h2>
{_clips_html(clips or [])}
{_prompts_html(digest)}
<details><summary>Settings (what the config fingerprint covers)</summary><pre>{html.escape(settings)}</pre></details>
</body></html>
"""
