"""Q-Pert on InternVL-G's QLLaMA cross-attention.

InternVL-G is remote code (``trust_remote_code``) that cannot be imported here, so this file holds
a tiny stand-in with the module structure, attribute names and forward signatures of
``modeling_qllama.py`` (OpenGVLab/InternVL, ``LlamaCrossAttention`` / ``LlamaDecoderLayer`` /
``LlamaModel.forward_train``) and of ``InternVLModel`` (``get_image_features``, ``get_text_features``,
``encode_image``, ``encode_text``) as far as Q-Pert reads them. The cross-attention forward and the
encode methods and the attention pooling (``AttentionPoolingBlock``, ``CrossAttention``) are the real
ones' logic; self-attention and MLP are simplified (a causal mean, a linear), which the retrieval
interface never looks into.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.contract import (
    BOXES,
    SIZES,
    assert_detach_restores,
    assert_inactive_is_bit_identical,
    assert_matches_reference,
)
from helpers.internvl_reference import Reference
from helpers.internvl_standin import (
    HEADS,
    HIDDEN,
    IMAGE,
    LAYERS,
    PATCH,
    POOL_HEADS,
    VISION,
    own_itc,
    tiny_internvl,
    tiny_loaded,
)
from PIL import Image
from torch import nn

import qpert
from qpert.errors import MissingDependencyError, UnsupportedModelError
from qpert.models import internvl
from qpert.models.registry import MODELS, family_of, retrieval_heads
from qpert.scoring import score

CONFIGS = [
    dict(alpha=1.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=0.6, weight="inv_area", threshold=0.8, keep_norm=True, mode="enhance"),
    dict(alpha=0.8, weight="centered", rank=2, keep_norm=False, mode="enhance"),
    dict(alpha=1.0, weight="constant", threshold=0.95, keep_norm=False, mode="orthogonal"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def run(model, pixels, repeat_time=1):
    with torch.no_grad():
        return model(pixels, repeat_time)


def reference(model, cfg):
    """The plain reference in every cross-attention, at the stand-in's sizes."""
    return Reference(model, cfg, BOXES, SIZES, input_size=IMAGE, patch=PATCH)


@pytest.mark.parametrize("repeat_time", [1, 2])
@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c.get('rank') or c['threshold']}-{c['mode']}-kn{c['keep_norm']}"
)
def test_matches_plain_reference(model, pixels, cfg, repeat_time):
    handle = assert_matches_reference(
        model, lambda: run(model, pixels, repeat_time), lambda: reference(model, cfg), cfg
    )
    assert handle.num_layers == LAYERS // 2 + 1 and handle.layout.num_tokens == 1 + (IMAGE // PATCH) ** 2
    handle = qpert.attach(model, qpert.QPertConfig(**cfg))
    try:  # subspaces computed once from the tokens (as an evaluation caches them) perturb the same
        with handle.objects(BOXES, SIZES):
            on_the_fly = run(model, pixels, repeat_time)
        subspaces = handle.compute_subspaces(model.vision_model(pixel_values=pixels)[0], BOXES, SIZES)
        with handle.objects(subspaces=subspaces):
            reused = run(model, pixels, repeat_time)
    finally:
        handle.detach()
    assert (reused - on_the_fly).abs().max() <= 1e-6


def test_bit_identical_when_inactive(model, pixels):
    assert_inactive_is_bit_identical(model, lambda: run(model, pixels), alpha=1.0)
    base = run(model, pixels)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=1.0))
    try:
        with handle.objects([BOXES[0], [], BOXES[2]], SIZES):
            mixed = run(model, pixels, repeat_time=2)
    finally:
        handle.detach()
    tiled = base.repeat(2, 1, 1)  # rows 1 and 4 belong to image 1, which has no boxes
    assert torch.equal(mixed[[1, 4]], tiled[[1, 4]]) and (mixed[0] - tiled[0]).abs().max() > 1e-3


def test_detach_restores_model(model, pixels):
    assert_detach_restores(model, lambda: run(model, pixels), BOXES, SIZES)


def test_family_needs_qllama():
    """transformers' own InternVLModel (the chat models) shares the class name but has no QLLaMA."""
    InternVLModel = type("InternVLModel", (nn.Module,), {})
    with pytest.raises(UnsupportedModelError, match="QLLaMA"):
        family_of(InternVLModel())


def test_registry_entry():
    spec = MODELS["internvl-g"]
    assert spec.source == "OpenGVLab/InternVL-14B-224px" and spec.remote_code and spec.image_size == 224
    assert spec.alphas == (0.2, 0.4, 0.6, 0.8, 1.0)
    assert spec.family.retrieval.load_processor is internvl.load_processor and not spec.family.retrieval.has_itm


def test_remote_code_is_an_explicit_opt_in(tmp_path):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        qpert.load_model("internvl-g")
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["InternVLModel"], "auto_map": {"AutoModel": "modeling_internvl.InternVLModel"}})
    )
    with pytest.raises(ValueError, match="--trust-remote-code"):
        qpert.load_model(str(tmp_path))
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from qpert.cli import main; main()",
            "score",
            str(image),
            "-t",
            "x",
            "--model",
            "internvl-g",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "--trust-remote-code" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- retrieval (qpert score / eval)
TEXTS = ["a small red square", "the green box", "a big blue square in the corner"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return tiny_loaded(tmp_path_factory.mktemp("internvl"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def test_tokenize_as_clip_benchmark(loaded):
    ids, mask = retrieval_heads(loaded.model).tokenize(loaded.model, loaded.processor, TEXTS)
    lengths = mask.sum(1)
    assert ids.shape == (3, 80) and torch.equal(mask, (ids > 0).long())
    assert torch.equal(mask, (torch.arange(80) < lengths[:, None]).long())  # padded on the right
    assert (ids[torch.arange(3), lengths - 1] == loaded.processor.tokenizer.eos_token_id).all()
    assert loaded.processor.tokenizer.decode(ids[2], skip_special_tokens=True) == "summarize:" + TEXTS[2]


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3]], ids=lambda c: f"{c['weight']}-{c['mode']}")
def test_scores_match_own_encoders_and_the_reference(loaded, images, cfg):
    """Baseline: the model's own encoders; Q-Pert: the same with the plain reference in every cross-attention."""
    model, retriever = loaded.model, retrieval_heads(loaded.model)
    pixels = retriever.preprocess(model, loaded.processor, images)
    ids, _ = retriever.tokenize(model, loaded.processor, TEXTS)
    got = score(loaded, images, BOXES, TEXTS, qpert.QPertConfig(**cfg))
    baseline = own_itc(model, pixels, ids)
    ref = reference(model, cfg)
    try:
        expected = own_itc(model, pixels, ids)
    finally:
        ref.remove()
    assert (expected - baseline).abs().max() > 1e-4, "the reference must change the scores, else the test is vacuous"
    assert got["baseline"].itm is None and (got["baseline"].itc - baseline).abs().max() <= 1e-5
    assert (got["qpert"].itc - expected).abs().max() <= 1e-5


def test_preprocess_stretches_to_the_input_size(loaded, images):
    pixels = retrieval_heads(loaded.model).preprocess(loaded.model, loaded.processor, images)
    assert pixels.shape == (3, 3, IMAGE, IMAGE)


def test_object_embeddings_read_the_object_tokens_alone(model, pixels):
    tokens = internvl.image_tokens(model, pixels)
    keep = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    keep[0, 3:9], keep[1, 1:], keep[2] = True, True, True
    roi = internvl.roi_embeddings(model, tokens, keep)
    assert (roi[2] - internvl.image_embeddings(model, tokens)[2]).abs().max() <= 1e-6, "all kept: the image"
    noisy = tokens.clone()
    noisy[~keep] = torch.randn(int((~keep).sum()), tokens.shape[-1])
    assert (internvl.roi_embeddings(model, noisy, keep) - roi).abs().max() <= 1e-6, "other tokens are not read"
    changed = tokens.clone()
    changed[0, 4] += 1.0
    assert (internvl.roi_embeddings(model, changed, keep)[0] - roi[0]).abs().max() > 1e-4


def test_clip_projector_is_perturbed_unless_excluded(loaded, images):
    """The supplement's pooling site: its own head shape, it changes the scores, and exclude= leaves it alone."""
    model, retriever = loaded.model, retrieval_heads(loaded.model)
    tokens = retriever.image_tokens(model, retriever.preprocess(model, loaded.processor, images))
    ids, mask = retriever.tokenize(model, loaded.processor, TEXTS)
    text = retriever.text_embeddings(model, ids, mask)
    config = qpert.QPertConfig(**CONFIGS[0])
    scores = {}
    for exclude in ((), ("clip_projector",)):
        handle = qpert.attach(model, config, exclude=exclude)
        try:
            subspaces = handle.compute_subspaces(tokens, BOXES, SIZES)
            with handle.objects(subspaces=subspaces):
                scores[exclude] = retriever.itc_scores(retriever.image_embeddings(model, tokens), text)
        finally:
            handle.detach()
        shapes = [tuple(t.shape[1:3]) for t in subspaces.mean_projector]
        assert shapes == [(HEADS, HIDDEN // HEADS)] * (LAYERS // 2) + [(POOL_HEADS, VISION // POOL_HEADS)] * (
            not exclude
        )
    assert (scores[()] - scores[("clip_projector",)]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no cross-attention of this model is named"):
        qpert.attach(model, config, exclude=("clip_projectr",))
    with qpert.attach(model, config, exclude=("qllama",)) as handle:  # sites are named by their paths
        assert handle.site_names == ["clip_projector"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pooling_rows_without_boxes_are_bit_identical_in_half_precision(model, pixels, dtype):
    """The pooling site recomputes perturbed attention in float32; an image without boxes keeps the module's own."""
    tokens = internvl.image_tokens(model, pixels).to(dtype)
    pooling = model.clip_projector.to(dtype)
    try:
        with torch.no_grad():
            base = pooling(tokens)
            with (
                qpert.attach(model, qpert.QPertConfig(alpha=1.0)) as handle,
                handle.objects([BOXES[0], [], BOXES[2]], SIZES),
            ):
                mixed = pooling(tokens)
    finally:
        pooling.float()
    assert torch.equal(mixed[1], base[1]) and (mixed[0] - base[0]).abs().max() > 1e-3


def test_missing_packages_are_one_error_line(tmp_path, monkeypatch):
    """The code's imports (peft, einops, timm) are checked before it runs; a tokenizer that fails to load
    for want of sentencepiece / protobuf says so, not transformers' hint at another package (tiktoken)."""
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["InternVLModel"], "auto_map": {"AutoModel": "modeling_internvl.InternVLModel"}})
    )
    monkeypatch.setattr(internvl, "missing_packages", lambda modules: list(modules.values())[:1])
    with pytest.raises(MissingDependencyError, match=r"needs peft: pip install 'qpert\[internvl\]'"):
        qpert.load_model(str(tmp_path), trust_remote_code=True)

    def tiktoken_error(*args, **kwargs):
        raise ValueError("`tiktoken` is required to read a `tiktoken` file")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", tiktoken_error)
    with pytest.raises(MissingDependencyError, match=r"needs sentencepiece: pip install 'qpert\[internvl\]'"):
        internvl.load_processor(str(tmp_path))
    monkeypatch.setattr(internvl, "missing_packages", lambda modules: [])
    with pytest.raises(ValueError, match="tiktoken"):  # nothing missing: transformers' own error
        internvl.load_processor(str(tmp_path))
