"""Q-Pert in the pooling head (nn.MultiheadAttention) of tiny random SigLIP models (the real classes).

The vision tower is 30 px with 7 px patches: the 4 x 4 grid covers 28 px and the stride-7
patch embedding drops the last 2, as SigLIP So400m/14 at 384 px drops 6.
"""

from __future__ import annotations

import pytest
import torch
from helpers.contract import (
    BOXES,
    SIZES,
    assert_detach_restores,
    assert_inactive_is_bit_identical,
    assert_matches_reference,
)
from helpers.models import tiny_siglip, tiny_siglip_config
from helpers.reference_hooks import ReferenceHooks, stretch_objects
from transformers import SiglipImageProcessor, SiglipProcessor, SiglipVisionModel

import qpert
from qpert.core import prepare_boxes, token_weights
from qpert.models.registry import MODELS, family_of
from qpert.models.tiny import tiny_processor

CONFIGS = [
    dict(alpha=1.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=0.6, weight="inv_area", threshold=0.8, keep_norm=True, mode="enhance"),
    dict(alpha=0.8, weight="area", rank=2, keep_norm=False, mode="enhance"),
    dict(alpha=1.0, weight="constant", threshold=0.95, keep_norm=False, mode="orthogonal"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_siglip()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))


def pooled(model, pixels):
    with torch.no_grad():
        return model.vision_model(pixel_values=pixels).pooler_output


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c.get('rank') or c['threshold']}-{c['mode']}-kn{c['keep_norm']}"
)
def test_matches_plain_reference(model, pixels, cfg):
    def reference():
        ref = ReferenceHooks(stretch_objects(BOXES, SIZES, input_size=30, grid=4, patch=7, prefix=0), cfg)
        ref.mha(model.vision_model.head.attention)
        return ref

    handle = assert_matches_reference(model, lambda: pooled(model, pixels), reference, cfg)
    assert handle.num_layers == 1 and handle.layout.num_tokens == 16


def test_bit_identical_when_inactive(model, pixels):
    # a box on the pixels the patch embedding drops (x 28..30 of 30 after the stretch) covers no token
    assert_inactive_is_bit_identical(
        model, lambda: pooled(model, pixels), alpha=1.0, boxes_on_no_token=[[[112.0, 0.0, 120.0, 100.0]], [], []]
    )


def test_detach_restores_model(model, pixels):
    assert_detach_restores(model, lambda: pooled(model, pixels), BOXES, SIZES)


def test_box_on_one_patch_maps_to_that_token(model):
    """A 120x60 image stretched to 30x30: patch (row 1, col 2), input x 14..21, y 7..14, is x 56..84, y 14..28."""
    weights = token_weights(
        prepare_boxes([[[56.0, 14.0, 84.0, 28.0]]], [(60, 120)]), family_of(model).token_layout(model)
    )
    expected = torch.zeros(16)
    expected[1 * 4 + 2] = 1.0
    assert torch.equal(weights[0, 0], expected)


def test_vision_model_alone_matches_full_model(model, pixels):
    vision = SiglipVisionModel(tiny_siglip_config().vision_config).eval()
    vision.load_state_dict(model.vision_model.state_dict())
    results = []
    for m, tower in ((model, model.vision_model), (vision, vision)):
        handle = qpert.attach(m, qpert.QPertConfig(alpha=1.0))
        try:
            with handle.objects(BOXES, SIZES), torch.no_grad():
                results.append(tower(pixel_values=pixels).pooler_output)
        finally:
            handle.detach()
    assert torch.equal(results[0], results[1])


def test_half_precision_runs_without_nan(pixels):
    model = tiny_siglip(seed=3).to(torch.bfloat16)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=1.0))
    try:
        with handle.objects(BOXES, SIZES):
            out = pooled(model, pixels.to(torch.bfloat16))
    finally:
        handle.detach()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_registry_and_loading_a_saved_siglip(tmp_path, pixels):
    for name, hub in (
        ("siglip-so400m", "google/siglip-so400m-patch14-384"),
        ("siglip2-so400m", "google/siglip2-so400m-patch14-384"),
    ):
        assert MODELS[name].source == hub and MODELS[name].model_class == "SiglipModel"
    tiny_siglip(seed=5).save_pretrained(tmp_path)
    tokenizer = tiny_processor(["a", "cat"], str(tmp_path)).tokenizer
    SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": 30, "width": 30}), tokenizer=tokenizer
    ).save_pretrained(tmp_path)
    loaded = qpert.load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "SiglipModel" and type(loaded.processor).__name__ == "SiglipProcessor"
    handle = qpert.attach(loaded.model, qpert.QPertConfig(alpha=1.0))
    try:
        with handle.objects(BOXES, SIZES):
            assert torch.isfinite(pooled(loaded.model, pixels)).all()
    finally:
        handle.detach()
