"""Prompt-embedding cache (local and S3), tiny SD3 text encoders, null-prompt embedding files."""

import pickle

import pytest
import torch
from support.tiny_components import null_embedding, tiny_text_components

from dit4sr.prompt_cache import (
    PromptEmbedding,
    PromptEmbeddingCache,
    PromptEncoder,
    load_null_prompt_embedding,
    prompt_key,
    save_null_prompt_embedding,
)

ENCODER_ORDER = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class CountingEncoder(PromptEncoder):
    """A real encoder that also records what it was asked to encode."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return super().encode(prompts)


def make_encoder(seed=0, cls=PromptEncoder):
    components = tiny_text_components(seed)
    return cls(*(components[name] for name in ENCODER_ORDER))


def test_key_depends_on_prompt_and_encoder():
    assert prompt_key("a cat", "enc-1") == prompt_key("a cat", "enc-1")
    keys = {prompt_key("a cat", "enc-1"), prompt_key("a cat ", "enc-1"), prompt_key("a cat", "enc-2"),
            prompt_key("a", "cat enc-1")}
    assert len(keys) == 4 and all(len(k) == 64 for k in keys)


def test_encoder_output_shapes_and_identity():
    encoder = make_encoder()
    first, empty = encoder.encode(["a red cat", ""])
    assert first.prompt_embeds.shape == (154, 16) and first.pooled_prompt_embeds.shape == (12,)
    assert not torch.equal(first.prompt_embeds, empty.prompt_embeds)
    assert make_encoder().identity == encoder.identity  # same configs and weights
    assert make_encoder(seed=1).identity != encoder.identity  # same configs, other weights
    torch.testing.assert_close(encoder.encode(["a red cat"])[0].prompt_embeds, first.prompt_embeds)


def test_local_cache_hit_miss_and_encode_missing(tmp_path):
    cache = PromptEmbeddingCache(tmp_path / "cache")
    encoder = make_encoder(cls=CountingEncoder)
    assert cache.get("a red cat", encoder.identity) is None
    result = cache.encode_missing(["a red cat", "a blue dog", "a red cat"], encoder)
    assert encoder.calls == [["a red cat", "a blue dog"]]
    assert set(result) == {"a red cat", "a blue dog"}
    again = cache.encode_missing(["a blue dog", "sharp photo"], encoder)
    assert encoder.calls[-1] == ["sharp photo"] and len(encoder.calls) == 2
    stored = cache.get("a blue dog", encoder.identity)
    assert torch.equal(stored.prompt_embeds, again["a blue dog"].prompt_embeds)
    assert torch.equal(stored.pooled_prompt_embeds, result["a blue dog"].pooled_prompt_embeds)
    assert cache.get("a blue dog", "another-encoder") is None
    assert not list((tmp_path / "cache").glob(".partial-*"))


def test_entry_for_another_prompt_is_rejected(tmp_path):
    cache = PromptEmbeddingCache(str(tmp_path))
    cache.put("a cat", "enc", null_embedding())
    (tmp_path / f"{prompt_key('a dog', 'enc')}.safetensors").write_bytes(
        (tmp_path / f"{prompt_key('a cat', 'enc')}.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not belong"):
        cache.get("a dog", "enc")


def test_s3_cache_over_the_real_s3_api(bucket, s3_options):
    cache = PromptEmbeddingCache(f"s3://{bucket}/cache", storage_options=s3_options)
    embedding = null_embedding(seed=3)
    cache.put("a cat", "enc", embedding)
    fresh = PromptEmbeddingCache(f"s3://{bucket}/cache", storage_options=s3_options)
    assert torch.equal(fresh.get("a cat", "enc").prompt_embeds, embedding.prompt_embeds)
    assert fresh.get("a dog", "enc") is None


def test_official_null_embedding_files(tmp_path):
    embeds, pooled = torch.randn(154, 4096), torch.randn(2048)
    torch.save(embeds, tmp_path / "NULL_prompt_embeds.pt")
    torch.save(pooled, tmp_path / "NULL_pooled_prompt_embeds.pt")
    loaded = load_null_prompt_embedding(str(tmp_path))
    assert loaded.prompt_embeds.shape == (154, 4096) and loaded.pooled_prompt_embeds.shape == (2048,)
    assert torch.equal(loaded.prompt_embeds, embeds)
    # our safetensors layout takes precedence
    save_null_prompt_embedding(str(tmp_path), null_embedding())
    assert load_null_prompt_embedding(str(tmp_path)).prompt_embeds.shape == (6, 16)
    assert load_null_prompt_embedding(str(tmp_path / "nothing-here")) is None


class Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_in_official_files_is_refused(tmp_path):
    torch.save({"embeds": Exploit()}, tmp_path / "NULL_prompt_embeds.pt")
    torch.save(torch.zeros(2048), tmp_path / "NULL_pooled_prompt_embeds.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_null_prompt_embedding(str(tmp_path))


def test_embedding_shapes_are_checked():
    with pytest.raises(ValueError, match="tokens, dim"):
        PromptEmbedding(torch.zeros(3), torch.zeros(4))
    batched = PromptEmbedding.from_tensors(torch.zeros(1, 5, 8), torch.zeros(1, 4))
    assert batched.prompt_embeds.shape == (5, 8)
    data = batched.to_bytes()
    assert PromptEmbedding.from_bytes(data).pooled_prompt_embeds.shape == (4,)
    with pytest.raises(ValueError, match="lacks"):
        from safetensors.torch import save

        PromptEmbedding.from_bytes(save({"other": torch.zeros(1)}))


def test_encoder_from_a_saved_sd3_root(tmp_path):
    from support.tiny_components import save_model_root, tiny_pipeline

    components = tiny_text_components()
    save_model_root(tiny_pipeline(**components), tmp_path / "sd3", text_encoders=True)
    with PromptEncoder.from_pretrained(str(tmp_path / "sd3"), device="cpu") as loaded:
        direct = PromptEncoder(*(components[name] for name in ENCODER_ORDER))
        assert loaded.identity == direct.identity
        torch.testing.assert_close(loaded.encode(["a cat"])[0].prompt_embeds, direct.encode(["a cat"])[0].prompt_embeds)
    save_model_root(tiny_pipeline(), tmp_path / "no-text")
    with pytest.raises(ValueError, match="has no text_encoder"):
        PromptEncoder.from_pretrained(str(tmp_path / "no-text"))
