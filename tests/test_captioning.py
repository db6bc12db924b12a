"""Captioning with Q-Pert on tiny random Blip2ForConditionalGeneration models (OPT and T5 language models)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.bench import WORDS, qpert_cli
from PIL import Image

import qpert
from qpert.errors import UnsupportedModelError
from qpert.models.registry import LoadedModel
from qpert.models.tiny import tiny_blip2, tiny_blip2_captioner, tiny_processor

BOXES = [[5.0, 5.0, 40.0, 30.0], [50.0, 20.0, 80.0, 55.0]]
CONFIG = qpert.QPertConfig(alpha=8.0)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("language_model", ["opt", "t5"])
def test_qpert_changes_some_caption_and_a_saved_checkpoint_reproduces_it(language_model, image_file, tmp_path):
    image = Image.open(image_file)
    processor = tiny_processor(WORDS, str(tmp_path))
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    for seed in range(8):
        model = tiny_blip2_captioner(seed, language_model, image_token)
        captions = qpert.caption(LoadedModel("tiny", model, processor, None), image, BOXES, CONFIG, max_new_tokens=8)
        if captions.baseline != captions.qpert:
            break
    else:
        pytest.fail("Q-Pert changed no caption of 8 random captioners")
    off = qpert.caption(
        LoadedModel("tiny", model, processor, None), image, BOXES, qpert.QPertConfig(alpha=0.0), max_new_tokens=8
    )
    assert off.qpert == off.baseline == captions.baseline

    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    loaded = qpert.load_model(str(tmp_path / "model"))
    assert qpert.caption(loaded, image, BOXES, CONFIG, max_new_tokens=8) == captions
    if language_model == "opt":
        out = qpert_cli(
            "caption",
            str(image_file),
            "--model",
            str(tmp_path / "model"),
            "--max-new-tokens",
            "8",
            *(a for b in BOXES for a in ("--box", ",".join(f"{v:g}" for v in b))),
        )
        assert out.returncode == 0, out.stderr
        lines = [line.strip() for line in out.stdout.splitlines()]
        assert f"baseline: {captions.baseline}".strip() in lines and f"Q-Pert:   {captions.qpert}".strip() in lines


def test_caption_needs_a_captioner(image_file):
    with pytest.raises(UnsupportedModelError, match="Blip2ForConditionalGeneration"):
        qpert.caption(LoadedModel("r", tiny_blip2(seed=0), None, None), Image.open(image_file), BOXES, CONFIG)
