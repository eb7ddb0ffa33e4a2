"""Captions as prompts in the catalog job (upscale.caption; pipeline.captions): settings and fingerprint, the stage in
real local Ray jobs with the session's tiny random LLaVA and tiny DiT4SR with text encoders, captions cached with the
unit state, a clip's one caption, prompt files beside captions, and a caption model that cannot work."""

from __future__ import annotations

import html
import json
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pytest
from support.catalog import image_bytes, job_config, manifests, outputs, small_catalog, write_catalog

import media
from dit4sr import OFFICIAL_CAPTION_QUESTION, ImageCaptioner, compose_prompt
from pipeline.config import ConfigError, fingerprint, validate_config
from pipeline.run import EXIT_OK, run_job
from pipeline.spec import RunSpec

CAPTION_TOKENS = 12


def _config(tmp_path: pathlib.Path, model: pathlib.Path, captioner: pathlib.Path | None, out: str = "out",
            **sections) -> dict:
    upscale = {"scale": 2, "seed": 1, **sections.pop("upscale", {})}
    if captioner is not None:
        upscale["caption"] = {"model": str(captioner), "max_new_tokens": CAPTION_TOKENS,
                              **upscale.get("caption", {})}
    compute = {"batch_size": 2, "actors": {"min": 1, "max": 1},
               "caption": {"batch_size": 2}, **sections.pop("compute", {})}
    return job_config(str(tmp_path / "in"), str(tmp_path / out), model={"path": str(model), "device": "cpu"},
                      upscale=upscale, compute=compute, **sections)


def _summary(output: pathlib.Path, run_id: str) -> dict:
    return json.loads((output / "_manifests" / f"run={run_id}" / "_summary.json").read_text())


def _expected_captions(captioner_root: pathlib.Path, files: dict[str, bytes]) -> dict[str, str]:
    """Captions of the inputs as the job's LR input reaches the model (decoded as the upscaler decodes it)."""
    captioner = ImageCaptioner.from_pretrained(str(captioner_root), max_new_tokens=CAPTION_TOKENS)
    return {key: captioner.caption(media.to_float_pixels(media.decode_image(data, key, 10**8).pixels))
            for key, data in files.items()}


def test_caption_settings_enter_the_fingerprint(tiny_text_model_root, tiny_caption_model_root, tmp_path):
    def settings(captioner=tiny_caption_model_root, **sections):
        config = validate_config(_config(tmp_path, tiny_text_model_root, captioner, **sections))
        return RunSpec.resolve(config, "r").fingerprint_fields()

    plain, captioned = settings(None), settings()
    assert "caption" not in plain  # fingerprints of runs without captions are those of before captions existed
    assert captioned["caption"]["question"] == OFFICIAL_CAPTION_QUESTION
    assert captioned["caption"]["dtype"] == "float32" and captioned["caption"]["filter_focus_sentences"] is True
    assert {key: value for key, value in captioned.items() if key != "caption"} == plain
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_caption_model_root, moved)
    changed = [settings(upscale={"caption": {"question": "What is in the picture?"}}),
               settings(upscale={"caption": {"max_new_tokens": 5}}),
               settings(upscale={"caption": {"filter_focus_sentences": False}}),
               settings(compute={"caption": {"gpus_per_actor": 1}}),  # dtype auto: bfloat16 on GPUs
               settings(moved)]
    fingerprints = {fingerprint(s) for s in [plain, captioned, *changed]}
    assert len(fingerprints) == 2 + len(changed)
    # how captions are computed where (actors, batches) changes no caption
    same = settings(compute={"caption": {"actors": {"min": 2, "max": 3}, "batch_size": 7, "cpus_per_actor": 2}})
    assert fingerprint(same) == fingerprint(captioned)


def test_settings_that_cannot_go_with_captions_are_refused(tiny_text_model_root, tiny_caption_model_root, tmp_path):
    from support.tiny_components import TINY_TEXT_RECOMMENDED, pixel_pipeline, save_model_root

    with pytest.raises(ConfigError, match="prompt and caption.model exclude each other"):
        validate_config(_config(tmp_path, tiny_text_model_root, tiny_caption_model_root,
                                upscale={"prompt": "a cat"}))
    bicubic = _config(tmp_path, pathlib.Path("bicubic"), tiny_caption_model_root)
    with pytest.raises(ConfigError, match="the bicubic engine takes no prompt"):
        RunSpec.resolve(validate_config(bicubic), "r").fingerprint_fields()
    no_text = tmp_path / "no-text"
    save_model_root(pixel_pipeline(), no_text, recommended={**TINY_TEXT_RECOMMENDED, "guidance_scale": 1.0})
    with pytest.raises(ConfigError, match="no text encoders, so it cannot encode '<caption>"):
        RunSpec.resolve(validate_config(_config(tmp_path, no_text, tiny_caption_model_root)), "r").fingerprint_fields()


def test_a_bad_caption_model_fails_the_job_before_any_input_with_one_line(tiny_text_model_root, tmp_path):
    write_catalog(tmp_path / "in", small_catalog(2))
    for where, cause in ((tmp_path / "nowhere", "no such folder, or it is empty"),
                         (tiny_text_model_root, "no config.json there"),
                         (tiny_text_model_root / "text_encoder",
                          "its config.json describes a 'clip_text_model' model")):
        with pytest.raises(ConfigError) as error:
            run_job(validate_config(_config(tmp_path, tiny_text_model_root, where)))
        assert str(error.value).startswith(f"upscale.caption.model {where}: {cause}")
        assert "\n" not in str(error.value)
        assert manifests(tmp_path / "out").empty and not list((tmp_path / "out").glob("**/*.png"))


@pytest.mark.slow  # three jobs of up to five actor pools each: minutes on the shared 2-core machine
def test_photos_and_clips_are_captioned_on_the_cluster_repeated_in_other_batches_cached_and_recorded(
        ray_local, tiny_text_model_root, tiny_caption_model_root, tmp_path, capsys):
    """The captions stage end to end, in three jobs. (1) Three photos captioned in the stream (a fourth takes its
    prompt from the prompts file, uncaptioned), a video and a frame sequence of several segments each with one
    caption per clip, from the middle frame of its first segment, on the clip's row and every segment's; each
    prompt recorded exactly, shown in the report and queryable in DuckDB. (2) The photos again in batches of one
    (texts encoded one at a time) give the same captions and bytes. (3) A re-run of (1) with another
    seed redoes every output and captions nothing (the captions come from the unit state)."""
    import duckdb
    from support import video_clips

    from media import video

    photos = small_catalog(4)
    listed = sorted(photos)[0]
    reel = {f"reel/frame_{n:04d}.png": image_bytes(12, 8, seed=10 + n) for n in range(1, 7)}
    write_catalog(tmp_path / "in", {**photos, **reel})
    clip = tmp_path / "in" / "clip.mp4"
    video_clips.write_clip(clip, frames=12, size=(24, 16))
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(f'source,prompt\n"{listed}",a red cat photo\n')
    # segments of 5 frames (0.2 s at 24 frames/s): the video's three, the sequence's 5 + 1 frames
    sections = {"upscale": {"prompts_uri": str(prompts)},
                "video": {"segment_seconds": 0.2, "measure_flicker": False, "sequence_folders": ["reel"]}}
    config = _config(tmp_path, tiny_text_model_root, tiny_caption_model_root, **sections)
    assert run_job(validate_config(config)) == EXIT_OK
    rows = manifests(tmp_path / "out")
    run_id = rows.run_id.iloc[0]
    assert set(rows[rows.unit != "segment"].status) == {"ok"} and set(rows[rows.unit == "segment"].status) == {"staged"}
    added = RunSpec.resolve(validate_config(config), "r").sampler.added_prompt

    first = rows[rows.unit == "image"].set_index("source_key")
    expected = _expected_captions(tiny_caption_model_root, {k: v for k, v in photos.items() if k != listed})
    for key, caption in expected.items():
        assert first.loc[key, "caption"] == caption
        assert first.loc[key, "prompt"] == compose_prompt(caption, added)  # the exact text encoded
        assert first.loc[key, "caption_model"] == str(tiny_caption_model_root)
        assert first.loc[key, "caption_run_id"] == run_id
    assert len(set(expected.values())) == 3  # each photo its own prompt
    assert first.loc[listed, "prompt"] == compose_prompt("a red cat photo", added)
    assert first.loc[listed, ["caption", "caption_model", "caption_run_id"]].isna().all()

    clip_rows = rows[rows.source_key == "clip.mp4"]
    assert (clip_rows.unit == "video").sum() == 1 and (clip_rows.unit == "segment").sum() >= 2
    assert clip_rows.caption.nunique() == 1 and clip_rows.prompt.nunique() == 1
    with open(clip, "rb") as handle:
        index = video.index_video(handle, "clip.mp4")
        segment = video.plan_segments(index, round(0.2 * float(index.average_rate)))[0]
        packets = video.extract_segment(handle, segment, "clip.mp4")
    middle = list(video.decode_segment(packets, segment, "clip.mp4"))[segment.output_frames // 2]
    frame = np.clip(media.to_float_pixels(middle) * 255 + 0.5, 0, 255).astype(np.uint8)  # as the job's PNG of it
    captioner = ImageCaptioner.from_pretrained(str(tiny_caption_model_root), max_new_tokens=CAPTION_TOKENS)
    assert clip_rows.caption.iloc[0] == captioner.caption(frame.astype(np.float32) / 255)
    sequence_rows = rows[rows.source_key == "reel/frame_%04d.png"]
    assert sorted(sequence_rows.unit) == ["segment", "segment", "sequence"]
    assert set(sequence_rows.caption) == set(_expected_captions(  # frames 1-5 first: their middle one
        tiny_caption_model_root, {"reel/frame_0003.png": reel["reel/frame_0003.png"]}).values())
    # three photos, one video, one sequence
    assert _summary(tmp_path / "out", run_id)["captions"] == {"generated": 5, "reused": 0}
    assert "  captions: 5 generated, 0 reused from earlier runs" in capsys.readouterr().out

    report = (tmp_path / "out" / "_manifests" / f"run={run_id}" / "_report.html").read_text()
    assert all(html.escape(prompt) in report for prompt in rows.prompt)
    queried = duckdb.sql(f"select source_key, prompt from read_parquet('{tmp_path / 'out'}/_manifests/*/*.parquet') "
                         "where caption is not null and unit = 'image' order by source_key").fetchall()
    assert queried == sorted((key, compose_prompt(caption, added)) for key, caption in expected.items())

    # the photos only (clips take their one caption before the stream, whatever the pools: (3) and the resume test)
    more = {**sections, "input": {"exclude": ["clip.mp4", "reel/**"]},
            "compute": {"batch_size": 1, "caption": {"batch_size": 1}}}
    assert run_job(validate_config(_config(tmp_path, tiny_text_model_root, tiny_caption_model_root, out="again",
                                           **more))) == EXIT_OK
    again = manifests(tmp_path / "again").set_index("unit_key")
    assert sorted(again.source_key) == sorted(photos)
    assert again.caption.to_dict() == rows.set_index("unit_key").caption[again.index].to_dict()
    written = outputs(tmp_path / "out")
    assert len(written) == len(photos) + 1 + len(reel) and "clip.mp4" in written and "reel/frame_0006.png" in written
    assert outputs(tmp_path / "again") == {key: written[key] for key in again.output_key}

    capsys.readouterr()
    config["upscale"]["seed"] = 2  # changes every output, not a caption
    assert run_job(validate_config(config), dry_run=True) == EXIT_OK
    printed = capsys.readouterr().out
    assert "dry run: 6 to process, 0 to skip, 0 rejected;" in printed
    assert printed.rstrip().endswith("; 2 clips in 5 segments to do; 0 captions to generate")
    assert run_job(validate_config(config)) == EXIT_OK
    second = manifests(tmp_path / "out")
    second = second[second.run_id != run_id]
    assert sorted(second.status) == sorted(rows.status)
    assert (second.caption_run_id.dropna() == run_id).all()  # made by the first run, not redone
    assert second.caption_run_id.notna().sum() == rows.caption_run_id.notna().sum()
    assert second.set_index("unit_key").prompt.to_dict() == rows.set_index("unit_key").prompt.to_dict()
    assert _summary(tmp_path / "out", second.run_id.iloc[0])["captions"] == {"generated": 0, "reused": 5}
    assert "  captions: 0 generated, 5 reused from earlier runs" in capsys.readouterr().out


@pytest.mark.slow
def test_a_clip_resumed_after_its_first_segments_keeps_their_caption(ray_local, tiny_text_model_root,
                                                                       tiny_caption_model_root, tmp_path):
    """A run that staged some segments of a clip and then stopped: the next run finishes the clip with the caption
    the staged segments were made with, taken from the unit state, captioning nothing."""
    from support import video_clips

    from pipeline import captions
    from pipeline import plan as planning
    from pipeline.run import execute, prepare

    (tmp_path / "in").mkdir()
    video_clips.write_clip(tmp_path / "in" / "clip.mp4", frames=12, size=(24, 16))
    cfg = validate_config(_config(tmp_path, tiny_text_model_root, tiny_caption_model_root,
                                  video={"segment_seconds": 0.2, "measure_flicker": False}))
    plan = prepare(cfg)
    captions.caption_clips(plan)
    segments = [row for row in plan.todo if row["unit"] == "segment"]
    # the run "stops" after one segment: its clip stays unassembled
    plan.todo = planning.Rows([pa.Table.from_pylist(segments[:1], schema=planning.TODO_SCHEMA)], 1)
    execute(plan)
    staged = manifests(tmp_path / "out")
    assert list(staged.unit) == ["segment"] and staged.caption.notna().all()

    resumed = prepare(cfg)
    assert {row["caption"] for row in resumed.todo} == {staged.caption.iloc[0]}
    assert len(resumed.todo) == len(segments) - 1 and isinstance(resumed, planning.Plan)
    assert execute(resumed)["captions"] == {"generated": 0, "reused": 1}
    final = manifests(tmp_path / "out")
    assert final[final.unit == "video"].caption.tolist() == [staged.caption.iloc[0]]
    assert final.caption_run_id.nunique() == 1


def test_dit4sr_upscale_caption_model(tmp_path, tiny_text_model_root, tiny_caption_model_root, capsys):
    """``dit4sr-upscale --caption-model``: each image is upscaled with its caption as the prompt (the same bytes as
    the pipeline called with that prompt); a caption model that cannot work is one error line and exit 1."""
    from PIL import Image

    from dit4sr import DiT4SRPipeline
    from dit4sr.cli import main

    write_catalog(tmp_path / "in", {"a.png": image_bytes(10, 8, seed=1)})
    out = tmp_path / "out"
    args = [str(tmp_path / "in" / "a.png"), "-o", str(out), "--model", str(tiny_text_model_root), "--device", "cpu",
            "--quiet", "--caption-model", str(tiny_caption_model_root)]
    assert main(args) == 0
    caption = ImageCaptioner.from_pretrained(str(tiny_caption_model_root)).caption(
        Image.open(tmp_path / "in" / "a.png"))
    assert f"caption {tmp_path / 'in' / 'a.png'}: {caption}" in capsys.readouterr().err
    pipe = DiT4SRPipeline.from_pretrained(str(tiny_text_model_root), device="cpu", load_text_encoders=True)
    expected = pipe(Image.open(tmp_path / "in" / "a.png"), upscale=4, seed=0, prompt=caption, output_type="pil",
                    show_progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), np.asarray(expected))

    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dit4sr-upscale: error: cannot load caption model {tmp_path / 'nowhere'}: "
                   "ValueError: no such folder, or it is empty"]
    assert main([args[0], "-o", str(out), "--model", "bundled", "--quiet", "--caption-model",
                 str(tiny_caption_model_root)]) == 1
    assert "error: --caption-model: model bundled has no text encoders" in capsys.readouterr().err
