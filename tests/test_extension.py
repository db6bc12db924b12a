"""Extending qpert from outside the package: a family of one's own, a subclass of a supported class,
and a named checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.reference_hooks import ReferenceHooks, stretch_objects
from PIL import Image
from torch import nn
from torch.nn import functional as F

import qpert
from qpert.adapters import find_multihead_attentions
from qpert.core import TokenLayout
from qpert.models.family import QFORMER_ALPHAS, ModelFamily, RetrievalHeads, cosine_scores
from qpert.models.registry import _FAMILIES, MODELS, ModelSpec, family_of, retrieval_heads
from qpert.models.tiny import randomize, tiny_blip2

IMAGE, PATCH, WIDTH = 24, 6, 16


class ToyPoolingModel(nn.Module):
    """Not a transformers or OpenCLIP class: patch tokens pooled by learned queries in an nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.queries = nn.Parameter(torch.randn(1, 2, WIDTH))
        self.pool = nn.MultiheadAttention(WIDTH, num_heads=2, batch_first=True)
        self.words = nn.EmbeddingBag(50, WIDTH)


def toy_tokens(model, pixels):
    return model.patches(pixels).flatten(2).transpose(1, 2)


def toy_image_embeddings(model, tokens):
    pooled, _ = model.pool(model.queries.expand(len(tokens), -1, -1), tokens, tokens, need_weights=False)
    return F.normalize(pooled.mean(1), dim=-1)


TOY = ModelFamily(
    name="toy-pooling",
    classes=(f"{__name__}.ToyPoolingModel",),
    sites=lambda model: find_multihead_attentions(model, ("pool",)),
    token_layout=lambda model: TokenLayout(
        grid=(IMAGE // PATCH, IMAGE // PATCH), patch=(PATCH, PATCH), num_prefix_tokens=0
    ),
    alpha_grid=(0.5, 1.0),
    retrieval=RetrievalHeads(
        image_tokens=toy_tokens,
        image_embeddings=toy_image_embeddings,
        text_embeddings=lambda model, ids, mask: F.normalize(model.words(ids), dim=-1),
        itc_scores=cosine_scores,
        tokenize=lambda model, processor, texts: (
            torch.tensor([[len(t) % 50, 1] for t in texts]),
            torch.ones(len(texts), 2, dtype=torch.long),
        ),
        preprocess=lambda model, processor, images: torch.stack(
            [
                torch.from_numpy(np.asarray(im.resize((IMAGE, IMAGE)), dtype=np.float32) / 255).permute(2, 0, 1)
                for im in images
            ]
        ),
    ),
)


@pytest.fixture
def registered():
    qpert.register_family(TOY)
    yield TOY
    _FAMILIES.remove(TOY)


def test_a_family_registered_from_outside_attaches_scores_and_matches_the_reference(registered):
    torch.manual_seed(0)
    model = randomize(ToyPoolingModel(), seed=1).eval()
    assert family_of(model) is TOY and retrieval_heads(model) is TOY.retrieval
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((36, 48), (30, 30))]
    boxes, sizes = [[[2.0, 3.0, 30.0, 20.0]], [[0.0, 0.0, 12.0, 12.0], [10.0, 10.0, 30.0, 30.0]]], [(36, 48), (30, 30)]
    loaded = qpert.LoadedModel("toy", model, None, None)
    config = qpert.QPertConfig(alpha=1.0, threshold=0.9)
    scores = qpert.score(loaded, images, boxes, ["a red thing", "blue"], config)
    pixels = TOY.retrieval.preprocess(model, None, images)
    tokens = toy_tokens(model, pixels)
    cfg = config.to_dict()
    reference = ReferenceHooks(stretch_objects(boxes, sizes, IMAGE, IMAGE // PATCH, PATCH, 0), cfg).mha(model.pool)
    try:
        with torch.no_grad():
            expected = toy_image_embeddings(model, tokens)
    finally:
        reference.remove()
    text = TOY.retrieval.text_embeddings(model, *TOY.retrieval.tokenize(model, None, ["a red thing", "blue"]))
    assert torch.allclose(scores["qpert"].itc, cosine_scores(expected, text), atol=1e-5)
    assert (scores["qpert"].itc - scores["baseline"].itc).abs().max() > 1e-4
    assert scores["qpert"].itm is None  # the family has no ITM head


def test_registering_a_taken_name_needs_replace(registered):
    with pytest.raises(qpert.QPertError, match="replace=True"):
        qpert.register_family(TOY)
    qpert.register_family(TOY, replace=True)
    assert [f.name for f in qpert.models.registry.families()].count("toy-pooling") == 1


def test_a_subclass_of_a_supported_class_is_supported():
    """Families match by isinstance: a user's subclass of Blip2ForImageTextRetrieval attaches as BLIP-2."""
    model = tiny_blip2(seed=0)
    subclass = type("MyBlip2", (type(model),), {})
    model.__class__ = subclass
    assert family_of(model).name == "blip2" and retrieval_heads(model).has_itm
    with qpert.attach(model) as handle:
        assert handle.num_layers == 2


def test_a_named_checkpoint_registered_from_outside(tmp_path):
    spec = ModelSpec(
        "my-blip2", str(tmp_path), "Blip2ForImageTextRetrieval", family_of(tiny_blip2()), 28, "a local BLIP-2"
    )
    qpert.register_model(spec)
    try:
        assert "my-blip2" in qpert.list_models() and spec.alphas == QFORMER_ALPHAS
        with pytest.raises(qpert.QPertError, match="registered"):
            qpert.register_model(spec)
    finally:
        del MODELS["my-blip2"]
