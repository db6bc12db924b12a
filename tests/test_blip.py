"""Q-Pert on a tiny random BlipForImageTextRetrieval (the real transformers class), ITM pass."""

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
from helpers.models import tiny_blip
from helpers.reference_hooks import ReferenceHooks, stretch_objects
from transformers import BlipProcessor

import qpert
from qpert.core import prepare_boxes, token_weights
from qpert.models.registry import MODELS, family_of
from qpert.models.tiny import tiny_processor

CONFIGS = [
    dict(alpha=8.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=4.0, weight="inv_area", threshold=0.8, keep_norm=True, mode="enhance"),
    dict(alpha=6.0, weight="centered", rank=2, keep_norm=False, mode="enhance"),
    dict(alpha=1.0, weight="constant", threshold=0.95, keep_norm=False, mode="orthogonal"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_blip()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return dict(pixel_values=torch.randn(3, 3, 28, 28, generator=g), input_ids=ids, attention_mask=mask)


def itm(model, inputs, use_itm_head=True):
    with torch.no_grad():
        return model(**inputs, use_itm_head=use_itm_head).itm_score


def reference(model, cfg):
    objects = stretch_objects(BOXES, SIZES, input_size=28, grid=4, patch=7, prefix=1)
    ref = ReferenceHooks(objects, cfg)
    for layer in model.text_encoder.encoder.layer:
        ref.bert(layer.crossattention.self)
    return ref


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c.get('rank') or c['threshold']}-{c['mode']}-kn{c['keep_norm']}"
)
def test_matches_plain_reference(model, inputs, cfg):
    handle = assert_matches_reference(model, lambda: itm(model, inputs), lambda: reference(model, cfg), cfg)
    assert handle.num_layers == 3 and handle.layout.num_tokens == 17


def test_bit_identical_when_inactive(model, inputs):
    assert_inactive_is_bit_identical(model, lambda: itm(model, inputs), alpha=8.0)
    base_itc = itm(model, inputs, use_itm_head=False)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=8.0))
    try:
        with handle.objects(BOXES, SIZES):  # the ITC pass has no cross-attention
            assert torch.equal(itm(model, inputs, use_itm_head=False), base_itc)
    finally:
        handle.detach()


def test_detach_restores_model(model, inputs):
    assert_detach_restores(model, lambda: itm(model, inputs), BOXES, SIZES)


def test_box_on_one_patch_maps_to_that_token(model):
    """An 84x56 image stretched to 28x28 (patch 7): patch (row 1, col 2) is x 42..63, y 14..28 in the image."""
    layout = family_of(model).token_layout(model)
    weights = token_weights(prepare_boxes([[[42.0, 14.0, 63.0, 28.0]]], [(56, 84)]), layout)
    assert weights.shape == (1, 1, 17)
    expected = torch.zeros(17)
    expected[1 + 1 * 4 + 2] = 1.0
    assert torch.equal(weights[0, 0], expected)


def test_registry_and_loading_a_saved_blip(tmp_path, inputs):
    assert {"blip-coco", "blip-flickr"} <= set(MODELS)
    assert MODELS["blip-coco"].source == "Salesforce/blip-itm-large-coco" and MODELS["blip-coco"].image_size == 384
    assert (MODELS["blip-coco"].rerank_k, MODELS["blip-flickr"].rerank_k, MODELS["blip2-coco"].rerank_k) == (
        256,
        128,
        64,
    )
    tiny_blip(seed=5).save_pretrained(tmp_path)
    blip2_processor = tiny_processor(["a", "red", "square"], str(tmp_path))
    BlipProcessor(image_processor=blip2_processor.image_processor, tokenizer=blip2_processor.tokenizer).save_pretrained(
        tmp_path
    )
    loaded = qpert.load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "BlipForImageTextRetrieval"
    assert type(loaded.processor).__name__ == "BlipProcessor"
    handle = qpert.attach(loaded.model, qpert.QPertConfig(alpha=8.0))
    try:
        with handle.objects(BOXES, SIZES):
            assert torch.isfinite(itm(loaded.model, inputs)).all()
    finally:
        handle.detach()


def test_itm_input_starts_with_enc_and_itc_with_cls(model):
    """BLIP's evaluation replaces [CLS] with [ENC] for ITM only (LAVIS, BLIP's train_retrieval.py)."""
    from qpert.models import blip

    seen = []
    hook = model.text_encoder.embeddings.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs.get("input_ids", args[0] if args else None)), with_kwargs=True
    )
    ids = torch.tensor([[1, 20, 30, 3], [1, 40, 3, 0]])  # [CLS] = 1 in this vocabulary
    mask = (ids > 0).long()
    tokens = model.vision_model(pixel_values=torch.randn(2, 3, 28, 28)).last_hidden_state
    try:
        blip.itm_scores(model, tokens, ids, mask)
        blip.text_embeddings(model, ids, mask)
    finally:
        hook.remove()
    assert blip.enc_token_id(model) == 119
    assert seen[0][:, 0].tolist() == [119, 119] and torch.equal(seen[0][:, 1:], ids[:, 1:])
    assert seen[1][:, 0].tolist() == [1, 1] and ids[:, 0].tolist() == [1, 1]  # the caller's ids are not changed
