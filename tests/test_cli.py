import pathlib
import re
import shutil
import subprocess
import sys

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from support import missing

from dit4sr.cli import main, should_compile


def _image(path, size=(20, 16), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    _image(folder / "a.png", seed=1)
    _image(folder / "nested" / "b.jpg", size=(12, 12), seed=2)
    _image(folder / "gray.png", size=(8, 10), seed=3, mode="L")
    return folder


def _partials(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".partial"]


def test_directory_input_writes_x4_pngs_mirroring_the_tree(tmp_path, inputs, tiny_model_root, capsys):
    out = tmp_path / "out"
    assert main([str(inputs), "-o", str(out), "--model", str(tiny_model_root), "--device", "cpu"]) == 0
    assert Image.open(out / "a.png").size == (80, 64)
    assert Image.open(out / "nested" / "b.png").size == (48, 48)
    assert Image.open(out / "gray.png").mode == "RGB"
    assert not _partials(out)
    assert "3 written" in capsys.readouterr().err


def test_bad_inputs_fail_alone_with_one_line_each(tmp_path, inputs, tiny_model_root, capsys):
    (inputs / "not_an_image.png").write_text("hello")
    good = (inputs / "a.png").read_bytes()
    (inputs / "truncated.png").write_bytes(good[: len(good) // 2])
    big = _image(tmp_path / "big.png", size=(64, 64))
    out = tmp_path / "out"
    code = main([str(inputs), str(big), str(tmp_path / "missing.png"), "-o", str(out),
                 "--model", str(tiny_model_root), "--device", "cpu", "--max-pixels", "1000", "--quiet"])
    assert code == 3  # some inputs failed, the others were done
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dit4sr-upscale: failed ")]
    reasons = {line.split("failed ")[1].split(":")[0]: line for line in failed}
    assert set(reasons) == {str(inputs / "not_an_image.png"), str(inputs / "truncated.png"), str(big),
                            str(tmp_path / "missing.png")}
    assert "not a recognised image" in reasons[str(inputs / "not_an_image.png")]
    assert "truncated" in reasons[str(inputs / "truncated.png")]
    assert "--max-pixels 1000" in reasons[str(big)]
    assert "no such file" in reasons[str(tmp_path / "missing.png")]
    # The good inputs were still written, and nothing else.
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.png", "gray.png", "nested/b.png"]


def test_same_seed_gives_same_bytes_and_fsspec_urls_work(tmp_path, inputs, tiny_model_root):
    memory = fsspec.filesystem("memory")
    memory.pipe("/cli-test/photos/a.png", (inputs / "a.png").read_bytes())
    args = ["--model", str(tiny_model_root), "--device", "cpu", "--seed", "7", "--quiet"]
    assert main(["memory://cli-test/photos/", "-o", str(tmp_path / "one"), *args]) == 0
    assert main([str(inputs / "a.png"), "-o", str(tmp_path / "two"), *args]) == 0
    assert (tmp_path / "one" / "a.png").read_bytes() == (tmp_path / "two" / "a.png").read_bytes()


def test_duplicate_output_names_fail_the_later_input(tmp_path, inputs, tiny_model_root, capsys):
    other = _image(tmp_path / "elsewhere" / "a.png", seed=9)
    code = main([str(inputs / "a.png"), str(other), "-o", str(tmp_path / "out"), "--model", str(tiny_model_root),
                 "--device", "cpu", "--quiet"])
    assert code == 3
    assert "already taken" in capsys.readouterr().err


def test_a_failed_write_leaves_no_partial_file(tmp_path, inputs, tiny_model_root):
    out = tmp_path / "out"
    (out / "a.png").mkdir(parents=True)  # the final name is taken by a directory: the rename must fail
    code = main([str(inputs / "a.png"), "-o", str(out), "--model", str(tiny_model_root), "--device", "cpu",
                 "--quiet"])
    assert code == 3
    assert not _partials(out) and (out / "a.png").is_dir()


def test_unloadable_model_or_nothing_to_do_exits_1_with_one_error_line(tmp_path, inputs, capsys):
    assert main([str(inputs / "a.png"), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "nope")]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dit4sr-upscale: error: cannot load model {tmp_path / 'nope'}: ")
    assert main([str(tmp_path / "missing.png"), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"dit4sr-upscale: failed {tmp_path / 'missing.png'}: no such file or directory",
        "dit4sr-upscale: error: nothing to upscale: no input names an image or video"]
    with pytest.raises(SystemExit) as usage:  # a bad command line: argparse's code
        main([str(inputs / "a.png"), "-o", str(tmp_path / "out"), "--max-pixels", "0"])
    assert usage.value.code == 2
    assert "dit4sr-upscale: error: --max-pixels must be positive" in capsys.readouterr().err


def test_console_script_end_to_end(tmp_path, inputs, tiny_model_root):
    script = shutil.which("dit4sr-upscale") or missing("the dit4sr-upscale console script on PATH (activate the venv)")
    result = subprocess.run([script, str(inputs / "a.png"), "-o", str(tmp_path / "out"), "--model",
                             str(tiny_model_root), "--steps", "1", "--tile-size", "16", "--tile-overlap", "4",
                             "--color-fix", "none", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "out" / "a.png").size == (80, 64)


def test_video_input_keeps_container_frames_and_audio(tmp_path, capsys):
    import av
    from support import video_clips

    (tmp_path / "in").mkdir()
    source = video_clips.write_clip(tmp_path / "in" / "clip.mp4", frames=6, size=(16, 12), audio=True,
                                    content="static")
    assert main([str(source), str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quiet"]) == 3  # dup name
    output = tmp_path / "out" / "clip.mp4"

    def facts(path):
        with av.open(str(path)) as container:
            audio = [bytes(p) for p in container.demux(audio=0) if p.size]
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return audio, frames

    audio, frames = facts(output)
    source_audio, source_frames = facts(source)
    assert audio == source_audio and len(frames) == len(source_frames) == 6
    assert frames[0].shape == (48, 64, 3)
    # a static clip with one noise field: every output frame is the same picture (up to the codec's rounding)
    assert max(np.abs(f.astype(int) - frames[0].astype(int)).mean() for f in frames) < 1.0
    assert not _partials(tmp_path / "out")


@pytest.mark.parametrize("choice, device, compiled", [
    ("auto", "cuda", True), ("auto", "cpu", False), ("on", "cpu", True), ("off", "cuda", False)])
def test_compile_is_on_by_default_where_the_pipeline_runs_on_cuda(choice, device, compiled):
    assert should_compile(choice, torch.device(device)) is compiled


@pytest.mark.slow  # inductor builds C++ kernels: about a minute on two shared cores
def test_the_compile_flag_decides_whether_the_transformer_is_compiled(tmp_path, inputs, tiny_model_root):
    """On the CPU ``auto`` means eager, so only ``--compile on`` shows that the flag reaches the pipeline: dynamo
    captures the transformer's blocks then, one graph per block kind (plain, last; never with ``off``),
    inductor compiles them, and the output stays the eager one up to rounding. (The only inductor compile of the
    suite: test_compile counts graphs with dynamo's eager backend.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        for choice in ("off", "on"):
            assert main([str(inputs / "a.png"), "-o", str(tmp_path / choice), "--model", str(tiny_model_root),
                         "--compile", choice, "--quiet"]) == 0
            graphs = counters["stats"]["unique_graphs"]
            assert graphs == (0 if choice == "off" else 2)
    finally:
        torch._dynamo.reset()
    eager, compiled = (np.asarray(Image.open(tmp_path / choice / "a.png"), dtype=int) for choice in ("off", "on"))
    assert eager.shape == (64, 80, 3) and np.abs(compiled - eager).max() <= 1


JOB = pathlib.Path(__file__).resolve().parents[1] / "jobs" / "upscale_catalog.py"


@pytest.mark.parametrize("command", [
    pytest.param(["-m", "dit4sr.cli"], id="dit4sr-upscale"),
    pytest.param(["-m", "dit4sr.train"], id="dit4sr-train"),
    pytest.param([str(JOB)], id="upscale_catalog"),
])
def test_help_is_plain_text_names_the_exit_codes_and_imports_no_torch(command):
    """--help answers at once: no torch, diffusers or Ray behind it (python -X importtime lists every import); plain
    text, no reST markup; every option explained; the exit codes stated."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("usage: ") and "exit codes: 0 " in " ".join(text.split()).lower()
    assert "``" not in text and ":class:" not in text
    lines = text.splitlines()
    unexplained = [line for number, line in enumerate(lines) if line.startswith("  -")
                   and not re.search(r"\S {2,}\S", line.strip())  # the help beside it, or on the next line:
                   and not re.match(r"^ {8,}[^ -]", (lines + [""])[number + 1])]
    assert unexplained == [], text
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert not {"torch", "diffusers", "ray"} & imported
