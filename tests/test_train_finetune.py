"""configs/train/dit4sr_finetune.yaml: the official fine-tuning recipe, wired end to end on a tiny random model
of the official layout (SD3.5-style root with AutoencoderKL and three text encoders + a DiT4SR root)."""

import json
import pathlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from support.tiny_components import save_model_root, tiny_pipeline, tiny_text_components, tiny_transformer
from support.training import images

from dit4sr.pipeline_dit4sr import DiT4SRPipeline
from dit4sr.prompt_cache import PromptEmbeddingCache
from dit4sr.train import main
from dit4sr.training import TrainConfig, Trainer, resolve_prompt_embeddings

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "train"
FINETUNE = CONFIGS / "dit4sr_finetune.yaml"

pytestmark = pytest.mark.usefixtures("few_torch_threads")


def test_finetune_config_is_the_official_recipe():
    config = TrainConfig.from_yaml(FINETUNE)
    optim = config.optim
    assert config.model.trainable == "control" and config.model.pretrained_transformer
    assert (optim.learning_rate, optim.weight_decay, optim.max_grad_norm) == (5e-5, 1e-2, 1.0)
    assert optim.null_prompt_prob == 0.2
    assert (optim.logit_mean, optim.logit_std) == (0.0, 1.0)  # logit-normal t
    assert optim.batch_size * 8 == 64 and config.precision == "auto" and config.data.crop_size == 512
    degradation = yaml.safe_load(pathlib.Path(config.data.degradation).read_text())
    assert degradation["realistic_prob"] == 1.0 and degradation["final_sinc_prob"] == 0.8
    assert config.prompts.cache and config.prompts.text_encoders


def _official_layout(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """An SD3.5-like base root (AutoencoderKL, scheduler, CLIP/CLIP/T5) and a separate DiT4SR root."""
    transformer = tiny_transformer(seed=2)
    pipe = tiny_pipeline(transformer=transformer, **tiny_text_components())
    base, dit = tmp_path / "sd35", tmp_path / "dit4sr"
    save_model_root(pipe, base, text_encoders=True)
    transformer.save_pretrained(dit / "transformer")
    return base, dit


def _finetune_yaml(tmp_path, base, dit, **prompts) -> pathlib.Path:
    raw = yaml.safe_load(FINETUNE.read_text())
    data = images(tmp_path / "photos" / "set", count=3, size=64)
    raw["output_dir"] = str(tmp_path / "run")
    raw["checkpoint_every"] = 2
    raw["model"].update(pretrained=str(base), pretrained_transformer=str(dit))
    raw["prompts"].update(text_encoders=str(base), cache=str(tmp_path / "prompt-cache"), prompt="a sharp photo",
                          **prompts)
    raw["data"].update(roots=[str(data)], degradation=str(CONFIGS / raw["data"]["degradation"]), crop_size=32,
                       num_workers=1, prefetch=2)
    raw["optim"].update(max_steps=2, batch_size=2)
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_finetune_wiring_end_to_end_on_a_tiny_model_of_the_official_layout(tmp_path):
    base, dit = _official_layout(tmp_path)
    path = _finetune_yaml(tmp_path, base, dit)
    assert main(["--config", str(path), "--device", "cpu", "--no-progress"]) == 0

    # The driver encoded the training prompt and the null prompt once, into the cache.
    cache_files = sorted((tmp_path / "prompt-cache").glob("*.safetensors"))
    assert len(cache_files) == 2
    config = TrainConfig.from_yaml(path)
    prompt, null = resolve_prompt_embeddings(config.prompts)
    assert prompt.prompt_embeds.shape[-1] == 16 and not torch.equal(prompt.prompt_embeds, null.prompt_embeds)

    # Only the control parameters moved (bf16 export: compare the fp32 training state).
    checkpoint = tmp_path / "run" / "checkpoint-0000002"
    trained = load_file(str(checkpoint / "training_state" / "transformer" / "diffusion_pytorch_model.safetensors"))
    original = tiny_transformer(seed=2).state_dict()
    changed = {k for k in original if not torch.equal(original[k], trained[k])}
    assert changed and all("control" in k for k in changed)
    assert json.loads((checkpoint / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]

    # The checkpoint is a pipeline root that upscales without any text encoder.
    pipe = DiT4SRPipeline.from_pretrained(str(checkpoint), device="cpu", torch_dtype=torch.float32)
    assert not pipe.has_text_encoders
    out = pipe(Image.new("RGB", (8, 8), (120, 60, 30)), prompt_embeds=prompt.prompt_embeds,
               pooled_prompt_embeds=prompt.pooled_prompt_embeds, num_inference_steps=1, guidance_scale=1.0,
               show_progress=False)
    assert out.images[0].size == (32, 32)


def test_cached_prompts_with_an_encoder_id_need_no_text_encoder(tmp_path):
    base, dit = _official_layout(tmp_path)
    first = TrainConfig.from_yaml(_finetune_yaml(tmp_path, base, dit))
    prompt, _ = resolve_prompt_embeddings(first.prompts)
    cache_file = next((tmp_path / "prompt-cache").glob("*.safetensors"))
    encoder_id = PromptEmbeddingCache(tmp_path / "prompt-cache").fs.cat_file(str(cache_file))
    encoder_id = json.loads(encoder_id[8:8 + int.from_bytes(encoder_id[:8], "little")])["__metadata__"]["encoder_id"]

    # Text encoders gone: the cached embeddings are all a training run needs.
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        for file in (base / name).iterdir():
            file.unlink()
    config = TrainConfig.from_yaml(_finetune_yaml(tmp_path, base, dit, encoder_id=encoder_id))
    cached_prompt, _ = resolve_prompt_embeddings(config.prompts)
    assert torch.equal(cached_prompt.prompt_embeds, prompt.prompt_embeds)
    trainer = Trainer(config, device="cpu", prompts=(cached_prompt, _))
    losses = trainer.fit(show_progress=False)
    assert len(losses) == 2 and np.all(np.isfinite(losses))
