"""DiT4SRPipeline end to end with tiny random components: sizes, tiling, determinism, parameterisations,
settings precedence, prompts, bad input, and diffusers' conventions (step callbacks, interrupt, generators,
latent output)."""

import numpy as np
import pytest
import torch
from PIL import Image
from support.tiny_components import (
    null_embedding,
    pixel_pipeline,
    tiny_pipeline,
    tiny_text_components,
    tiny_transformer,
)

from dit4sr import DiT4SRTransformerOutput, compose_prompt
from dit4sr.devices import resolve_device, resolve_dtype
from dit4sr.prompt_cache import PromptEncoder
from dit4sr.settings import OFFICIAL_SETTINGS
from dit4sr.tiling import whole_image_noise

# process_size=0 skips the official short-side raise (to 512 px) so that tests stay small and fast.
FAST = dict(num_inference_steps=2, guidance_scale=1.0, show_progress=False, output_type="np", process_size=0)


@pytest.fixture(autouse=True)
def few_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def random_image(height, width, channels=3, seed=0):
    return (np.random.default_rng(seed).random((height, width, channels)) * 255).astype(np.uint8)


def sample(pipe, height, width, seed=7, **settings):
    """A call's final latents (``output_type="latent"``) for a ``height x width`` latent, and the LR latents the
    call conditioned them on (read by a step callback)."""
    seen = []

    def keep_lr(pipe, step, timestep, tensors):
        seen.append(tensors["lr_latents"])
        return {}

    factor = pipe.vae_scale_factor
    latents = pipe(random_image(height * factor, width * factor), upscale=1, seed=seed,
                   callback_on_step_end=keep_lr, callback_on_step_end_tensor_inputs=["lr_latents"],
                   **{**FAST, "num_inference_steps": 3, "output_type": "latent", **settings}).images
    assert latents.shape[-2:] == seen[0].shape[-2:] == (height, width)
    return latents, seen[0].contiguous()  # as the gathered tiles hold it (the VAE's layout rounds differently)


def reference_untiled(pipe, lr, steps=3, seed=7):
    """The untiled official loop: the whole latent through the transformer at every step."""
    cond = pipe.null_prompt_embedding
    pipe.scheduler.set_timesteps(steps)
    latents = whole_image_noise(lr.shape, seed)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            out = pipe.transformer(latents, lr, cond.prompt_embeds[None], cond.pooled_prompt_embeds[None],
                                   t.expand(1)).sample
            latents = pipe.scheduler.step(out, t, latents, return_dict=False)[0]
    return latents


def test_one_tile_covering_the_latent_equals_untiled_sampling():
    pipe = tiny_pipeline()
    tiled, lr = sample(pipe, 24, 40, tile_size=(24, 40), tile_overlap=8)
    assert torch.equal(tiled, reference_untiled(pipe, lr))


def test_overlapping_tiles_blend_to_the_whole_image_prediction():
    # A model whose prediction is a function of the global position (here the LR latent itself): every
    # tile agrees where tiles overlap, so normalised blending must reproduce it exactly: x_end = noise - lr.
    pipe = tiny_pipeline()
    pipe.transformer.forward = lambda hidden, lr, text, pooled, t: DiT4SRTransformerOutput(sample=lr.float())
    out, lr = sample(pipe, 30, 52, tile_size=(16, 20), tile_overlap=(6, 8), tile_batch_size=3)
    torch.testing.assert_close(out, whole_image_noise(lr.shape, 7) - lr, atol=1e-5, rtol=0)


def test_constant_prediction_with_official_and_symmetric_weights():
    pipe = tiny_pipeline()
    pipe.transformer.forward = lambda hidden, lr, text, pooled, t: DiT4SRTransformerOutput(
        sample=torch.full_like(hidden, 0.25))
    for weighting in ("official", "symmetric"):
        out, lr = sample(pipe, 26, 34, tile_size=16, tile_overlap=10, tile_weighting=weighting)
        torch.testing.assert_close(out, whole_image_noise(lr.shape, 7) - 0.25, atol=1e-5, rtol=0)


def test_x0_residual_parameterisation_lands_on_the_lr_latent():
    # prediction_type="sample" with lr_residual: a zero output means x0 = LR latent, so Euler steps
    # converted from x0 to velocity must end exactly there.
    pipe = tiny_pipeline(transformer=tiny_transformer(prediction_type="sample", lr_residual=True))
    pipe.transformer.forward = lambda hidden, lr, text, pooled, t: DiT4SRTransformerOutput(
        sample=torch.zeros_like(hidden))
    for settings in (dict(tile_size=16, tile_overlap=4), dict(start_point="lr")):
        out, lr = sample(pipe, 20, 28, **settings)
        torch.testing.assert_close(out, lr, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(37, 53), (300, 170), (1, 1), (5, 2)])
def test_output_is_exactly_upscale_times_input(size):
    height, width = size
    pipe = tiny_pipeline()
    image = random_image(height, width)
    out = pipe(image, upscale=4, tile_batch_size=4, **{**FAST, "process_size": 512}).images[0]
    assert out.shape == (4 * height, 4 * width, 3) and out.dtype == np.float32
    # The AdaIN colour fix carries the input's per-channel mean (measured: within 0.011; bound 0.03).
    np.testing.assert_allclose(out.reshape(-1, 3).mean(0), image.reshape(-1, 3).mean(0) / 255, rtol=0, atol=0.03)


def test_non_integer_upscale_and_pil_output():
    pipe = tiny_pipeline()
    out = pipe(Image.fromarray(random_image(40, 30)), upscale=2.5, **{**FAST, "output_type": "pil"}).images[0]
    assert out.size == (75, 100) and out.mode == "RGB"


def test_processing_geometry_follows_the_official_script():
    pipe = tiny_pipeline()  # VAE factor 8
    # short side < 512 // 4 = 128: raised to 128 first, then x4, then rounded down to a multiple of 8
    assert pipe.geometry(53, 37, 4, process_size=512).resizes == ((183, 128), (732, 512), (728, 512))
    assert pipe.geometry(300, 170, 4, process_size=512).resizes == ((1200, 680), (1200, 680))
    assert pipe.geometry(1, 1, 4, process_size=512).resizes == ((128, 128), (512, 512), (512, 512))


def test_same_seed_same_bytes_other_seed_differs():
    pipe = tiny_pipeline()
    image = random_image(37, 53)
    tiles = dict(tile_size=12, tile_overlap=4, tile_batch_size=4)
    first = pipe(image, seed=3, **tiles, **FAST).images[0]
    second = pipe(image, seed=3, **tiles, **FAST).images[0]
    other = pipe(image, seed=4, **tiles, **FAST).images[0]
    assert first.tobytes() == second.tobytes()
    assert np.abs(first - other).mean() > 1e-3


def test_tile_batch_size_changes_at_most_rounding():
    # Measured: max difference 3.2e-6 (float32, CPU). Bound: about 3x that (one 8-bit level is 1/255 = 3.9e-3).
    pipe = tiny_pipeline()
    image = random_image(37, 53)
    tiles = dict(tile_size=12, tile_overlap=4)  # a 2 x 3 grid on the 18 x 26 latent
    singles = pipe(image, tile_batch_size=1, **tiles, **FAST).images[0]
    batched = pipe(image, tile_batch_size=16, **tiles, **FAST).images[0]
    assert np.abs(singles - batched).max() <= 1e-5


def test_guidance_uses_negative_embeddings_in_one_call():
    pipe = tiny_pipeline()
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *args: calls.append(args[0].shape[0]) or forward(*args)
    negative = null_embedding(seed=5)
    image = random_image(20, 20)
    guided = pipe(image, negative_prompt_embeds=negative.prompt_embeds,
                  negative_pooled_prompt_embeds=negative.pooled_prompt_embeds, tile_batch_size=8,
                  **{**FAST, "guidance_scale": 4.0}).images[0]
    assert set(calls) == {2}  # one tile per image here: conditional + unconditional halves together
    plain = pipe(image, **FAST).images[0]
    assert np.abs(guided - plain).mean() > 1e-3
    with pytest.raises(ValueError, match="negative prompt"):
        pipe(image, **{**FAST, "guidance_scale": 4.0})


def test_pixel_autoencoder_path_and_residual_model():
    pipe = pixel_pipeline(prediction_type="sample", lr_residual=True)
    out = pipe(random_image(30, 22), upscale=4, **FAST).images[0]
    assert out.shape == (120, 88, 3)
    # without the short-side raise (process_size=0, as the bundled model) a 1x1 input is raised just to
    # one latent patch (2 x 2 latents = 8 x 8 pixels) and still comes out exactly 4 x 4
    assert pipe.geometry(1, 1, 4, process_size=0).resizes == ((2, 2), (8, 8), (8, 8))
    assert pipe(random_image(1, 1), upscale=4, **FAST).images[0].shape == (4, 4, 3)


def test_recommended_settings_precedence():
    pipe = tiny_pipeline()
    assert pipe.effective_settings()["num_inference_steps"] == OFFICIAL_SETTINGS["num_inference_steps"] == 40
    pipe.recommended_settings = {"num_inference_steps": 1, "color_fix": "none", "tile_size": 32}
    settings = pipe.effective_settings(color_fix="wavelet")
    assert (settings["num_inference_steps"], settings["color_fix"], settings["tile_size"]) == (1, "wavelet", 32)
    assert settings["guidance_scale"] == 8.0
    one_step = pipe(random_image(16, 16), guidance_scale=1.0, show_progress=False, output_type="np",
                    process_size=0).images[0]
    explicit = pipe(random_image(16, 16), color_fix="none", tile_size=32,
                    **{**FAST, "num_inference_steps": 1}).images[0]
    assert one_step.tobytes() == explicit.tobytes()


def test_list_input_matches_single_calls():
    pipe = tiny_pipeline()
    images = [random_image(12, 20, seed=1), random_image(18, 10, seed=2)]
    together = pipe(images, **FAST).images
    assert [a.tobytes() for a in together] == [pipe(i, **FAST).images[0].tobytes() for i in images]


def test_alpha_is_upscaled_separately_and_reattached():
    pipe = tiny_pipeline()
    rgba = random_image(16, 24, channels=4)
    rgba[:, :12, 3] = 0
    rgba[:, 12:, 3] = 255
    out = pipe(rgba, **FAST).images[0]
    assert out.shape == (64, 96, 4)
    assert out[:, :40, 3].max() < 0.01 and out[:, 56:, 3].min() > 0.99
    pil = pipe(Image.fromarray(rgba, "RGBA"), **{**FAST, "output_type": "pil"}).images[0]
    assert pil.mode == "RGBA" and pil.size == (96, 64)


def test_text_encoders_and_prompt_embeddings_agree():
    components = tiny_text_components()
    pipe = tiny_pipeline(**components)
    encoder = PromptEncoder(*(components[k] for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                      "text_encoder_3", "tokenizer_3")))
    text = compose_prompt("a red cat", "sharp clean")
    assert text == "a red cat sharp clean"
    embedding = encoder.encode([text])[0]
    image = random_image(16, 16)
    encoded = pipe(image, prompt="a red cat", added_prompt="sharp clean", **FAST).images[0]
    bare = tiny_pipeline()
    given = bare(image, prompt_embeds=embedding.prompt_embeds, pooled_prompt_embeds=embedding.pooled_prompt_embeds,
                 **FAST).images[0]
    assert encoded.tobytes() == given.tobytes()
    assert pipe.prompt_texts("a red cat", added_prompt="sharp clean", guidance_scale=3.0) == (
        "a red cat sharp clean", OFFICIAL_SETTINGS["negative_prompt"])


def test_prompt_without_text_encoders_is_a_clear_error():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="needs text encoders"):
        pipe(random_image(8, 8), prompt="a red cat", **FAST)
    pipe.null_prompt_embedding = None
    with pytest.raises(ValueError, match="null-prompt"):
        pipe(random_image(8, 8), **FAST)


def test_nan_model_output_is_reported():
    pipe = tiny_pipeline()
    pipe.transformer.forward = lambda hidden, lr, text, pooled, t: DiT4SRTransformerOutput(
        sample=torch.full_like(hidden, float("nan")))
    with pytest.raises(FloatingPointError, match="NaN"):
        pipe(random_image(8, 8), **FAST)


@pytest.mark.parametrize("kwargs, match", [
    (dict(upscale=0.5), "upscale"),
    (dict(upscale=float("nan")), "upscale"),
    (dict(tile_size=16, tile_overlap=16), "tile_overlap"),
    (dict(tile_size=15, tile_overlap=4), "multiple of the transformer patch size"),
    (dict(tile_size=200), "positional embedding"),
    (dict(color_fix="sepia"), "color_fix"),
    (dict(start_point="middle"), "start_point"),
    (dict(tile_batch_size=0), "tile_batch_size"),
    (dict(output_type="pt"), "output_type"),
    (dict(seed=1, generator=torch.Generator()), "generator or seed"),
    (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), "callback_on_step_end_tensor_inputs"),
    (dict(num_inference_steps=0), "num_inference_steps"),
])
def test_bad_settings_raise_value_errors(kwargs, match):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=match):
        pipe(random_image(40, 40), **{**FAST, **kwargs})


@pytest.mark.parametrize("image, match", [
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((5, 5, 5), np.uint8), "shape"),
    (np.zeros((5, 5, 3), np.int32), "dtype"),
    (np.full((5, 5, 3), np.nan, np.float32), "NaN"),
    ([], "no images"),
])
def test_bad_images_raise_value_errors(image, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline()(image, **FAST)


def test_devices_and_dtypes():
    assert resolve_device("cpu").type == "cpu"
    expected = ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None).type == resolve_device("auto").type == expected
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_progress_bar_counts_steps_times_tiles_and_can_be_silenced(capsys):
    pipe = tiny_pipeline()
    image = random_image(37, 53)
    pipe(image, tile_size=12, tile_overlap=4, **{**FAST, "show_progress": True})
    progress = capsys.readouterr().err
    assert "12/12" in progress and "13/" not in progress  # 2 steps x 6 tiles (a 2 x 3 grid on 18 x 26)
    pipe(image, tile_size=12, tile_overlap=4, **FAST)
    assert capsys.readouterr().err == ""
    pipe.set_progress_bar_config(disable=True)  # diffusers' switch, for every call
    pipe(image, tile_size=12, tile_overlap=4, **{**FAST, "show_progress": True})
    assert capsys.readouterr().err == ""


def test_half_precision_runs_close_to_float32():
    pipe = tiny_pipeline()
    image = random_image(20, 28)
    full = pipe(image, **FAST).images[0]
    pipe.to(dtype=torch.bfloat16)
    half = pipe(image, **FAST).images[0]
    assert half.dtype == np.float32 and np.isfinite(half).all()
    # bfloat16 really ran (the result moved) and stayed close: measured mean 0.0031 (max 0.089) on this image;
    # the bound leaves 3x margin for other CPUs' kernels
    assert 0 < np.abs(half - full).mean() < 0.01


# -- frames: one noise field, tiles batched across images -------------------------------------------------------
def count_transformer_items(pipe):
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *args: calls.append(args[0].shape[0]) or forward(*args)
    return calls


def test_same_size_images_share_transformer_batches_and_match_single_calls():
    pipe = tiny_pipeline()
    frames = [random_image(37, 53, seed=i) for i in range(3)]
    tiles = dict(tile_size=12, tile_overlap=4)  # a 2 x 3 grid: 6 tiles per frame
    singles = [pipe(frame, seed=5, tile_batch_size=4, **tiles, **FAST).images[0] for frame in frames]
    calls = count_transformer_items(pipe)
    together = pipe(frames, seed=5, tile_batch_size=4, **tiles, **FAST).images
    # 18 tiles per step in batches of 4: the last batch of frame 0 is topped up with frame 1's tiles
    assert calls == [4, 4, 4, 4, 2] * FAST["num_inference_steps"]
    for single, batched in zip(singles, together):
        assert np.abs(single - batched).max() < 1e-5  # measured 0 to 3e-7: rounding of the batch only


def test_one_seed_is_one_noise_field_and_latents_replace_it():
    pipe = tiny_pipeline()
    frame = random_image(37, 53)
    geometry = pipe.geometry(37, 53, 4, process_size=0, tile_size=12, tile_overlap=4)
    field = whole_image_noise((pipe.transformer.config.in_channels, geometry.latent_height,
                               geometry.latent_width), 11)
    by_seed = pipe(frame, seed=11, tile_size=12, tile_overlap=4, **FAST).images[0]
    by_latents = pipe(frame, seed=0, latents=field, tile_size=12, tile_overlap=4, **FAST).images[0]
    assert by_seed.tobytes() == by_latents.tobytes()
    # the same frame twice with one seed gives identical frames; a seed per frame ("independent") does not
    same = pipe([frame, frame], seed=11, tile_size=12, tile_overlap=4, tile_batch_size=1, **FAST).images
    alone = pipe(frame, seed=11, tile_size=12, tile_overlap=4, tile_batch_size=1, **FAST).images[0]
    assert same[0].tobytes() == same[1].tobytes() == alone.tobytes()
    independent = pipe([frame, frame], seed=[11, 12], tile_size=12, tile_overlap=4, tile_batch_size=1,
                       **FAST).images
    assert independent[0].tobytes() == alone.tobytes()
    assert np.abs(independent[0] - independent[1]).mean() > 1e-3
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(frame, latents=field[:, :4], **FAST)
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        pipe(frame, seed=[1, 2], **FAST)


@pytest.mark.parametrize("height, width", [(1, 1), (4, 40), (40, 4), (37, 53), (3, 50)])
def test_geometry_is_what_the_sampler_runs(height, width):
    pipe = tiny_pipeline()
    settings = dict(process_size=128, tile_size=8, tile_overlap=2)
    geometry = pipe.geometry(height, width, 4, **settings)
    calls = count_transformer_items(pipe)
    out = pipe(random_image(height, width), tile_batch_size=1, **{**FAST, **settings}).images[0]
    assert out.shape[:2] == (height * 4, width * 4)
    assert len(calls) == geometry.tiles * FAST["num_inference_steps"]
    assert geometry.resizes[-1] == (geometry.latent_height * pipe.vae_scale_factor,
                                    geometry.latent_width * pipe.vae_scale_factor)


# -- diffusers' conventions: step callbacks, interrupt, generators, latent output --------------------------------
TILES = dict(tile_size=12, tile_overlap=4, tile_batch_size=4)  # a 2 x 3 grid on the 18 x 26 latent of 37 x 53


def test_step_callback_sees_every_step_and_can_replace_the_latents():
    pipe = tiny_pipeline()
    image = random_image(37, 53)
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append((step, float(timestep), tensors["latents"].clone()))
        return {}

    final = pipe(image, **TILES, **{**FAST, "num_inference_steps": 4, "output_type": "latent"},
                 callback_on_step_end=record).images
    pipe.scheduler.set_timesteps(4)
    assert [step for step, _, _ in seen] == [0, 1, 2, 3] and pipe.num_timesteps == 4
    assert [timestep for _, timestep, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2], final)  # the latents after the last step are what comes back
    assert len({latents.sum().item() for _, _, latents in seen}) == 4  # each step moved them

    def replace_at_last_step(pipe, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 3 else {}

    replaced = pipe(image, **TILES, **{**FAST, "num_inference_steps": 4, "output_type": "latent"},
                    callback_on_step_end=replace_at_last_step).images
    assert torch.equal(replaced, torch.zeros_like(final))
    # images of two sizes are sampled one size after the other: the callback sees every step of each
    steps = []
    pipe([image, random_image(20, 20)], **TILES, **FAST,
         callback_on_step_end=lambda pipe, step, timestep, tensors: steps.append(step) or {})
    assert steps == [0, 1, 0, 1]


def test_interrupt_from_a_callback_stops_the_loop():
    pipe = tiny_pipeline()
    image = random_image(37, 53)
    seen = []

    def stop_after_step_1(pipe, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        if step == 1:
            pipe._interrupt = True
        return {}

    calls = count_transformer_items(pipe)
    stopped = pipe(image, **TILES, **{**FAST, "num_inference_steps": 4, "output_type": "latent"},
                   callback_on_step_end=stop_after_step_1).images
    assert pipe.interrupt and len(seen) == 2
    assert calls == [4, 2] * 2  # 6 tiles in batches of 4, for steps 0 and 1 only
    assert torch.equal(stopped, seen[-1])  # returned as they were when the loop stopped
    # the next call starts uninterrupted
    assert len(pipe(image, **TILES, **FAST).images) == 1 and not pipe.interrupt and len(calls) == 8


def test_latent_output_decodes_through_the_vae_to_the_same_pixels():
    pipe = tiny_pipeline()
    frames = [random_image(37, 53, channels=4, seed=seed) for seed in (1, 2)]  # with alpha
    settings = dict(**TILES, **{**FAST, "color_fix": "adain"})
    pixels = pipe(frames, seed=3, **settings).images
    latents = pipe(frames, seed=3, **{**settings, "output_type": "latent"}).images
    geometry = pipe.geometry(37, 53, 4, process_size=0)
    assert latents.shape == (2, 4, geometry.latent_height, geometry.latent_width) and latents.dtype == torch.float32
    decoded = pipe.decode_latents(latents, frames, upscale=4, color_fix="adain", process_size=0, output_type="np")
    assert [image.tobytes() for image in decoded] == [image.tobytes() for image in pixels]
    pil = pipe.decode_latents(latents[1:], frames[1], color_fix="adain", process_size=0)[0]
    assert pil.mode == "RGBA" and np.array_equal(
        np.asarray(pil), np.asarray(pipe(frames, seed=3, **{**settings, "output_type": "pil"}).images[1]))
    (as_tuple,) = pipe(frames, seed=3, return_dict=False, **settings)
    assert [image.tobytes() for image in as_tuple] == [image.tobytes() for image in pixels]
    with pytest.raises(ValueError, match="one size"):
        pipe([frames[0], random_image(20, 20)], **{**settings, "output_type": "latent"})


def test_generators_draw_the_noise_seeds_draw():
    pipe = tiny_pipeline()
    frame = random_image(20, 28)
    by_seed = pipe([frame, frame], seed=[5, 6], **FAST).images
    by_generators = pipe([frame, frame], generator=[torch.Generator().manual_seed(5),
                                                    torch.Generator().manual_seed(6)], **FAST).images
    assert [image.tobytes() for image in by_generators] == [image.tobytes() for image in by_seed]
    assert by_seed[0].tobytes() != by_seed[1].tobytes()
    # one generator: one noise field for every image, as one seed
    shared = pipe([frame, frame], generator=torch.Generator().manual_seed(5), **FAST).images
    assert shared[0].tobytes() == shared[1].tobytes() == by_seed[0].tobytes()
    # a generator is stateful: a second call from the same one draws other noise
    generator = torch.Generator().manual_seed(5)
    first, second = (pipe(frame, generator=generator, **FAST).images[0] for _ in range(2))
    assert first.tobytes() == pipe(frame, seed=5, **FAST).images[0].tobytes() != second.tobytes()
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        pipe([frame, frame], generator=[torch.Generator()], **FAST)


def test_execution_device_is_public():
    assert tiny_pipeline().execution_device == torch.device("cpu")
