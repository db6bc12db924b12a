"""Q-Pert in the pooling head of a tiny random SigLIP 2 NaFlex model (the real ``Siglip2Model``).

Patches of 4 px, at most 20 per image: the real ``Siglip2ImageProcessor`` gives the three images
of the contract batch (100 x 120, 100 x 100, 120 x 80) grids of 4 x 5, 4 x 4 (+ 4 padding tokens)
and 5 x 4; the position embeddings (a 4 x 4 grid) are resized to each.
The reference places boxes on the grids the processor reports (``spatial_shapes``) by a loop
over patches; qpert computes the grids itself from the image sizes.
"""

from __future__ import annotations

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
from helpers.models import MAX_PATCHES, PATCH, TEXT_LENGTH, tiny_siglip2, tiny_siglip2_processor
from helpers.reference_hooks import ReferenceHooks
from PIL import Image

import qpert
from qpert.core import prepare_boxes, token_weights
from qpert.models.registry import MODELS, family_of, retrieval_heads
from qpert.scoring import score

CONFIGS = [
    dict(alpha=1.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=0.6, weight="inv_area", threshold=0.8, keep_norm=True, mode="enhance"),
    dict(alpha=0.8, weight="area", rank=2, keep_norm=False, mode="enhance"),
    dict(alpha=1.0, weight="constant", threshold=0.95, keep_norm=False, mode="orthogonal"),
]


def random_images(sizes) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def model():
    return tiny_siglip2()


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return tiny_siglip2_processor(str(tmp_path_factory.mktemp("siglip2")))


@pytest.fixture(scope="module")
def pixels(processor):
    return processor.image_processor(random_images(SIZES), return_tensors="pt")


def pooled(model, pixels):
    with torch.no_grad():
        return model.vision_model(**pixels).pooler_output


def naflex_objects(boxes, sizes, shapes):
    """[(token coverage, area)] per image: each box stretched onto its image's grid, one patch at a time."""
    objects = []
    for img, (h, w), (rows, cols) in zip(boxes, sizes, shapes):
        sx, sy = cols * PATCH / w, rows * PATCH / h
        kept = []
        for box in img:
            x0, x1 = np.clip([box[0], box[2]], 0, w) * sx
            y0, y1 = np.clip([box[1], box[3]], 0, h) * sy
            m = np.zeros(MAX_PATCHES)
            for r in range(rows):
                for c in range(cols):
                    ix = max(0.0, min(x1, (c + 1) * PATCH) - max(x0, c * PATCH))
                    iy = max(0.0, min(y1, (r + 1) * PATCH) - max(y0, r * PATCH))
                    m[r * cols + c] = ix * iy / PATCH**2
            kept.append((m, (x1 - x0) * (y1 - y0) / (sx * sy * h * w)))
        objects.append(kept)
    return objects


def test_the_batch_has_different_grids(pixels):
    assert pixels["spatial_shapes"].tolist() == [[4, 5], [4, 4], [5, 4]]
    assert pixels["pixel_attention_mask"].sum(1).tolist() == [20, 16, 20]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c.get('rank') or c['threshold']}-{c['mode']}-kn{c['keep_norm']}"
)
def test_matches_plain_reference(model, pixels, cfg):
    def reference():
        ref = ReferenceHooks(naflex_objects(BOXES, SIZES, pixels["spatial_shapes"].tolist()), cfg)
        ref.mha(model.vision_model.head.attention)
        return ref

    assert_matches_reference(model, lambda: pooled(model, pixels), reference, cfg)


def test_bit_identical_when_inactive(model, pixels):
    assert_inactive_is_bit_identical(model, lambda: pooled(model, pixels), alpha=1.0)


def test_detach_restores_model(model, pixels):
    assert_detach_restores(model, lambda: pooled(model, pixels), BOXES, SIZES)


def test_box_on_one_patch_maps_to_that_token_on_each_grid(model, processor):
    """24 x 40 becomes 3 x 5 patches (12 x 20 px), 40 x 24 becomes 5 x 3: one box per image covering
    exactly patch (row 1, col 2) of the first (x 16..24, y 8..16) and (row 3, col 1) of the second."""
    sizes = [(24, 40), (40, 24)]
    pixels = processor.image_processor(random_images(sizes), return_tensors="pt")
    assert pixels["spatial_shapes"].tolist() == [[3, 5], [5, 3]]
    boxes = [[[16.0, 8.0, 24.0, 16.0]], [[8.0, 24.0, 16.0, 32.0]]]
    weights = token_weights(
        prepare_boxes(boxes, sizes), family_of(model).token_layout(model), num_tokens=pixels["pixel_values"].shape[1]
    )
    expected = torch.zeros(2, 1, MAX_PATCHES)
    expected[0, 0, 1 * 5 + 2] = expected[1, 0, 3 * 3 + 1] = 1.0
    assert torch.equal(weights, expected)
    whole = token_weights(
        prepare_boxes([[[0, 0, w, h]] for h, w in sizes], sizes),
        family_of(model).token_layout(model),
        num_tokens=MAX_PATCHES,
    )[:, 0]
    assert torch.equal(whole > 0, pixels["pixel_attention_mask"].bool())  # padding tokens get weight 0


def test_padding_tokens_stay_masked(model, processor, pixels):
    """With Q-Pert on, what the padding tokens hold still does not reach the embedding."""
    retriever = retrieval_heads(model)
    tokens = retriever.image_tokens(
        model, {k: pixels[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    )
    padding = tokens[..., -1] == 0
    assert padding.any()
    noisy = tokens.clone()
    noisy[..., :-1][padding] = 10 * torch.randn(int(padding.sum()), tokens.shape[-1] - 1)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=1.0))
    try:
        subspaces = handle.compute_subspaces(tokens, BOXES, SIZES)  # the family drops the mask channel itself
        with handle.objects(subspaces=subspaces):
            clean, dirty = retriever.image_embeddings(model, tokens), retriever.image_embeddings(model, noisy)
    finally:
        handle.detach()
    assert (clean - dirty).abs().max() <= 1e-6


def test_registry_and_scores_of_a_saved_model(tmp_path):
    """Loaded from disk as ``qpert score`` loads it: scores equal the model's own forward, without and with Q-Pert."""
    spec = MODELS["siglip2-so400m-naflex"]
    assert (spec.source, spec.model_class, spec.alphas) == (
        "google/siglip2-so400m-patch16-naflex",
        "Siglip2Model",
        (0.2, 0.4, 0.6, 0.8, 1.0),
    )
    tiny_siglip2(seed=1).save_pretrained(tmp_path)
    tiny_siglip2_processor(str(tmp_path)).save_pretrained(tmp_path)
    loaded = qpert.load_model(str(tmp_path))
    model, processor = loaded.model, loaded.processor
    assert (type(model).__name__, type(processor).__name__) == ("Siglip2Model", "Siglip2Processor")
    images, texts = random_images(SIZES), ["a small red square", "the green box"]
    config = qpert.QPertConfig(alpha=1.0)
    got = score(loaded, images, BOXES, texts, config)

    inputs = processor.image_processor(images, return_tensors="pt")  # its own patch size, not the processor's default
    ids = processor.tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt").input_ids

    def own_scores():
        with torch.no_grad():
            out = model(input_ids=ids, **inputs)
        return (out.logits_per_image - model.logit_bias) / model.logit_scale.exp()

    baseline = own_scores()
    handle = qpert.attach(model, config)
    try:
        with handle.objects(BOXES, SIZES):
            perturbed = own_scores()
    finally:
        handle.detach()
    assert torch.allclose(got["baseline"].itc, baseline, atol=1e-5)
    assert torch.allclose(got["qpert"].itc, perturbed, atol=1e-5)
    assert (got["qpert"].itc - got["baseline"].itc).abs().max() > 1e-4


def test_whole_image_box_pools_every_patch(model, pixels):
    """The object embedding of a box covering the image is the image embedding (no prefix token, padding masked)."""
    retriever = retrieval_heads(model)
    tokens = retriever.image_tokens(
        model, {k: pixels[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    )
    keep = (
        token_weights(
            prepare_boxes([[[0, 0, w, h]] for h, w in SIZES], SIZES),
            family_of(model).token_layout(model),
            num_tokens=tokens.shape[1],
        )[:, 0]
        > 0
    )
    got = retriever.roi_embeddings(model, tokens, keep)
    assert (got - retriever.image_embeddings(model, tokens)).abs().max() <= 1e-5


def test_half_precision_runs_without_nan(pixels):
    model = tiny_siglip2(seed=3).to(torch.bfloat16)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=1.0))
    try:
        with handle.objects(BOXES, SIZES):
            out = pooled(model, {**pixels, "pixel_values": pixels["pixel_values"].to(torch.bfloat16)})
    finally:
        handle.detach()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_cli_scores_a_saved_naflex_model(tmp_path):
    from helpers.bench import qpert_cli

    tiny_siglip2(seed=2).save_pretrained(tmp_path)
    tiny_siglip2_processor(str(tmp_path)).save_pretrained(tmp_path)
    random_images([(40, 90)])[0].save(tmp_path / "wide.png")
    out = qpert_cli(
        "score",
        str(tmp_path / "wide.png"),
        "-t",
        "a small red square",
        "-t",
        "the green box",
        "--box",
        "10,5,40,30",
        "--model",
        str(tmp_path),
        "--alpha",
        "1",
    )
    assert out.returncode == 0, out.stderr
    assert "the green box" in out.stdout
