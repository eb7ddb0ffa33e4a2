"""The run spec (pipeline.spec): its fingerprints are those of the settings dicts before it was typed, it is
immutable, and it travels to Ray workers small and whole."""

import dataclasses
import pathlib
import pickle

import pytest

from pipeline.config import load_config
from pipeline.spec import RunSpec

REPO = pathlib.Path(__file__).resolve().parents[2]

# Computed on main before the spec became typed records (commit dcd9506), from the settings dict it hashed then.
# They must never change by accident: every catalog's rows carry them, and a change re-runs every user's catalog.
# The bundled model's files are part of its identity, so replacing the bundled model changes them too (on purpose).
PINNED = {
    ("local.yaml", ()): ("d46b5c4a502a23c9", "c95e8d499e16a143",
                         {"video": "a00e95009e0fe061", "sequence": "91c05c286daca038"}),
    ("video.yaml", ()): ("d46b5c4a502a23c9", "c95e8d499e16a143",
                         {"video": "bfa9f57d2fe61bba", "sequence": "91c05c286daca038"}),
    ("video.yaml", ("video.sequence_fps=24", "video.deinterlace_rate=field", "compute.compile=on",
                    "upscale.steps=3")): ("1d4074f4a5304384", "9fb22b13866427cc",
                                          {"video": "b068aa9735426e0a", "sequence": "cc43bd16ed21640f",
                                           "sequence_frames": "5910f0229310e479"}),
    ("local.yaml", ("model.path=bicubic", "output.format=jpeg")): ("f1cdb99d5eedb869", None,
                                                                     {"video": "01ded9ffb6483d3d",
                                                                      "sequence": "9944cbed3ab8e768"}),
    ("local.yaml", ("model.path=support.engines:slow", "output.format=webp", "upscale.prompt=a cat")): (
        "1428dc3afc4cd2fa", "1428dc3afc4cd2fa", {"video": "03309bf508dd50bd", "sequence": "0cbc2f9f28b9d06c"}),
}


@pytest.mark.parametrize(("config", "overrides"), list(PINNED))
def test_fingerprints_are_those_of_before_the_typed_spec(config, overrides):
    spec = RunSpec.resolve(load_config(REPO / "configs" / config, list(overrides)), "run")
    settings, with_prompt, units = PINNED[config, overrides]
    assert spec.fingerprint == settings
    assert spec.unit_fingerprint("image", spec.fingerprint) == settings
    assert (spec.image_fingerprint("a cat") if spec.takes_prompts else None) == with_prompt
    for unit, expected in units.items():
        assert spec.unit_fingerprint(unit, spec.fingerprint) == expected
    assert spec.unit_fingerprint("segment", spec.fingerprint) == units["video"]


def test_the_spec_is_immutable_typed_and_travels_whole():
    spec = RunSpec.resolve(load_config(REPO / "configs/video.yaml"), "run")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.scale = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sampler.num_inference_steps = 1
    assert (spec.sampler.num_inference_steps, spec.geometry.patch_size, spec.video.segment_seconds,
            spec.video.sequence_folders, spec.limits.max_video_seconds) == (
        spec.fingerprint_fields()["num_inference_steps"], spec.fingerprint_fields()["patch_size"], 1.0,
        ("reels/*",), 7200)
    data = pickle.dumps(spec)
    assert len(data) < 4_000  # one copy per Ray task and actor (about 1 KB)
    travelled = pickle.loads(data)
    assert travelled == spec and travelled.fingerprint == spec.fingerprint
