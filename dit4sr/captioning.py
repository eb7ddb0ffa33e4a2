"""Captions as prompts, as the paper runs DiT4SR "with LLaVA": a vision-language model describes each
low-resolution input, sentences about focus and blur are dropped, and the rest is the prompt (the pipeline then
appends ``added_prompt`` and guides against ``negative_prompt`` as for any prompt).

The official test script asks LLaVA-v1.5-13B ``OFFICIAL_CAPTION_QUESTION`` about the LR image, joins the answer's
lines, and filters it with ``remove_focus_sentences``. ``ImageCaptioner`` does the same with any Hugging Face
image-text-to-text model that has a chat template (``AutoProcessor`` + ``AutoModelForImageTextToText``;
``llava-hf/llava-1.5-13b-hf`` is the paper's model in that layout), from a local folder or an fsspec URL.

Deliberate difference: the official agent samples (temperature 0.2, top-p 0.7); here decoding is greedy, and each
image is generated on its own (never padded into a batch), so the same image gives the same caption on any
worker, in any batch — the caption is part of what an output depends on.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import fsspec
import numpy as np
import PIL.Image
import torch

from .devices import resolve_device, resolve_dtype
from .files import local_copy
from .image_processing import to_float_rgb, to_pil

OFFICIAL_CAPTION_QUESTION = (
    "Please describe the actual objects in the image in a very detailed manner. "
    "Please do not include descriptions related to the focus and bokeh of this image. "
    "Please do not include descriptions like the background is blurred."
)
OFFICIAL_MAX_NEW_TOKENS = 512  # the official LLaVA agent's limit
# A sentence containing any of these (case-insensitive, anywhere in a word: "blurry", "positioned") is dropped.
FOCUS_WORDS = ("focus", "focal", "prominent", "close-up", "black and white", "blur", "depth", "dense", "locate",
               "position")
# Bumped when the captions of the same model and settings change (prompt building, decoding, filtering).
CAPTIONING_VERSION = "1"
# Files that make a model folder's identity (besides every file's name and size): what it computes and how its
# inputs are built, read without downloading weights.
_IDENTITY_FILES = ("config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
                   "tokenizer_config.json", "chat_template.jinja", "chat_template.json")


def remove_focus_sentences(text: str) -> str:
    """The official filter: split after every ``.``, ``?`` and ``!`` (each mark ends a sentence, so ``e.g.`` is
    two), drop the pieces that mention any of ``FOCUS_WORDS``, join the rest unchanged and strip the ends."""
    pieces = re.split(r"(?<=[.?!])", text)
    return "".join(piece for piece in pieces if not any(word in piece.lower() for word in FOCUS_WORDS)).strip()


def clean_answer(text: str) -> str:
    """The official agent's tidying of an answer: outer whitespace stripped, line breaks become spaces."""
    return text.strip().replace("\n", " ").replace("\r", " ")


def inspect_caption_model(root: str, storage_options: dict[str, Any] | None = None) -> str:
    """Check from its small files alone (no weights read) that ``root`` (local path or fsspec URL) holds an
    image-text-to-text model with a chat template, and return its identity for fingerprints: a hash of those files
    and of every file's name and size. Raises ``ValueError`` naming what is wrong, ``OSError`` when unreadable."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    fs, path = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
    path = path.rstrip("/")
    listing = fs.find(path, detail=True)
    files = sorted((name[len(path) + 1:], info.get("size")) for name, info in listing.items()
                   if not name[len(path) + 1:].startswith("."))
    small = {relative: fs.cat_file(f"{path}/{relative}").decode("utf-8", "replace")
             for relative, _ in files if relative in _IDENTITY_FILES}
    if "config.json" not in small:
        raise ValueError("no config.json there: not a Hugging Face model folder (e.g. llava-hf/llava-1.5-13b-hf "
                         "as downloaded)" if files else "no such folder, or it is empty")
    model_type = json.loads(small["config.json"]).get("model_type")
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"its config.json describes a {model_type!r} model, not an image-text-to-text model "
                         "(transformers' AutoModelForImageTextToText)")
    if not any(name.startswith("chat_template") for name in small) and not any(
            "chat_template" in json.loads(small.get(name) or "{}")
            for name in ("processor_config.json", "tokenizer_config.json")):
        raise ValueError("it has no chat template (chat_template.jinja/.json, or in processor_config.json or "
                         "tokenizer_config.json): the question cannot be put to it")
    return hashlib.sha256(json.dumps([files, small], sort_keys=True).encode()).hexdigest()[:16]


class ImageCaptioner:
    """Greedy captions of images from an image-text-to-text model (see the module docs).

    ``calls`` counts the images captioned, so callers can report how many captions a run really generated.
    """

    def __init__(self, model: torch.nn.Module, processor: Any, *, question: str = OFFICIAL_CAPTION_QUESTION,
                 max_new_tokens: int = OFFICIAL_MAX_NEW_TOKENS, filter_focus_sentences: bool = True):
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("the caption model's processor has no chat template: cannot build its question")
        self.model, self.processor = model.eval(), processor
        self.question, self.max_new_tokens = question, max_new_tokens
        self.filter_focus_sentences = filter_focus_sentences
        self.prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True)
        self.calls = 0

    @classmethod
    def from_pretrained(cls, root: str, *, torch_dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, storage_options: dict[str, Any] | None = None,
                        **kwargs: Any) -> ImageCaptioner:
        """Load processor and model from a Hugging Face folder (local path or fsspec URL, copied once per machine).
        dtype and device default to bfloat16 on CUDA, float32 on the CPU."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = resolve_device(device)
        folder = local_copy(str(root), storage_options=storage_options)
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=resolve_dtype(torch_dtype, device))
        return cls(model.to(device), processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def raw_answer(self, image: PIL.Image.Image | np.ndarray) -> str:
        """The model's answer to the question about ``image`` (PIL, or float HxWxC in [0, 1]; alpha ignored)."""
        rgb, _ = to_float_rgb(image)
        inputs = self.processor(images=[to_pil(rgb)], text=[self.prompt], return_tensors="pt").to(self.device)
        floating = self.model.dtype
        inputs = {key: value.to(floating) if value.is_floating_point() else value for key, value in inputs.items()}
        output = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        self.calls += 1
        answer = output[0, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(answer[None], skip_special_tokens=True)[0]

    def caption(self, image: PIL.Image.Image | np.ndarray) -> str:
        """The prompt text for ``image``: the cleaned answer, focus/blur sentences removed (unless turned off)."""
        answer = clean_answer(self.raw_answer(image))
        return remove_focus_sentences(answer) if self.filter_focus_sentences else answer

    def captions(self, images: list[PIL.Image.Image | np.ndarray]) -> list[str]:
        return [self.caption(image) for image in images]
