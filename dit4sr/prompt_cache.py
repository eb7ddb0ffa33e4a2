"""Prompt embeddings: encode each distinct prompt once, store it, and sample without text encoders.

SD3-style conditioning is a token sequence ``prompt_embeds`` (T, joint_dim) — CLIP-L and CLIP-G
penultimate states side by side, zero-padded to T5's width, followed by the T5 states — and a vector
``pooled_prompt_embeds`` (pooled_dim,) — the two CLIP pooled outputs. ``PromptEncoder`` computes them
with diffusers' own SD3 encoding (``max_sequence_length=77`` by default, so an embedding is (154, 4096)
like the official DiT4SR null prompt). Upscaling workers never load text encoders: they get embeddings
from a ``PromptEmbeddingCache`` (or the model's stored null prompt) and pass them to the pipeline.

Cache layout (any local path or fsspec URL, e.g. ``s3://bucket/prompt-cache``)::

    <root>/<sha256>.safetensors      tensors prompt_embeds (T, D), pooled_prompt_embeds (P,);
                                     metadata: prompt, encoder_id, format

where ``sha256 = prompt_key(prompt, encoder_id)`` hashes the exact prompt text together with the encoder
identity (``PromptEncoder.identity``: a hash of the encoders' classes, configs, tokenizers, sequence length
and embedding weights), so embeddings from different encoders never mix. Entries are written atomically
and verified against their metadata when read. Typical use in a driver or a CPU task::

    cache = PromptEmbeddingCache("s3://bucket/prompt-cache")
    with PromptEncoder.from_pretrained("s3://models/sd3.5-medium") as encoder:
        cache.encode_missing(prompts, encoder)          # encodes only prompts not stored yet
        encoder_id = encoder.identity
    # later, in a worker holding only the transformer and the VAE:
    emb = cache.get(prompt, encoder_id)
    pipe(image, prompt_embeds=emb.prompt_embeds, pooled_prompt_embeds=emb.pooled_prompt_embeds)

Null-prompt embeddings live in a model root as ``prompt_embeds/null.safetensors`` (same tensor names);
the official ``NULL_prompt_embeds.pt`` / ``NULL_pooled_prompt_embeds.pt`` pair is accepted too and read
with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .devices import resolve_device, resolve_dtype
from .files import local_copy, write_atomic

FORMAT = "dit4sr-prompt-embedding/1"
NULL_EMBEDDING_PATH = "prompt_embeds/null.safetensors"
OFFICIAL_NULL_FILES = ("NULL_prompt_embeds.pt", "NULL_pooled_prompt_embeds.pt")
DEFAULT_MAX_SEQUENCE_LENGTH = 77
_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "torch_dtype", "dtype"}


@dataclass(frozen=True)
class PromptEmbedding:
    prompt_embeds: torch.Tensor  # (tokens, joint_attention_dim)
    pooled_prompt_embeds: torch.Tensor  # (pooled_projection_dim,)

    def __post_init__(self):
        if self.prompt_embeds.ndim != 2 or self.pooled_prompt_embeds.ndim != 1:
            raise ValueError(
                "prompt embeddings must be (tokens, dim) and (pooled_dim,), got "
                f"{tuple(self.prompt_embeds.shape)} and {tuple(self.pooled_prompt_embeds.shape)}"
            )

    @classmethod
    def from_tensors(cls, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor) -> PromptEmbedding:
        """Accepts an optional leading batch dimension of 1 on either tensor."""
        if prompt_embeds.ndim == 3 and prompt_embeds.shape[0] == 1:
            prompt_embeds = prompt_embeds[0]
        if pooled_prompt_embeds.ndim == 2 and pooled_prompt_embeds.shape[0] == 1:
            pooled_prompt_embeds = pooled_prompt_embeds[0]
        return cls(prompt_embeds, pooled_prompt_embeds)

    def to_bytes(self, metadata: dict[str, str] | None = None) -> bytes:
        tensors = {"prompt_embeds": self.prompt_embeds.detach().cpu().contiguous(),
                   "pooled_prompt_embeds": self.pooled_prompt_embeds.detach().cpu().contiguous()}
        return save_safetensors(tensors, metadata={"format": FORMAT, **(metadata or {})})

    @classmethod
    def from_bytes(cls, data: bytes) -> PromptEmbedding:
        tensors = load_safetensors(data)
        missing = {"prompt_embeds", "pooled_prompt_embeds"} - tensors.keys()
        if missing:
            raise ValueError(f"prompt embedding file lacks {sorted(missing)}")
        return cls(tensors["prompt_embeds"], tensors["pooled_prompt_embeds"])


def prompt_key(prompt: str, encoder_id: str) -> str:
    """sha256 over an unambiguous serialisation of (prompt text, encoder identity)."""
    return hashlib.sha256(json.dumps([prompt, encoder_id], ensure_ascii=False).encode()).hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len]).get("__metadata__", {})


class PromptEmbeddingCache:
    """Content-addressed store of prompt embeddings under a local path or fsspec URL (see module docs)."""

    def __init__(self, root: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def path(self, prompt: str, encoder_id: str) -> str:
        return f"{self.root}/{prompt_key(prompt, encoder_id)}.safetensors"

    def get(self, prompt: str, encoder_id: str) -> PromptEmbedding | None:
        path = self.path(prompt, encoder_id)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        meta = _metadata(data)
        if meta.get("prompt") != prompt or meta.get("encoder_id") != encoder_id:
            raise ValueError(f"prompt cache entry {path} does not belong to this prompt/encoder (corrupt cache?)")
        return PromptEmbedding.from_bytes(data)

    def put(self, prompt: str, encoder_id: str, embedding: PromptEmbedding) -> str:
        path = self.path(prompt, encoder_id)
        write_atomic(self.fs, path, embedding.to_bytes({"prompt": prompt, "encoder_id": encoder_id}))
        return path

    def encode_missing(self, prompts: Iterable[str], encoder: PromptEncoder,
                       batch_size: int = 16) -> dict[str, PromptEmbedding]:
        """Embeddings for every distinct prompt, encoding (and storing) only those not cached yet."""
        result: dict[str, PromptEmbedding] = {}
        missing: list[str] = []
        for prompt in dict.fromkeys(prompts):
            cached = self.get(prompt, encoder.identity)
            if cached is None:
                missing.append(prompt)
            else:
                result[prompt] = cached
        for start in range(0, len(missing), batch_size):
            batch = missing[start:start + batch_size]
            for prompt, embedding in zip(batch, encoder.encode(batch)):
                self.put(prompt, encoder.identity, embedding)
                result[prompt] = embedding
        return result


def _weights_digest(module: torch.nn.Module) -> str:
    """Hash of the token-embedding matrix: tells apart encoders with equal configs but different weights."""
    weight = module.get_input_embeddings().weight.detach().cpu().contiguous()
    return hashlib.sha256(weight.view(torch.uint8).numpy().tobytes()).hexdigest()


class PromptEncoder:
    """SD3 text encoding (two CLIP + T5) for the prompt cache; use as a context manager to free the encoders."""

    def __init__(self, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3,
                 max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, device: str | torch.device | None = None):
        from diffusers import StableDiffusion3Pipeline

        self.device = resolve_device(device)
        self.max_sequence_length = max_sequence_length
        # diffusers' SD3 pipeline holds the reference prompt-encoding code; it needs no transformer or VAE.
        self._sd3 = StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        ).to(self.device)
        self.identity = self._identity()

    def _identity(self) -> str:
        sd3 = self._sd3
        parts = [str(self.max_sequence_length)]
        for encoder in (sd3.text_encoder, sd3.text_encoder_2, sd3.text_encoder_3):
            # Where the model was loaded from and with which library version does not change what it computes.
            config = {k: v for k, v in encoder.config.to_dict().items()
                      if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
            parts += [type(encoder).__name__, json.dumps(config, sort_keys=True, default=str),
                      _weights_digest(encoder)]
        for tokenizer in (sd3.tokenizer, sd3.tokenizer_2, sd3.tokenizer_3):
            parts += [type(tokenizer).__name__, str(len(tokenizer)), str(tokenizer.model_max_length),
                      json.dumps(tokenizer.get_vocab(), sort_keys=True)]
        return "sd3-text:" + hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]

    @classmethod
    def from_pretrained(cls, root: str, torch_dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None,
                        storage_options: dict[str, Any] | None = None, **kwargs: Any) -> PromptEncoder:
        """Load the text encoders and tokenizers of a Stable Diffusion 3(.5) root (local path or fsspec URL)."""
        import transformers

        device = resolve_device(device)
        dtype = resolve_dtype(torch_dtype, device)
        with fsspec.open(f"{str(root).rstrip('/')}/model_index.json", "rb", **(storage_options or {})) as f:
            index = json.load(f)
        components = {}
        for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"):
            if not index.get(name) or index[name][0] is None:
                raise ValueError(f"{root} has no {name}; SD3 text encoding needs all three encoders")
            component_cls = getattr(transformers, index[name][1])
            folder = local_copy(str(root), name, storage_options)
            extra = {"torch_dtype": dtype} if name.startswith("text_encoder") else {}
            components[name] = component_cls.from_pretrained(folder, **extra)
        return cls(**components, device=device, **kwargs)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[PromptEmbedding]:
        embeds, _, pooled, _ = self._sd3.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return [PromptEmbedding(e.float().cpu(), p.float().cpu()) for e, p in zip(embeds, pooled)]

    def close(self) -> None:
        """Drop the encoders (and their GPU memory)."""
        self._sd3 = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> PromptEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_optional(root: str, relative: str, storage_options: dict[str, Any] | None) -> bytes | None:
    fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
    try:
        return fs.cat_file(f"{path.rstrip('/')}/{relative}")
    except FileNotFoundError:
        return None


def load_null_prompt_embedding(root: str, storage_options: dict[str, Any] | None = None) -> PromptEmbedding | None:
    """The null-prompt embedding stored in a model root, or ``None`` when it has none.

    Looks for ``prompt_embeds/null.safetensors``, then the official ``NULL_prompt_embeds.pt`` and
    ``NULL_pooled_prompt_embeds.pt`` (in the root or in ``prompt_embeds/``).
    """
    data = _read_optional(root, NULL_EMBEDDING_PATH, storage_options)
    if data is not None:
        return PromptEmbedding.from_bytes(data)
    for folder in ("", "prompt_embeds/"):
        files = [_read_optional(root, folder + name, storage_options) for name in OFFICIAL_NULL_FILES]
        if all(f is not None for f in files):
            tensors = [torch.load(io.BytesIO(f), map_location="cpu", weights_only=True) for f in files]
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                raise ValueError(f"{root}/{folder}NULL_*.pt must each hold a single tensor")
            return PromptEmbedding.from_tensors(tensors[0].float(), tensors[1].float())
    return None


def save_null_prompt_embedding(root: str, embedding: PromptEmbedding,
                               storage_options: dict[str, Any] | None = None) -> str:
    fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
    target = f"{path.rstrip('/')}/{NULL_EMBEDDING_PATH}"
    write_atomic(fs, target, embedding.to_bytes({"prompt": ""}))
    return target
