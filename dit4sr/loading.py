"""Reading model roots: ``model_index.json`` components from a local path or fsspec URL (or ``"bundled"``)."""

from __future__ import annotations

import json
import os
from typing import Any

import fsspec
import torch

from .files import local_copy

BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled", "dit4sr-tiny")
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


def resolve_root(location: str | os.PathLike) -> str:
    return BUNDLED_MODEL if str(location) == "bundled" else str(location)


def read_json(root: str, name: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """``root/name`` parsed, or ``None`` when the file does not exist."""
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    try:
        return json.loads(fs.cat_file(f"{path.rstrip('/')}/{name}"))
    except FileNotFoundError:
        return None


def _component_class(library: str, name: str):
    import diffusers
    import transformers

    import dit4sr

    modules = {"dit4sr": dit4sr, "diffusers": diffusers, "transformers": transformers}
    library = library.split(".")[0]  # save_pretrained records custom classes by module path
    if library not in modules or not hasattr(modules[library], name):
        raise ValueError(f"unknown component class {library}.{name} in model_index.json")
    return getattr(modules[library], name)


def load_component(root: str, name: str, spec: list, dtype: torch.dtype, storage_options) -> Any:
    """The component ``name`` of a root, as ``model_index.json`` names its class (``spec``)."""
    cls = _component_class(*spec)
    folder = local_copy(root, name, storage_options)
    if not issubclass(cls, torch.nn.Module):  # tokenizers, schedulers
        return cls.from_pretrained(folder)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder))
    if not has_weights:  # parameter-free modules such as PixelUnshuffleAutoencoder
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast, even with none.
        return torch.nn.Module.to(cls.from_config(cls.load_config(folder)), dtype)
    return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)  # never unpickle weights
