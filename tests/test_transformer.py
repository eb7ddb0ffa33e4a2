"""DiT4SR transformer: parity with the official implementation, loading, fusion and input checks."""

import json
import logging

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from dit4sr import DiT4SRTransformer2DModel

RELEASES = ("r1", "v1")


def golden(golden_dir, release):
    config = json.loads((golden_dir / f"tiny_{release}.json").read_text())["config"]
    weights = load_file(golden_dir / f"tiny_{release}.weights.safetensors")
    io = load_file(golden_dir / f"tiny_{release}.io.safetensors")
    return config, weights, io


def model_for(golden_dir, release, model_release=None):
    config, weights, _ = golden(golden_dir, release)
    model = DiT4SRTransformer2DModel(**config, release=model_release or release)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def run(model, io, **overrides):
    names = ("hidden_states", "lr_latents", "encoder_hidden_states", "pooled_projections", "timestep")
    inputs = {k: io[k] for k in names}
    inputs.update(overrides)
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("release", RELEASES)
def test_matches_official_outputs(golden_dir, release):
    _, _, io = golden(golden_dir, release)
    sample = run(model_for(golden_dir, release), io)
    assert sample.shape == io["expected_sample"].shape
    assert (sample - io["expected_sample"]).abs().max().item() < 1e-5


def test_releases_differ(golden_dir):
    _, _, io = golden(golden_dir, "v1")
    as_v1 = run(model_for(golden_dir, "v1"), io)
    as_r1 = run(model_for(golden_dir, "v1", model_release="r1"), io)
    assert (as_v1 - as_r1).abs().max().item() > 1e-3


def test_return_tuple(golden_dir):
    _, _, io = golden(golden_dir, "r1")
    model = model_for(golden_dir, "r1")
    with torch.no_grad():
        (sample,) = model(io["hidden_states"], io["lr_latents"], io["encoder_hidden_states"],
                          io["pooled_projections"], io["timestep"], return_dict=False)
    torch.testing.assert_close(sample, run(model, io))


def test_non_square_grid_and_batch_independence(golden_dir):
    model = model_for(golden_dir, "r1")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, 6, 10, generator=generator)
    lr = torch.randn(3, 4, 6, 10, generator=generator)
    text = torch.randn(3, 5, 16, generator=generator)
    pooled = torch.randn(3, 12, generator=generator)
    timestep = torch.tensor([999.0, 500.0, 10.0])
    with torch.no_grad():
        batched = model(hidden, lr, text, pooled, timestep).sample
        singles = [model(hidden[i:i + 1], lr[i:i + 1], text[i:i + 1], pooled[i:i + 1], timestep[i:i + 1]).sample
                   for i in range(3)]
    assert batched.shape == (3, 4, 6, 10)
    assert torch.isfinite(batched).all()
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], singles[i], atol=1e-5, rtol=0)

    # Changing one batch element's inputs leaves the others untouched.
    hidden2 = hidden.clone()
    hidden2[1] += 1.0
    with torch.no_grad():
        perturbed = model(hidden2, lr, text, pooled, timestep).sample
    torch.testing.assert_close(perturbed[[0, 2]], batched[[0, 2]], atol=1e-5, rtol=0)
    assert (perturbed[1] - batched[1]).abs().max() > 1e-3


def test_non_square_grid_keeps_height_and_width(golden_dir):
    """Height and width are not swapped or flattened: a transposed input is a different image."""
    model = model_for(golden_dir, "r1")
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, 6, 10, generator=generator)
    lr = torch.randn(1, 4, 6, 10, generator=generator)
    args = (torch.randn(1, 5, 16, generator=generator), torch.randn(1, 12, generator=generator), torch.tensor([300.0]))
    with torch.no_grad():
        wide = model(hidden, lr, *args).sample
        tall = model(hidden.transpose(-1, -2), lr.transpose(-1, -2), *args).sample
    assert tall.shape == (1, 4, 10, 6)
    assert (wide - tall.transpose(-1, -2)).abs().max() > 1e-4  # positions differ, so outputs do


@pytest.mark.parametrize("release", RELEASES)
def test_fused_control_projections_match(golden_dir, release):
    _, _, io = golden(golden_dir, release)
    model = model_for(golden_dir, release)
    reference = run(model, io)
    keys_before = set(model.state_dict())
    model.fuse_control_projections()
    assert set(model.state_dict()) == keys_before
    assert (run(model, io) - reference).abs().max().item() <= 1e-5
    model.unfuse_control_projections()
    torch.testing.assert_close(run(model, io), reference, atol=0, rtol=0)


def test_bad_shapes_raise_value_errors(golden_dir):
    _, _, io = golden(golden_dir, "r1")
    model = model_for(golden_dir, "r1")
    with pytest.raises(ValueError, match=r"lr_latents shape \(2, 4, 8, 6\)"):
        run(model, io, lr_latents=io["lr_latents"][..., :6])
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        odd = torch.randn(2, 4, 7, 8)
        run(model, io, hidden_states=odd, lr_latents=odd)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(2, tokens, 16\), got \(2, 7, 15\)"):
        run(model, io, encoder_hidden_states=io["encoder_hidden_states"][..., :15])
    with pytest.raises(ValueError, match="pooled_projections"):
        run(model, io, pooled_projections=io["pooled_projections"][:1])


def test_strict_load_names_bad_keys(golden_dir):
    model = model_for(golden_dir, "r1")
    state = dict(model.state_dict())
    state.pop("proj_out.bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['proj_out.bias'\], unexpected keys \['extra.weight'\]"):
        model.load_checked_state_dict(state)


def write_official_layout(root, config, weights):
    """The released layout: config without a release key, base weights fp16, control weights fp32."""
    folder = root / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **config}))
    mixed = {k: (v if "control" in k else v.half()).contiguous() for k, v in weights.items()}
    save_file(mixed, folder / "diffusion_pytorch_model.safetensors")
    return mixed


@pytest.mark.parametrize("release", RELEASES)
def test_from_pretrained_official_layout_detects_release(golden_dir, tmp_path, caplog, release):
    config, weights, io = golden(golden_dir, release)
    if release == "v1":  # the released v1 checkpoints never trained to_k_control
        weights = {k: (torch.zeros_like(v) if "to_k_control" in k else v) for k, v in weights.items()}
    mixed = write_official_layout(tmp_path, config, weights)
    assert {v.dtype for v in mixed.values()} == {torch.float16, torch.float32}

    with caplog.at_level(logging.INFO, logger="dit4sr"):
        model = DiT4SRTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=torch.float32)
    assert model.config.release == release
    assert f"release {release!r} chosen" in caplog.text
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Same numbers as loading the fp16-rounded weights by hand.
    reference = DiT4SRTransformer2DModel(**config, release=release)
    reference.load_state_dict({k: v.float() for k, v in mixed.items()})
    torch.testing.assert_close(run(model, io), run(reference.eval(), io), atol=0, rtol=0)

    half = DiT4SRTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_from_pretrained_explicit_release_and_fsspec_url(golden_dir, tmp_path, monkeypatch):
    config, weights, io = golden(golden_dir, "r1")
    write_official_layout(tmp_path, config, weights)
    monkeypatch.setenv("DIT4SR_CACHE", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        memory.pipe(f"/models/dit4sr/transformer/{name}", (tmp_path / "transformer" / name).read_bytes())
    model = DiT4SRTransformer2DModel.from_pretrained("memory://models/dit4sr", subfolder="transformer", release="v1")
    assert model.config.release == "v1"
    assert (tmp_path / "cache").is_dir()


def test_from_pretrained_refuses_pickles(golden_dir, tmp_path):
    config, weights, _ = golden(golden_dir, "r1")
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(weights, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled files never are"):
        DiT4SRTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")


def test_from_pretrained_refuses_mismatched_checkpoint(golden_dir, tmp_path):
    config, weights, _ = golden(golden_dir, "r1")
    weights = {k: v for k, v in weights.items() if not k.startswith("proj_out")}
    write_official_layout(tmp_path, config, weights)
    with pytest.raises(ValueError, match=r"missing keys \['proj_out.bias', 'proj_out.weight'\]"):
        DiT4SRTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")


def test_save_pretrained_round_trip(golden_dir, tmp_path):
    _, _, io = golden(golden_dir, "v1")
    model = model_for(golden_dir, "v1")
    model.save_pretrained(tmp_path / "saved")
    loaded = DiT4SRTransformer2DModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.release == "v1"
    torch.testing.assert_close(run(loaded, io), run(model, io), atol=0, rtol=0)
