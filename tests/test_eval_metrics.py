import math

import numpy as np
import pytest
from PIL import Image

from dit4sr.eval import (
    degrade_lr,
    evaluate,
    gradient_energy,
    laplacian_variance,
    list_hr_images,
    main,
    psnr_y,
    ssim_y,
    y_channel,
)

# BT.601 luma weights of MATLAB rgb2ycbcr on the 0..255 scale: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255.
LUMA_GAIN = (65.481 + 128.553 + 24.966) / 255.0


def _textured(height=40, width=48, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(30, 220, (height, width, 3), dtype=np.uint8)


def test_y_channel_matches_matlab_rgb2ycbcr():
    black, white = np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8)
    assert y_channel(black)[0, 0] == pytest.approx(16.0)
    assert y_channel(white)[0, 0] == pytest.approx(235.0)
    red = np.array([[[255, 0, 0]]], np.uint8)
    assert y_channel(red)[0, 0] == pytest.approx(16 + 65.481)


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    image = _textured()
    assert psnr_y(image, image.copy()) == math.inf
    assert ssim_y(image, image.copy()) == pytest.approx(1.0)


def test_constant_offset_gives_the_known_psnr_and_ssim():
    a = np.full((32, 32, 3), 100, np.uint8)
    b = a + np.uint8(10)
    dy = 10 * LUMA_GAIN
    assert psnr_y(a, b) == pytest.approx(20 * math.log10(255 / dy), abs=1e-9)
    # Flat images: only SSIM's luminance term differs from 1.
    ya, yb = 16 + 100 * LUMA_GAIN, 16 + 110 * LUMA_GAIN
    c1 = (0.01 * 255) ** 2
    assert ssim_y(a, b) == pytest.approx((2 * ya * yb + c1) / (ya**2 + yb**2 + c1), abs=1e-9)


def test_border_is_excluded():
    a = _textured()
    b = a.copy()
    b[:4] = 0
    b[:, -4:] = 255
    assert psnr_y(a, b, border=4) == math.inf
    assert psnr_y(a, b, border=0) < 20


def test_noise_level_orders_psnr_and_ssim():
    rng = np.random.default_rng(1)
    clean = _textured(seed=2)
    mild = np.clip(clean + rng.normal(0, 3, clean.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(clean + rng.normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    assert psnr_y(mild, clean) > psnr_y(heavy, clean) + 10
    assert 1 > ssim_y(mild, clean) > ssim_y(heavy, clean)


def test_sharpness_statistics():
    flat = np.full((32, 32, 3), 128, np.uint8)
    assert laplacian_variance(flat) == 0 and gradient_energy(flat) == 0
    sharp = _textured(64, 64)
    blurred = np.asarray(Image.fromarray(sharp).resize((16, 16), Image.BICUBIC).resize((64, 64), Image.BICUBIC))
    assert laplacian_variance(sharp) > 5 * laplacian_variance(blurred)
    assert gradient_energy(sharp) > gradient_energy(blurred)


def test_mismatched_or_tiny_images_are_rejected():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_y(_textured(40, 48), _textured(40, 44))
    with pytest.raises(ValueError, match="too small"):
        psnr_y(_textured(8, 8), _textured(8, 8))
    with pytest.raises(ValueError, match="uint8"):
        y_channel(np.zeros((8, 8, 3), np.float32))


def _hr_folder(tmp_path):
    (tmp_path / "hr" / "set").mkdir(parents=True)
    for i, size in enumerate([(50, 42), (64, 48)]):  # 50x42 is cropped to 48x40
        Image.fromarray(_textured(size[1], size[0], seed=i)).resize(size).save(tmp_path / "hr" / "set" / f"{i}.png")
    return tmp_path / "hr"


def test_list_file_selects_and_checks_images(tmp_path):
    hr = _hr_folder(tmp_path)
    assert [p.name for p in list_hr_images(str(hr))] == ["0.png", "1.png"]
    listing = tmp_path / "list.txt"
    listing.write_text("# held out\nset/1.png\n")
    assert [p.name for p in list_hr_images(str(hr), str(listing))] == ["1.png"]
    listing.write_text("set/missing.png\n")
    with pytest.raises(FileNotFoundError, match="missing"):
        list_hr_images(str(hr), str(listing))


def test_zero_residual_model_scores_like_bicubic(tmp_path, tiny_model_root):
    """The tiny model's output layer is zero, so its one-step result is the bicubic input itself: the eval
    must report (almost) the bicubic numbers for it — the pipeline upsamples in float, bicubic in 8 bits."""
    from dit4sr.pipeline_dit4sr import DiT4SRPipeline

    hr = _hr_folder(tmp_path)
    pipe = DiT4SRPipeline.from_pretrained(str(tiny_model_root), device="cpu")
    result = evaluate(pipe, list_hr_images(str(hr)), str(hr), show_progress=False)
    mean = result["mean"]
    assert result["images"] == 2
    assert mean["model"]["psnr"] == pytest.approx(mean["bicubic"]["psnr"], abs=0.1)
    assert mean["model"]["ssim"] == pytest.approx(mean["bicubic"]["ssim"], abs=0.005)
    assert mean["hr"]["laplacian_var"] > mean["bicubic"]["laplacian_var"]


def test_eval_command_prints_table_and_writes_json(tmp_path, tiny_model_root, capsys):
    hr = _hr_folder(tmp_path)
    out = tmp_path / "scores.json"
    assert main(["--model", str(tiny_model_root), "--hr-dir", str(hr), "--device", "cpu", "--json", str(out),
                 "--save-dir", str(tmp_path / "sr")]) == 0
    printed = capsys.readouterr().out
    assert "bicubic" in printed and "model - bicubic" in printed
    import json

    scores = json.loads(out.read_text())
    assert scores["images"] == 2 and len(scores["per_image"]["model"]) == 2
    assert Image.open(tmp_path / "sr" / "set" / "0.png").size == (48, 40)


def test_lr_degradation_is_seeded_jpeg_and_noise():
    lr = Image.fromarray(_textured(32, 32, 4))
    assert degrade_lr(lr, None) is lr and degrade_lr(lr, "") is lr
    noisy = np.asarray(degrade_lr(lr, "noise:10", "a.png"), dtype=np.float64)
    assert np.array_equal(noisy, np.asarray(degrade_lr(lr, "noise:10", "a.png")))
    assert not np.array_equal(noisy, np.asarray(degrade_lr(lr, "noise:10", "b.png")))
    # Clipping at 30..220 does not occur for sigma 10: the residual's spread is the sigma.
    assert np.std(noisy - np.asarray(lr, dtype=np.float64)) == pytest.approx(10, rel=0.1)
    buffer = __import__("io").BytesIO()
    lr.save(buffer, format="JPEG", quality=30)
    assert np.array_equal(np.asarray(degrade_lr(lr, "jpeg:30")), np.asarray(Image.open(buffer).convert("RGB")))
    chained = degrade_lr(lr, "noise:10+jpeg:30", "a.png")
    assert chained.size == lr.size and chained.mode == "RGB"
    for bad in ("blur:3", "jpeg:0", "noise:x"):
        with pytest.raises(ValueError, match="LR degradation"):
            degrade_lr(lr, bad)


def test_eval_with_degraded_lr_scores_lower_and_rejects_bad_specs(tmp_path, tiny_model_root, capsys):
    from dit4sr.pipeline_dit4sr import DiT4SRPipeline

    hr = _hr_folder(tmp_path)
    pipe = DiT4SRPipeline.from_pretrained(str(tiny_model_root), device="cpu")
    clean = evaluate(pipe, list_hr_images(str(hr)), str(hr), show_progress=False)
    degraded = evaluate(pipe, list_hr_images(str(hr)), str(hr), show_progress=False, lr_degradation="noise:20")
    assert degraded["mean"]["bicubic"]["psnr"] < clean["mean"]["bicubic"]["psnr"] - 0.2
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_model_root), "--hr-dir", str(hr), "--lr-degradation", "blur:2"])
    assert "LR degradation step 'blur:2'" in capsys.readouterr().err
