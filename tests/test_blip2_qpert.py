"""Q-Pert on a tiny random Blip2ForImageTextRetrieval (the real transformers class)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from helpers.contract import (
    BOXES,
    SIZES,
    assert_detach_restores,
    assert_inactive_is_bit_identical,
    assert_matches_reference,
)
from helpers.reference import ReferenceQPert

import qpert
from qpert.adapters import find_bert_cross_attentions
from qpert.models import blip2 as B
from qpert.models.tiny import randomize, tiny_blip2


@pytest.fixture(scope="module")
def model():
    return tiny_blip2(seed=0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    px = torch.randn(3, 3, 28, 28, generator=g)
    ids = torch.randint(5, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return dict(pixel_values=px, input_ids=ids, attention_mask=mask)


def run(model, inputs, itm):
    with torch.no_grad():
        return model(**inputs, use_image_text_matching_head=itm).logits_per_image


CONFIGS = [
    dict(alpha=8.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=2.0, weight="area", threshold=0.9, keep_norm=False, mode="enhance"),
    dict(alpha=4.0, weight="inv_area", threshold=0.8, keep_norm=True, mode="enhance"),
    dict(alpha=6.0, weight="centered", rank=2, keep_norm=False, mode="enhance"),
    dict(alpha=10.0, weight="inv_centered", rank=8, keep_norm=False, mode="enhance"),
    dict(alpha=1.0, weight="constant", threshold=0.95, keep_norm=False, mode="orthogonal"),
    dict(alpha=3.0, weight="area", rank=3, keep_norm=True, mode="enhance"),
]


@pytest.mark.parametrize("itm", [False, True], ids=["itc", "itm"])
@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c.get('rank') or c['threshold']}-{c['mode']}-kn{c['keep_norm']}"
)
def test_matches_plain_reference(model, inputs, cfg, itm):
    assert_matches_reference(
        model, lambda: run(model, inputs, itm), lambda: ReferenceQPert(model, cfg, BOXES, SIZES), cfg
    )


@pytest.mark.parametrize("itm", [False, True], ids=["itc", "itm"])
def test_bit_identical_when_inactive(model, inputs, itm):
    assert_inactive_is_bit_identical(model, lambda: run(model, inputs, itm), alpha=8.0)


def test_detach_restores_model(model, inputs):
    assert_detach_restores(model, lambda: run(model, inputs, True), BOXES, SIZES)
    handle = qpert.attach(model, qpert.QPertConfig())
    with pytest.raises(RuntimeError, match="already attached"):
        qpert.attach(model)
    handle.detach()
    with pytest.raises(RuntimeError, match="detached"), handle.objects(BOXES, SIZES):
        pass
    qpert.attach(model).detach()  # attachable again


def test_itm_projects_each_images_keys_and_values_once(model, inputs):
    """Pairs given as ``image_index`` into per-image tokens: each cross-attention's key and value linears see one
    row per distinct image, and the logits equal those of per-pair tokens, with and without Q-Pert."""
    handle = qpert.attach(model, qpert.QPertConfig(alpha=6.0, threshold=0.95))
    try:
        tokens = B.image_tokens(model, inputs["pixel_values"])
        subspaces = handle.compute_subspaces(tokens, BOXES, SIZES)
        pairs_img, pairs_txt = torch.tensor([2, 0, 2, 1, 0, 2, 2]), torch.tensor([0, 1, 2, 0, 0, 1, 0])
        ids, mask = inputs["input_ids"][pairs_txt], inputs["attention_mask"][pairs_txt]
        key = find_bert_cross_attentions(model.qformer)[0].module.key
        rows = []
        hook = key.register_forward_hook(lambda _m, args, out: rows.append((args[0].shape[0], out.shape[0])))
        results = {}
        contexts = {"baseline": nullcontext, "qpert": lambda: handle.objects(subspaces=subspaces.select(pairs_img))}
        for name, objects in contexts.items():
            with objects():
                results[name] = (
                    B.itm_scores(model, tokens, ids, mask, image_index=pairs_img),
                    B.itm_scores(model, tokens[pairs_img], ids, mask),
                )
        hook.remove()
        assert rows == [(3, 3), (7, 7)] * 2
        for shared, per_pair in results.values():
            torch.testing.assert_close(shared, per_pair, atol=1e-6, rtol=0)
        assert (results["qpert"][0] - results["baseline"][0]).abs().max() > 1e-3
        assert not key._forward_hooks and not key._forward_pre_hooks
    finally:
        handle.detach()


def test_cached_subspaces_reused_for_many_texts(model, inputs):
    """Subspaces from cached vision tokens, selected per (image, text) pair, equal the on-the-fly path."""
    cfg = qpert.QPertConfig(alpha=6.0, weight="inv_area", threshold=0.95)
    handle = qpert.attach(model, cfg)
    try:
        tokens = B.image_tokens(model, inputs["pixel_values"])
        subspaces = handle.compute_subspaces(tokens, BOXES, SIZES)
        assert subspaces.active.tolist() == [True, True, True]
        # every image against every text, as ITM re-ranking does
        pairs_img = torch.arange(3).repeat_interleave(3)
        pairs_txt = torch.arange(3).repeat(3)
        ids, mask = inputs["input_ids"][pairs_txt], inputs["attention_mask"][pairs_txt]
        with handle.objects(subspaces=subspaces.select(pairs_img)):
            cached = B.itm_scores(model, tokens[pairs_img], ids, mask)
        with handle.objects([BOXES[i] for i in pairs_img], [SIZES[i] for i in pairs_img]):
            fresh = B.itm_scores(model, tokens[pairs_img], ids, mask)
        base = B.itm_scores(model, tokens[pairs_img], ids, mask)
        assert (cached - fresh).abs().max() <= 1e-6
        assert (cached - base).abs().max() > 1e-3
        # one set of subspaces serves every alpha and weight function, a config per block
        other = qpert.QPertConfig(alpha=2.0, weight="centered", threshold=0.95)
        with handle.objects(subspaces=subspaces, config=other):
            a = B.image_embeddings(model, tokens)
        with handle.objects(BOXES, SIZES, config=other):
            b = B.image_embeddings(model, tokens)
        with handle.objects(subspaces=subspaces):
            c = B.image_embeddings(model, tokens)
        assert (a - b).abs().max() <= 1e-6 and (a - c).abs().max() > 1e-4
        assert handle.config == cfg  # no block changes the handle's own config
        with (
            pytest.raises(ValueError, match="threshold"),
            handle.objects(subspaces=subspaces, config=qpert.QPertConfig(threshold=0.9)),
        ):
            pass
        # round trip through tensors (safetensors-friendly)
        again = qpert.Subspaces.from_state_dict(subspaces.state_dict())
        assert again.threshold == 0.95 and all(map(torch.equal, again.mean_projector, subspaces.mean_projector))
    finally:
        handle.detach()


def test_scoring_helpers_match_model_forward(model, inputs):
    with torch.no_grad():
        out_itc = model(**inputs)
        out_itm = model(**inputs, use_image_text_matching_head=True)
    tokens = B.image_tokens(model, inputs["pixel_values"])
    itc = B.itc_scores(
        B.image_embeddings(model, tokens), B.text_embeddings(model, inputs["input_ids"], inputs["attention_mask"])
    )
    assert torch.allclose(itc, out_itc.logits_per_image, atol=1e-6)
    itm = B.itm_scores(model, tokens, inputs["input_ids"], inputs["attention_mask"])
    assert torch.allclose(itm, out_itm.logits_per_image[:, 1], atol=1e-6)


def test_batch_mismatch_is_a_clear_error(model, inputs):
    handle = qpert.attach(model)
    try:
        with (
            pytest.raises(ValueError, match="objects for 2 images but the model's batch has 3"),
            handle.objects(BOXES[:2], SIZES[:2]),
        ):
            run(model, inputs, False)
        with pytest.raises(ValueError, match="3 box lists but 2 image sizes"), handle.objects(BOXES, SIZES[:2]):
            pass
        with pytest.raises(ValueError, match="either boxes"), handle.objects():
            pass
    finally:
        handle.detach()


def test_unsupported_model_names_supported_classes():
    with pytest.raises(TypeError, match="Blip2ForImageTextRetrieval"):
        qpert.attach(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_without_nan(dtype, inputs):
    model = tiny_blip2(seed=3).to(dtype)
    half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    base = run(model, half, True)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=8.0))
    try:
        for itm in (False, True):
            with handle.objects(BOXES, SIZES):
                out = run(model, half, itm)
            assert out.dtype == dtype and torch.isfinite(out.float()).all()
        with handle.objects(BOXES, SIZES):
            assert (run(model, half, True).float() - base.float()).abs().max() > 1e-2
    finally:
        handle.detach()


def test_degenerate_keys_stay_finite(inputs):
    """Zero key projections give all-zero pooled keys: no NaN, objects simply do nothing."""
    model = tiny_blip2(seed=4)
    for layer in model.qformer.encoder.layer:
        if layer.has_cross_attention:
            torch.nn.init.zeros_(layer.crossattention.attention.key.weight)
            torch.nn.init.zeros_(layer.crossattention.attention.key.bias)
    base = run(model, inputs, False)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=8.0, keep_norm=True))
    try:
        with handle.objects(BOXES, SIZES):
            out = run(model, inputs, False)
    finally:
        handle.detach()
    assert torch.isfinite(out).all() and torch.allclose(out, base, atol=1e-6)


def test_other_image_size_layout():
    model = randomize(tiny_blip2(seed=5, image_size=35, patch_size=7), 5)
    handle = qpert.attach(model)
    try:
        assert handle.layout.grid == (5, 5) and handle.layout.num_tokens == 26
    finally:
        handle.detach()
