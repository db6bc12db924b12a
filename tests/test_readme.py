"""The README's Python examples run as written, with a tiny BLIP-2 standing in for the released weights."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import qpert
from qpert.models.registry import MODELS
from qpert.models.tiny import tiny_blip2, tiny_processor

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)]


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 3, "the README's quick start lost its examples"
    words = ["a", "man", "holding", "small", "red", "umbrella", "busy", "street", "at", "night"]
    loaded = qpert.LoadedModel(
        "blip2-coco", tiny_blip2(seed=0), tiny_processor(words, str(tmp_path)), MODELS["blip2-coco"]
    )
    monkeypatch.setattr(qpert, "load_model", lambda name, **kwargs: loaded)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(tmp_path / "street.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    scores = namespace["scores"]
    assert scores["qpert"].itm.shape == (1, 2) and (scores["qpert"].itm - scores["baseline"].itm).abs().max() > 0
    assert torch.isfinite(namespace["itm"]).all()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules()), "hooks left behind"
