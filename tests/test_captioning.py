"""dit4sr.captioning: the official focus/blur filter on fixed strings, greedy captions from the session's tiny random
LLaVA (tiny_caption_model_root: built from configs, no hub), loading from a bucket, and the model-folder checks."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from support.catalog import small_catalog

from dit4sr.captioning import (
    OFFICIAL_CAPTION_QUESTION,
    ImageCaptioner,
    clean_answer,
    inspect_caption_model,
    remove_focus_sentences,
)

# What the official test script's remove_focus_sentences returns (re.split on [.?!] keeping the mark, pieces with a
# prohibited word dropped — substrings, any case — the rest joined and stripped), worked out by hand.
OFFICIAL_FILTER = [
    ("A red car is parked on the street. The background is blurred. A man walks by.",
     "A red car is parked on the street. A man walks by."),
    ("The photo is in black and white! Is it in Focus? Trees line the road.", "Trees line the road."),
    ("The cat is positioned near a blurry window. It sleeps.", "It sleeps."),  # substrings: position, blur
    ("Fruits, e.g. apples, sit in a dense bowl. A knife lies beside.", "Fruits, e.g. A knife lies beside."),
    ("A boat on a lake. Depth of field is shallow", "A boat on a lake."),  # a last piece without its mark
    ("Wait... a close-up of a bee!", "Wait..."),
    ("Located downtown, the tower is prominent. Clouds drift.", "Clouds drift."),
    ("The focal point is a vase.", ""),
    ("  Sharp leaves.  ", "Sharp leaves."),
    ("", ""),
]


@pytest.mark.parametrize("text, expected", OFFICIAL_FILTER)
def test_the_filter_does_what_the_official_remove_focus_sentences_does(text, expected):
    assert remove_focus_sentences(text) == expected


def test_answers_are_tidied_as_the_official_agent_does_before_filtering():
    answer = " A dog.\nThe focus is on the dog.\r\nGrass. \n"
    assert clean_answer(answer) == "A dog. The focus is on the dog.  Grass."
    assert remove_focus_sentences(clean_answer(answer)) == "A dog.  Grass."


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models generate token by token: on the shared machine one thread is many times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photos() -> list[Image.Image]:
    return [Image.open(io.BytesIO(data)).convert("RGB") for data in small_catalog(6).values()]


def test_greedy_captions_repeat_on_another_instance_and_differ_between_images(tiny_caption_model_root):
    first = ImageCaptioner.from_pretrained(str(tiny_caption_model_root), max_new_tokens=12)
    second = ImageCaptioner.from_pretrained(str(tiny_caption_model_root), max_new_tokens=12)
    photos = _photos()
    captions = first.captions(photos)
    assert second.captions(list(reversed(photos))) == list(reversed(captions))
    assert len(set(captions)) == len(photos) and all(captions)  # the tiny model tells these photos apart
    assert first.calls == second.calls == len(photos)
    assert first.question == OFFICIAL_CAPTION_QUESTION and OFFICIAL_CAPTION_QUESTION in first.prompt
    # arrays (as the catalog hands them over: float RGB(A) in [0, 1]) caption as the same picture does
    pixels = np.asarray(photos[0], dtype=np.float32) / 255
    assert first.caption(pixels) == captions[0]
    assert first.caption(np.dstack([pixels, np.ones_like(pixels[..., :1])])) == captions[0]  # alpha ignored


def test_the_caption_is_the_filtered_answer_within_the_token_limit(tiny_caption_model_root):
    unfiltered = ImageCaptioner.from_pretrained(str(tiny_caption_model_root), max_new_tokens=12,
                                                filter_focus_sentences=False)
    filtered = ImageCaptioner.from_pretrained(str(tiny_caption_model_root), max_new_tokens=12)
    short = ImageCaptioner.from_pretrained(str(tiny_caption_model_root), max_new_tokens=3)
    images = [np.random.default_rng(seed).random((20, 30, 3), dtype=np.float32) for seed in range(6)]
    answers = [unfiltered.caption(image) for image in images]
    assert [filtered.caption(image) for image in images] == [remove_focus_sentences(a) for a in answers]
    assert sum(remove_focus_sentences(a) != a for a in answers) >= 3  # the tiny model likes to mention blur
    for image in images:
        tokens = short.processor.tokenizer(short.raw_answer(image), add_special_tokens=False)["input_ids"]
        assert len(tokens) <= 3


def test_a_caption_model_loads_from_a_bucket(tiny_caption_model_root, bucket, s3_options, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("DIT4SR_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3", **s3_options)
    fs.put(str(tiny_caption_model_root), f"{bucket}/models/llava", recursive=True)
    url = f"s3://{bucket}/models/llava"
    assert inspect_caption_model(url, s3_options) == inspect_caption_model(str(tiny_caption_model_root))
    remote = ImageCaptioner.from_pretrained(url, storage_options=s3_options, max_new_tokens=12)
    local = ImageCaptioner.from_pretrained(str(tiny_caption_model_root), max_new_tokens=12)
    assert remote.captions(_photos()) == local.captions(_photos())


def test_folders_that_cannot_caption_are_named(tiny_caption_model_root, tiny_text_model_root, tmp_path):
    with pytest.raises(ValueError, match="no such folder, or it is empty"):
        inspect_caption_model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no config.json there"):
        inspect_caption_model(str(tiny_text_model_root))  # a diffusers root, not a transformers model
    with pytest.raises(ValueError, match="'clip_text_model' model, not an image-text-to-text model"):
        inspect_caption_model(str(tiny_text_model_root / "text_encoder"))
    untemplated = tmp_path / "untemplated"
    shutil.copytree(tiny_caption_model_root, untemplated)
    (untemplated / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((untemplated / "processor_config.json").read_text())
    with pytest.raises(ValueError, match="no chat template"):
        inspect_caption_model(str(untemplated))
    # the identity changes with what decides captions, e.g. the template, not with where the folder is
    moved = tmp_path / "moved"
    shutil.copytree(tiny_caption_model_root, moved)
    assert inspect_caption_model(str(moved)) == inspect_caption_model(str(tiny_caption_model_root))
    (moved / "chat_template.jinja").write_text((moved / "chat_template.jinja").read_text() + " ")
    assert inspect_caption_model(str(moved)) != inspect_caption_model(str(tiny_caption_model_root))
