"""Tiny random DiT4SR pipeline components for tests (no hub): import from here, e.g.
``from tiny_components import tiny_pipeline``."""

import json

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from dit4sr import DiT4SRPipeline, DiT4SRTransformer2DModel, PixelUnshuffleAutoencoder
from dit4sr.prompt_cache import PromptEmbedding, save_null_prompt_embedding

TINY_TRANSFORMER = {
    "sample_size": 8, "patch_size": 2, "in_channels": 48, "out_channels": 48, "num_layers": 2,
    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 16, "caption_projection_dim": 32,
    "pooled_projection_dim": 16, "pos_embed_max_size": 16, "dual_attention_layers": [], "qk_norm": "rms_norm",
    "prediction_type": "sample", "lr_residual": True,
}
TINY_SETTINGS = {"num_inference_steps": 1, "guidance_scale": 1.0, "added_prompt": "", "process_size": 0,
                 "tile_size": 16, "tile_overlap": 4, "color_fix": "none"}
# the recommended settings of the session's tiny model with text encoders (conftest.tiny_text_model_root)
TINY_TEXT_RECOMMENDED = {"num_inference_steps": 2, "guidance_scale": 2.0, "tile_size": 8, "tile_overlap": 4,
                         "process_size": 16, "color_fix": "adain"}

JOINT_DIM = 16
POOLED_DIM = 12
WORDS = ["<pad>", "<unk>", "<s>", "</s>"] + ["a", "photo", "of", "cat", "dog", "red", "blue", "sharp", "clean",
                                             "cinematic", "detailed"]


def tiny_transformer(in_channels=4, seed=0, **overrides) -> DiT4SRTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(sample_size=16, patch_size=2, in_channels=in_channels, out_channels=in_channels, num_layers=2,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                  caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=48,
                  dual_attention_layers=(0,), qk_norm="rms_norm")
    config.update(overrides)
    return DiT4SRTransformer2DModel(**config).eval()


def tiny_vae(seed=0, levels=4) -> AutoencoderKL:
    """An AutoencoderKL with the SD3 layout (16 latent channels in SD3, 4 here) and factor 2**(levels-1)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def null_embedding(tokens=6, seed=1) -> PromptEmbedding:
    g = torch.Generator().manual_seed(seed)
    return PromptEmbedding(torch.randn(tokens, JOINT_DIM, generator=g), torch.randn(POOLED_DIM, generator=g))


def tiny_pipeline(vae=None, transformer=None, **text_components) -> DiT4SRPipeline:
    pipe = DiT4SRPipeline(transformer=transformer or tiny_transformer(), vae=vae or tiny_vae(),
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **text_components)
    pipe.null_prompt_embedding = null_embedding()
    return pipe


def pixel_pipeline(**transformer_overrides) -> DiT4SRPipeline:
    """Pixel-space model as the bundled one: 4x pixel-unshuffle "VAE", 48 latent channels."""
    transformer = tiny_transformer(in_channels=48, **transformer_overrides)
    return tiny_pipeline(vae=PixelUnshuffleAutoencoder(downscale_factor=4), transformer=transformer)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                             special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=77)


def tiny_text_components(seed=0) -> dict:
    """Two CLIP encoders (widths 4 + 4, pooled 6 + 6 = POOLED_DIM) and a T5 of width JOINT_DIM."""
    torch.manual_seed(seed)

    def clip():
        config = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                                num_attention_heads=2, projection_dim=POOLED_DIM // 2, max_position_embeddings=77,
                                pad_token_id=0, bos_token_id=2, eos_token_id=3)
        return CLIPTextModelWithProjection(config).eval()

    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=JOINT_DIM, d_kv=4, d_ff=8, num_layers=1,
                                 num_heads=2)).eval()
    return dict(text_encoder=clip(), tokenizer=tiny_tokenizer(), text_encoder_2=clip(), tokenizer_2=tiny_tokenizer(),
                text_encoder_3=t5, tokenizer_3=tiny_tokenizer())


def save_model_root(pipe: DiT4SRPipeline, root, recommended=None, text_encoders=False) -> None:
    """Write ``pipe`` in the layout ``DiT4SRPipeline.from_pretrained`` reads (our own, model_index.json)."""
    root.mkdir(parents=True, exist_ok=True)
    pipe.transformer.save_pretrained(root / "transformer")
    pipe.vae.save_pretrained(root / "vae")
    pipe.scheduler.save_pretrained(root / "scheduler")

    def library(obj):
        return type(obj).__module__.split(".")[0]

    index = {"_class_name": "DiT4SRPipeline",
             **{name: [library(getattr(pipe, name)), type(getattr(pipe, name)).__name__]
                for name in ("transformer", "vae", "scheduler")}}
    if text_encoders:
        for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"):
            getattr(pipe, name).save_pretrained(root / name)
            index[name] = ["transformers", type(getattr(pipe, name)).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    if recommended is not None:
        (root / "recommended_settings.json").write_text(json.dumps(recommended))
    save_null_prompt_embedding(str(root), pipe.null_prompt_embedding)


# -- a tiny vision-language model for captions (dit4sr.captioning) ---------------------------------------------------
CAPTION_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", ".", "a", "the", "cat", "dog",
                 "sits",
                 "on", "red", "blue", "mat", "sharp", "photo", "of", "focus", "is", "blurred", "background", "tree",
                 "house", "near", "bright", "green", "boat", "sky", "river", "small", "old"]
CAPTION_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def save_tiny_caption_model(root, seed: int = 5) -> None:
    """A random LLaVA (tiny CLIP vision tower + tiny Llama) with a word-level tokenizer and a chat template, saved in
    the Hugging Face layout ``AutoProcessor`` / ``AutoModelForImageTextToText`` load. Weights are drawn wide
    (initializer range 1), so different images get different answers, and "." "focus" "blurred" are favoured, so
    answers have sentences and the focus/blur filter work (seed 5: six non-empty, distinct captions for
    support.catalog.small_catalog; most answers lose a sentence to the filter)."""
    from tokenizers import decoders
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocabulary = {word: index for index, word in enumerate(CAPTION_WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()  # words joined by spaces, no space before punctuation
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=16, initializer_range=1.0)
    text = LlamaConfig(vocab_size=len(CAPTION_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=2,
                       eos_token_id=3, pad_token_id=0, initializer_range=1.0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocabulary["<image>"],
                         initializer_range=1.0)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[[vocabulary[word] for word in (".", "focus", "blurred")]] *= 1.5
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, chat_template=CAPTION_CHAT_TEMPLATE, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(root)
    processor.save_pretrained(root)
