"""Config validation, overrides, the fingerprint, safe keys, globbing and the output-inside-input guard."""

from __future__ import annotations

import re

import pytest
from support.catalog import REPO, job_config

from pipeline.config import ConfigError, load_config, validate_config
from pipeline.preflight import check_output_outside_input, locations
from pipeline.spec import InputSpec, RunSpec, VideoSettings
from pipeline.storage import Location, UnsafeKeyError, check_relative_key


def test_embedded_default_config_is_valid():
    cfg = load_config(REPO / "configs/local.yaml")
    assert cfg.model.path == "bundled" and cfg.input.example_catalog and cfg.compute.gpus_per_actor == 0
    assert load_config(REPO / "configs/s3_catalog.yaml").compute.gpus_per_actor == 1


def test_unknown_key_and_wrong_type_are_named(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {uri: a, includ: ['*']}\noutput: {uri: b}\nupscale: {steps: many}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "input.includ: unknown key" in message
    assert "upscale.steps" in message and "'many'" in message


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(REPO / "configs/local.yaml", ["upscale.steps=7", "compute.actors.max=3", "output.format=jpeg",
                                             "input.exclude=['raw/**']"])
    assert (cfg.upscale.steps, cfg.compute.actors.max, cfg.output.format) == (7, 3, "jpeg")
    assert cfg.input.exclude == ["raw/**"]
    with pytest.raises(ConfigError, match="key=value"):
        load_config(REPO / "configs/local.yaml", ["upscale.steps"])
    with pytest.raises(ConfigError, match="output.format"):
        load_config(REPO / "configs/local.yaml", ["output.format=bmpx"])
    with pytest.raises(ConfigError, match="compute.actors"):
        load_config(REPO / "configs/local.yaml", ["compute.actors.min=4"])


def _fingerprint(**sections) -> str:
    return RunSpec.resolve(validate_config(job_config("in", "out", **sections)), "r").fingerprint


def test_fingerprint_tracks_output_settings_only():
    base = _fingerprint()
    assert base == _fingerprint(compute={"actors": {"min": 2, "max": 8}, "batch_size": 16, "gpus_per_actor": 1})
    assert base == _fingerprint(run={"progress_interval_s": 99})
    assert base != _fingerprint(upscale={"scale": 3})
    assert base != _fingerprint(output={"format": "jpeg"})
    assert _fingerprint(output={"format": "jpeg", "quality": 80}) != _fingerprint(output={"format": "jpeg"})
    # the model's identity and the seed count for engines that use them
    plugin = {"path": "support.engines:slow"}
    assert _fingerprint(model=plugin) != base
    assert _fingerprint(model=plugin, upscale={"seed": 1}) != _fingerprint(model=plugin)


def test_bicubic_engine_rejects_a_prompt():
    with pytest.raises(ConfigError, match="prompt"):
        _fingerprint(upscale={"prompt": "a cat"})


@pytest.mark.parametrize("key", ["../x.png", "a/../../x.png", "/abs.png", "a//b.png", "a/./b.png", "a\\b.png"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(UnsafeKeyError):
        check_relative_key(key)


def test_safe_keys_pass():
    for key in ["a.png", "dir/sub/ünïcode name.jpg", "a..b.png", ".hidden/x.png"]:
        assert check_relative_key(key) == key


def test_listing_applies_include_and_exclude(tmp_path):
    for key in ["a.png", "b.jpg", "raw/c.png", "raw/deep/d.png", "notes.txt"]:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x" * 3)
    location = Location(str(tmp_path), {})
    keys = [e.relative for e in location.list(include=["**/*.png", "*.jpg"], exclude=["raw/deep/**"])]
    assert keys == ["a.png", "b.jpg", "raw/c.png"]
    assert all(e.size == 3 and e.identity for e in location.list())


def test_globs_ignore_case_unless_told_otherwise(tmp_path):
    """Cameras write IMG_0001.JPG, scanners .TIF: the production template's lower-case globs take every spelling."""
    names = ["a.jpg", "b.JPG", "c.JPEG", "d.Jpeg", "e.PNG", "f.TIF", "g.TIFF", "h.WEBP", "i.HEIC", "j.heif", "k.txt",
             "raw/.hidden.JPG"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    s3_template = load_config(REPO / "configs/s3_catalog.yaml").input
    assert s3_template.case_sensitive is False
    location = Location(str(tmp_path), {})
    listed = [e.relative for e in location.list(s3_template.include, s3_template.exclude, case_sensitive=False)]
    assert listed == [name for name in names if not name.endswith((".txt", ".JPG")) or name == "b.JPG"]
    exact = [e.relative for e in location.list(s3_template.include, s3_template.exclude, case_sensitive=True)]
    assert exact == ["a.jpg", "j.heif"]
    assert validate_config(job_config("in", "out")).input.case_sensitive is False  # the default


def test_the_example_catalog_belongs_to_the_configs_own_folder(tmp_path):
    default = REPO / "configs/local.yaml"
    assert load_config(default).input.example_catalog is True
    assert load_config(default, ["upscale.steps=4"]).input.example_catalog is True
    assert load_config(default, ["input.uri=./data/catalog"]).input.example_catalog is True  # the same folder
    assert load_config(default, [f"input.uri={tmp_path}/my-photoz"]).input.example_catalog is False
    asked = load_config(default, [f"input.uri={tmp_path}/demo", "input.example_catalog=videos"])
    assert asked.input.example_catalog == "videos"


def test_output_inside_input_is_refused_unless_excluded(tmp_path):
    inside = validate_config(job_config(str(tmp_path), str(tmp_path / "upscaled")))
    with pytest.raises(ConfigError, match="inside input.uri"):
        check_output_outside_input(InputSpec.of(inside.input), locations(inside)[1])
    same = validate_config(job_config(str(tmp_path), str(tmp_path)))
    with pytest.raises(ConfigError, match="inside input.uri"):
        check_output_outside_input(InputSpec.of(same.input), locations(same)[1])
    excluded = validate_config(job_config(str(tmp_path), str(tmp_path / "upscaled"),
                                          input={"exclude": ["upscaled/**"]}))
    check_output_outside_input(InputSpec.of(excluded.input), locations(excluded)[1])
    sibling = validate_config(job_config(str(tmp_path / "in"), str(tmp_path / "in-upscaled")))
    check_output_outside_input(InputSpec.of(sibling.input), locations(sibling)[1])


def test_output_keys_follow_the_format_and_collisions_are_rejected(tmp_path):
    from pipeline.plan import make_plan
    from pipeline.spec import RunSpec

    for key in ["a.png", "a.jpg", "b.JPG", "c.heic", "noext"]:
        (tmp_path / "in" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / key).write_bytes(b"x")
    cfg = validate_config(job_config(str(tmp_path / "in"), str(tmp_path / "out")))
    plan = make_plan(RunSpec.resolve(cfg, "r"))
    assert {row["source_key"]: row["output_key"] for row in plan.todo} == {
        "a.jpg": "a.png", "b.JPG": "b.png", "c.heic": "c.png", "noext": "noext.png"}
    [collision] = plan.rejected  # a.png would overwrite a.jpg's output (sorted first, so a.jpg keeps it)
    assert (collision["source_key"], collision["error_type"]) == ("a.png", "output_collision")
    assert "a.jpg" in collision["error_message"]

    same = validate_config(job_config(str(tmp_path / "in"), str(tmp_path / "out"), output={"format": "same"}))
    plan = make_plan(RunSpec.resolve(same, "r"))
    assert {row["source_key"]: row["output_key"] for row in plan.todo} == {
        "a.png": "a.png", "a.jpg": "a.jpg", "b.JPG": "b.JPG", "c.heic": "c.heic", "noext": "noext"}


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    from botocore.exceptions import ClientError

    from pipeline.storage import with_retries

    def flaky(errors: list[BaseException]):
        calls = []

        def operation():
            calls.append(1)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return "done"
        return operation, calls

    throttled = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    wrapped = OSError("S3 said no")
    wrapped.__cause__ = ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}},
                                    "GetObject")
    operation, calls = flaky([ConnectionResetError("reset by peer"), throttled, wrapped, TimeoutError()])
    assert with_retries(operation, base_delay=0.001) == "done" and len(calls) == 5

    for permanent in (FileNotFoundError("gone"), PermissionError("denied"),
                      ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                                  "GetObject")):
        operation, calls = flaky([permanent])
        with pytest.raises(type(permanent)):
            with_retries(operation, base_delay=0.001)
        assert len(calls) == 1

    operation, calls = flaky([ConnectionResetError()] * 10)
    with pytest.raises(ConnectionResetError):
        with_retries(operation, attempts=3, base_delay=0.001)
    assert len(calls) == 3


def test_video_section_is_validated_like_every_other():
    base = {"input": {"uri": "in"}, "output": {"uri": "out"}}
    for video, message in [({"preset": "fastest"}, "preset 'fastest'"), ({"codec": "vp9"}, "video.codec"),
                           ({"noise": "random"}, "video.noise"), ({"segment_seconds": 0}, "video.segment_seconds"),
                           ({"crf": 60}, "video.crf"), ({"segmnt_seconds": 2}, "video.segmnt_seconds: unknown key"),
                           ({"deinterlace": "yes"}, "video.deinterlace"),
                           ({"deinterlace_rate": "double"}, "video.deinterlace_rate"),
                           ({"pix_fmt": "yuv420p12le"}, "cannot be written by libx264"),  # auto may pick H.264
                           ({"encoder_options": {"tune": ["grain"]}}, "video.encoder_options")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_config({**base, "video": video})
    assert validate_config({**base, "video": {"codec": "h265", "preset": "slow"}}).video.codec == "h265"
    video = validate_config({**base, "video": {"codec": "prores", "deinterlace": "off",
                                               "encoder_options": {"g": 48, "tune": "grain"}}}).video
    assert video.encoding().encoder_options == (("g", "48"), ("tune", "grain"))
    assert validate_config(base).video.codec == "auto" and validate_config(base).video.deinterlace == "auto"
    assert validate_config(base).video.deinterlace_rate == "frame"
    assert validate_config({**base, "video": {"deinterlace_rate": "field"}}).video.deinterlace_rate == "field"


def test_video_settings_enter_the_fingerprint_and_reach_workers_typed():
    base = {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "bicubic"}}
    specs = {name: RunSpec.resolve(validate_config({**base, "video": video}), "run")
             for name, video in [("default", {}), ("deinterlace", {"deinterlace": "off"}),
                                 ("field_rate", {"deinterlace_rate": "field"}),
                                 ("options", {"encoder_options": {"tune": "grain"}}), ("codec", {"codec": "h264"}),
                                 ("frames_per_call", {"frames_per_call": 8})]}
    video_fingerprints = {name: spec.unit_fingerprint("video", "image") for name, spec in specs.items()}
    assert len({video_fingerprints[n] for n in ("default", "deinterlace", "field_rate", "options", "codec")}) == 5
    assert specs["field_rate"].video.deinterlace_rate == "field"
    assert video_fingerprints["frames_per_call"] == video_fingerprints["default"]  # batching changes no bytes
    assert isinstance(specs["options"].video, VideoSettings)
    assert specs["options"].video.encoding.encoder_options == (("tune", "grain"),)
