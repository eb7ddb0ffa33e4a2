"""compute.compile resolved at plan time and folded into the fingerprint; the actors' tile batch in the summary."""

from __future__ import annotations

import json

import pytest
from support.catalog import image_bytes, job_config, manifests, write_catalog

from pipeline.config import ConfigError, load_config, validate_config
from pipeline.run import EXIT_OK, run_job
from pipeline.spec import COMPILE_SCHEME, RunSpec, compile_enabled


def _config(tmp_path, root, **sections) -> dict:
    return job_config(str(tmp_path / "in"), str(tmp_path / "out"), model={"path": str(root), "device": "cpu"},
                      **sections)


def _spec(tmp_path, root, compute=None, device="cpu"):
    config = _config(tmp_path, root, compute=compute or {})
    config["model"]["device"] = device
    return RunSpec.resolve(validate_config(config), "r")


@pytest.mark.parametrize("compute, device, compiled", [
    ({}, "cpu", False),  # auto on the CPU
    ({"gpus_per_actor": 1}, None, True),  # auto where actors get GPUs
    ({"gpus_per_actor": 1}, "cuda", True),
    ({"gpus_per_actor": 1}, "cpu", False),  # GPUs reserved but the model pinned to the CPU
    ({"gpus_per_actor": 1, "compile": "off"}, None, False),
    ({"compile": "on"}, "cpu", True),
])
def test_compile_resolves_at_plan_time(tiny_text_model_root, tmp_path, compute, device, compiled):
    cfg_dict = _config(tmp_path, tiny_text_model_root, compute=compute)
    cfg_dict["model"]["device"] = device
    cfg = validate_config(cfg_dict)
    assert compile_enabled(cfg) is compiled
    spec = RunSpec.resolve(cfg, "r")
    assert spec.fingerprint_fields().get("compile") == (COMPILE_SCHEME if compiled else None)
    assert spec.model.compile is compiled


def test_compile_is_in_the_fingerprint_and_eager_fingerprints_are_unchanged(tiny_text_model_root, tmp_path):
    eager = _spec(tmp_path, tiny_text_model_root)
    compiled = _spec(tmp_path, tiny_text_model_root, {"compile": "on"})
    assert "compile" not in eager.fingerprint_fields()  # runs made before compiling existed keep their fingerprints
    assert eager.fingerprint != compiled.fingerprint
    # batch sizes stay out of it: they change rounding only
    batched = _spec(tmp_path, tiny_text_model_root, {"batch_size": 7, "compile": "on"})
    assert batched.fingerprint == compiled.fingerprint and "tile_batch_size" not in compiled.fingerprint_fields()


def test_yaml_on_off_and_bad_values(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {uri: in}\noutput: {uri: out}\ncompute: {compile: on}\n")
    assert load_config(path).compute.compile == "on"  # YAML reads `on` as true
    assert load_config(path, ["compute.compile=off"]).compute.compile == "off"
    with pytest.raises(ConfigError, match="compute.compile"):
        load_config(path, ["compute.compile=sometimes"])


@pytest.mark.slow  # a DiT4SR job; the fast tier builds the actors' engine in process (test_dit4sr_engine)
def test_summary_records_the_actors_tile_batch(ray_local, tiny_text_model_root, tmp_path):
    write_catalog(tmp_path / "in", {"a.png": image_bytes(8, 8, seed=1), "b.png": image_bytes(8, 8, seed=2)})
    assert run_job(validate_config(_config(tmp_path, tiny_text_model_root, upscale={"scale": 2}))) == EXIT_OK
    summary = json.loads(next((tmp_path / "out").glob("_manifests/run=*/_summary.json")).read_text())
    # The CPU budget's choice (2 GiB of activations) for these tiles: an 8x8 input x2 is one 4x4-latent tile of
    # 2 x 16 / 2^2 image tokens + 154 prompt tokens, twice (guidance 2), x transformer width 16 x 24 bytes each.
    assert summary["settings"]["tile_batch_size"] == (2 << 30) // ((2 * 16 // 2**2 + 154) * 2 * 16 * 24) == 17260
    assert "engine_settings" not in manifests(tmp_path / "out").columns  # a summary setting, not a manifest column
