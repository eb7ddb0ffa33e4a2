"""The DiT4SR engine inside the catalog job: the session's tiny random model with text encoders
(``tiny_text_model_root``), and the bundled model."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.catalog import REPO, image_bytes, job_config, manifests, small_catalog, write_catalog
from support.tiny_components import TINY_TEXT_RECOMMENDED as RECOMMENDED

from pipeline.config import ConfigError, fingerprint, load_config, validate_config
from pipeline.run import EXIT_INPUTS_FAILED, EXIT_OK, run_job
from pipeline.spec import RunSpec


def _config(tmp_path: pathlib.Path, root: pathlib.Path, out: str = "out", **sections) -> dict:
    return job_config(str(tmp_path / "in"), str(tmp_path / out), model={"path": str(root), "device": "cpu"},
                      **sections)


def _settings(config: dict) -> dict:
    return RunSpec.resolve(validate_config(config), "r").fingerprint_fields()


def test_null_settings_resolve_to_the_models_recommendations(tiny_text_model_root, tmp_path):
    implicit = _settings(_config(tmp_path, tiny_text_model_root))
    assert implicit["num_inference_steps"] == 2 and implicit["tile_size"] == 8 and implicit["process_size"] == 16
    explicit = _settings(_config(tmp_path, tiny_text_model_root, upscale={"steps": 2}))
    assert fingerprint(implicit) == fingerprint(explicit)  # what ran is what counts
    changed = _settings(_config(tmp_path, tiny_text_model_root, upscale={"steps": 3}))
    assert fingerprint(changed) != fingerprint(implicit)


def test_a_sampler_version_bump_changes_the_fingerprint(tiny_text_model_root, tmp_path, monkeypatch):
    """dit4sr.SAMPLER_VERSION is bumped when a sampler change alters output bytes: the catalog then redoes its
    outputs, because the version is part of the config fingerprint."""
    import dit4sr

    config = validate_config(_config(tmp_path, tiny_text_model_root))
    before = RunSpec.resolve(config, "r").fingerprint_fields()
    monkeypatch.setattr(dit4sr, "SAMPLER_VERSION", dit4sr.SAMPLER_VERSION + ".next")
    after = RunSpec.resolve(config, "r").fingerprint_fields()
    assert fingerprint(after) != fingerprint(before)
    assert {key for key in before if before[key] != after[key]} == {"sampler_version"}


def test_dry_run_estimates_tiles_times_steps(tiny_text_model_root, tmp_path, capsys):

    write_catalog(tmp_path / "in", {"wide.png": image_bytes(40, 8), "small.png": image_bytes(4, 4)})
    # Working sizes (short side raised to process_size // scale = 8, then x2, /4 for the pixel-unshuffle VAE):
    # wide 40x8 -> latent 20x4 -> 4 tiles of 8 with overlap 4; small 4x4 -> latent 4x4 -> 1 tile.
    assert run_job(validate_config(_config(tmp_path, tiny_text_model_root)), dry_run=True) == EXIT_OK
    printed = capsys.readouterr().out
    assert "process wide.png -> wide.png  40x8  tiles=4" in printed
    assert "process small.png -> small.png  4x4  tiles=1" in printed
    assert "estimated cost 5 tiles x 2 steps = 10 tile-steps" in printed


def test_dry_run_tile_counts_are_what_the_sampler_runs(tiny_text_model_root, tmp_path, capsys):
    """Tiny and extreme shapes: the dry run asks dit4sr's own geometry, so it neither crashes (a 1x1 PNG) nor
    under-counts (400x4), and a clip's estimate is its frames times one frame's tiles."""
    from support import video_clips

    import dit4sr

    write_catalog(tmp_path / "in", {"dot.png": image_bytes(1, 1), "strip.png": image_bytes(400, 4),
                                    "tall.png": image_bytes(3, 90)})
    video_clips.write_clip(tmp_path / "in" / "clip.mp4", frames=10, size=(24, 16))
    assert run_job(validate_config(_config(tmp_path, tiny_text_model_root, video={"segment_seconds": 0.2})),
                   dry_run=True) == EXIT_OK
    printed = capsys.readouterr().out
    pipe = dit4sr.DiT4SRPipeline.from_pretrained(str(tiny_text_model_root), device="cpu")
    for key, (width, height) in {"dot.png": (1, 1), "strip.png": (400, 4), "tall.png": (3, 90)}.items():
        tiles = pipe.geometry(height, width, 2).tiles  # job_config upscales x2
        assert f"process {key} -> {key}  {width}x{height}  tiles={tiles}" in printed
    clip_tiles = 10 * pipe.geometry(16, 24, 2).tiles
    assert f"process clip.mp4 -> clip.mp4  video 24x16  frames=10 segments=2 (2 to do)  tiles={clip_tiles}" \
        in printed


@pytest.mark.slow
def test_dit4sr_engine_end_to_end_with_per_source_prompts(ray_local, tiny_text_model_root, tmp_path):
    files = small_catalog(4)
    write_catalog(tmp_path / "in", files)
    prompts = tmp_path / "prompts.csv"
    first = sorted(files)[0]
    prompts.write_text(f'source,prompt\n"{first}",a red cat photo\n')
    sections = {"upscale": {"scale": 2, "seed": 7, "prompts_uri": str(prompts)},
                "compute": {"batch_size": 2, "actors": {"min": 1, "max": 1}}}
    assert run_job(validate_config(_config(tmp_path, tiny_text_model_root, **sections))) == EXIT_OK
    rows = pq.read_table(sorted((tmp_path / "out").glob("_manifests/run=*/part-*.parquet"))).to_pandas()
    assert set(rows.status) == {"ok"} and sorted(rows.source_key) == sorted(files)
    assert ((rows.out_width == rows.width * 2) & (rows.out_height == rows.height * 2)).all()
    # the per-source prompt has its own fingerprint; the others share the config's
    by_key = rows.set_index("source_key").config_fingerprint
    assert by_key[first] != by_key.drop(first).iloc[0] and by_key.drop(first).nunique() == 1
    # (that this model's bytes do not depend on batches or actors, with prompts per source: test_captions)


def _official_arrangement(combined: pathlib.Path, base: pathlib.Path, dit4sr_root: pathlib.Path) -> None:
    """Split a model root as the official release ships: an SD3.5 root plus a DiT4SR root with NULL_*.pt."""
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(combined, base)
    index = json.loads((base / "model_index.json").read_text())
    index.update(_class_name="StableDiffusion3Pipeline", transformer=["diffusers", "SD3Transformer2DModel"])
    (base / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(base / "transformer")
    shutil.rmtree(base / "prompt_embeds")
    dit4sr_root.mkdir(parents=True)
    shutil.move(base / "recommended_settings.json", dit4sr_root / "recommended_settings.json")
    shutil.copytree(combined / "transformer", dit4sr_root / "transformer")
    null = load_file(combined / "prompt_embeds" / "null.safetensors")
    torch.save(null["prompt_embeds"], dit4sr_root / "NULL_prompt_embeds.pt")
    torch.save(null["pooled_prompt_embeds"], dit4sr_root / "NULL_pooled_prompt_embeds.pt")


@pytest.mark.slow
def test_a_thin_image_is_refused_for_the_canvas_it_would_sample(ray_local, tiny_text_model_root, tmp_path):
    """DiT4SR raises the short side to its process size: a 60x1 strip outputs 120x2 pixels but samples 960x16."""
    write_catalog(tmp_path / "in", {"strip.png": image_bytes(60, 1), "square.png": image_bytes(8, 8)})
    config = _config(tmp_path, tiny_text_model_root, upscale={"scale": 2}, limits={"max_output_pixels": 10_000})
    assert run_job(validate_config(config)) == EXIT_INPUTS_FAILED
    rows = manifests(tmp_path / "out").set_index("source_key")
    assert rows.loc["square.png"].status == "ok"
    assert rows.loc["strip.png"].error_type == "output_too_large"
    assert "sampled on a 960x16 canvas (process size 16)" in rows.loc["strip.png"].error_message


def test_official_arrangement_sd35_root_plus_dit4sr_root(tiny_text_model_root, tmp_path):
    """The job's side of the official layout (loading it is test_pipeline_loading's): the config asks for the
    DiT4SR root, settings come from it, and the engine an actor builds from it upscales as the combined root's."""
    from pipeline.engine import load_engine

    base, official = tmp_path / "sd3.5-medium", tmp_path / "dit4sr_r1"
    _official_arrangement(tiny_text_model_root, base, official)
    sections = {"upscale": {"scale": 2, "seed": 3, "guidance_scale": 1.0}}
    split = _config(tmp_path, base, **sections)
    split["model"]["transformer"] = str(official)
    with pytest.raises(ConfigError, match="set model.transformer"):
        _settings(_config(tmp_path, base, **sections))
    image = np.random.default_rng(0).random((12, 10, 3), dtype=np.float32)
    upscaled = []
    for config in (split, _config(tmp_path, tiny_text_model_root, **sections)):
        cfg = validate_config(config)
        settings = RunSpec.resolve(cfg, "r").fingerprint_fields()
        assert settings["num_inference_steps"] == RECOMMENDED["num_inference_steps"]  # from the DiT4SR root
        engine = load_engine(RunSpec.resolve(cfg, "run"), device="cpu")
        upscaled.append(engine.upscale(image, seed=3, prompt=""))
    assert upscaled[0].shape == (24, 20, 3) and np.array_equal(upscaled[0], upscaled[1])


def test_model_without_text_encoders_refuses_a_prompt(tmp_path):
    from support.tiny_components import pixel_pipeline, save_model_root

    root = tmp_path / "no-text"
    save_model_root(pixel_pipeline(), root, recommended={**RECOMMENDED, "guidance_scale": 1.0})
    _settings(_config(tmp_path, root))  # no prompt, no guidance: fine
    with pytest.raises(ConfigError, match="no text encoders"):
        _settings(_config(tmp_path, root, upscale={"prompt": "a cat"}))
    with pytest.raises(ConfigError, match="no text encoders"):
        _settings(_config(tmp_path, root, upscale={"guidance_scale": 4.0}))


@pytest.mark.slow
def test_bundled_model_on_the_embedded_default(ray_local, tmp_path):
    # the example catalog belongs to the config's own folder: elsewhere it is laid out only when asked for
    overrides = [f"input.uri={tmp_path / 'catalog'}", f"output.uri={tmp_path / 'upscaled'}",
                 "input.example_catalog=true"]
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    assert run_job(cfg) == EXIT_OK  # lays out the example catalog first
    summary = json.loads(next((tmp_path / "upscaled").glob("_manifests/run=*/_summary.json")).read_text())
    assert summary["ok"] >= 5 and summary["failed"] == 0
    print(f"bundled model, embedded default: {summary['items_per_min']} items/min")
