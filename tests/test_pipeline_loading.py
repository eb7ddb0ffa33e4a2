"""DiT4SRPipeline.from_pretrained: our layout (local and s3://), the official SD3.5 + DiT4SR arrangement,
recommended settings and the null-prompt embedding."""

import json
import os

import numpy as np
import pytest
import torch
from support.tiny_components import save_model_root, tiny_pipeline, tiny_text_components

import dit4sr
from dit4sr import BUNDLED_MODEL, DiT4SRPipeline

FAST = dict(num_inference_steps=2, guidance_scale=1.0, show_progress=False, output_type="np", process_size=0)
IMAGE = (np.random.default_rng(0).random((12, 16, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def reference():
    """A pipeline in the state from_pretrained leaves it: control projections fused."""
    torch.set_num_threads(2)
    pipe = tiny_pipeline(**tiny_text_components())
    pipe.transformer.fuse_control_projections()
    return pipe


def test_loaded_transformer_is_fused_for_inference(tmp_path, reference):
    save_model_root(reference, tmp_path / "model")
    fused = DiT4SRPipeline.from_pretrained(tmp_path / "model", device="cpu")
    unfused = DiT4SRPipeline.from_pretrained(tmp_path / "model", device="cpu", fuse_control_projections=False)
    assert fused.transformer.transformer_blocks[0].attn.control_projections_fused
    assert not unfused.transformer.transformer_blocks[0].attn.control_projections_fused
    settings = dict(FAST, num_inference_steps=3)
    difference = np.abs(fused(IMAGE, **settings).images[0] - unfused(IMAGE, **settings).images[0]).max()
    assert difference < 1e-5


def test_own_layout_round_trip_with_recommended_settings(tmp_path, reference):
    save_model_root(reference, tmp_path / "model", recommended={"num_inference_steps": 2, "color_fix": "none"})
    pipe = DiT4SRPipeline.from_pretrained(tmp_path / "model", device="cpu")
    assert pipe.recommended_settings == {"num_inference_steps": 2, "color_fix": "none"}
    assert pipe.text_encoder is None and pipe.transformer.dtype == torch.float32
    assert torch.equal(pipe.null_prompt_embedding.prompt_embeds, reference.null_prompt_embedding.prompt_embeds)
    assert pipe.effective_settings()["color_fix"] == "none"
    expected = reference(IMAGE, color_fix="none", **FAST).images[0]
    assert pipe(IMAGE, **FAST).images[0].tobytes() == expected.tobytes()


def test_text_encoders_load_only_when_asked(tmp_path, reference):
    save_model_root(reference, tmp_path / "model", text_encoders=True)
    assert DiT4SRPipeline.from_pretrained(tmp_path / "model").text_encoder_3 is None
    pipe = DiT4SRPipeline.from_pretrained(tmp_path / "model", load_text_encoders=True)
    assert pipe.has_text_encoders
    assert pipe(IMAGE, prompt="a red cat", **FAST).images[0].tobytes() == \
        reference(IMAGE, prompt="a red cat", **FAST).images[0].tobytes()


def test_official_arrangement_sd3_root_plus_dit4sr_transformer(tmp_path, reference):
    sd3, official = tmp_path / "sd3.5-medium", tmp_path / "dit4sr_q"
    save_model_root(reference, sd3, text_encoders=True)
    index = json.loads((sd3 / "model_index.json").read_text())
    index.update(_class_name="StableDiffusion3Pipeline", transformer=["diffusers", "SD3Transformer2DModel"])
    (sd3 / "model_index.json").write_text(json.dumps(index))
    (sd3 / "prompt_embeds" / "null.safetensors").unlink()
    reference.transformer.save_pretrained(official / "transformer")
    torch.save(reference.null_prompt_embedding.prompt_embeds, official / "NULL_prompt_embeds.pt")
    torch.save(reference.null_prompt_embedding.pooled_prompt_embeds, official / "NULL_pooled_prompt_embeds.pt")

    with pytest.raises(ValueError, match="transformer=<DiT4SR root>"):
        DiT4SRPipeline.from_pretrained(sd3)
    pipe = DiT4SRPipeline.from_pretrained(sd3, transformer=official, release="r1")
    assert pipe.transformer.config.release == "r1" and pipe.recommended_settings == {}
    assert torch.equal(pipe.null_prompt_embedding.pooled_prompt_embeds,
                       reference.null_prompt_embedding.pooled_prompt_embeds)
    assert pipe(IMAGE, **FAST).images[0].tobytes() == reference(IMAGE, **FAST).images[0].tobytes()


def test_loading_from_s3(tmp_path, reference, monkeypatch, bucket, s3_options):
    import s3fs

    monkeypatch.setenv("DIT4SR_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "model"
    save_model_root(reference, root, recommended={"tile_size": 32})
    s3fs.S3FileSystem(**s3_options).put(str(root), f"{bucket}/tiny", recursive=True)
    pipe = DiT4SRPipeline.from_pretrained(f"s3://{bucket}/tiny", storage_options=s3_options)
    assert pipe.recommended_settings == {"tile_size": 32}
    assert pipe.null_prompt_embedding is not None
    assert pipe(IMAGE, **FAST).images[0].tobytes() == reference(IMAGE, tile_size=32, **FAST).images[0].tobytes()


def test_bad_roots_and_settings(tmp_path, reference):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiT4SRPipeline.from_pretrained(tmp_path)
    save_model_root(reference, tmp_path / "model", recommended={"num_steps": 3})
    with pytest.raises(ValueError, match="num_steps"):
        DiT4SRPipeline.from_pretrained(tmp_path / "model")


def test_bundled_name_resolves_to_the_package_model():
    assert BUNDLED_MODEL == dit4sr.BUNDLED_MODEL and BUNDLED_MODEL.endswith("bundled/dit4sr-tiny")
    if not (os.path.isfile(f"{BUNDLED_MODEL}/model_index.json")):
        with pytest.raises(FileNotFoundError, match="bundled/dit4sr-tiny"):
            DiT4SRPipeline.from_pretrained("bundled")
    else:
        pipe = DiT4SRPipeline.from_pretrained("bundled")
        out = pipe((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8), show_progress=False,
                   output_type="np").images[0]
        assert out.shape == (64, 64, 3)
