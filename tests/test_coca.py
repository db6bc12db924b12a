"""Q-Pert in the attentional pooler (nn.MultiheadAttention) of a tiny random OpenCLIP CoCa."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from helpers.contract import assert_detach_restores, assert_inactive_is_bit_identical, assert_matches_reference  # noqa: E402
from helpers.models import MODEL_CFG  # noqa: E402
from helpers.reference_hooks import ReferenceHooks, shortest_edge_objects  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import qpert  # noqa: E402
from qpert.core import prepare_boxes, token_weights  # noqa: E402
from qpert.models.registry import MODELS  # noqa: E402
from qpert.models.tiny import randomize  # noqa: E402

BOXES = [
    [[10.0, 12.0, 60.0, 44.0], [0.0, 0.0, 22.0, 25.0], [70.0, 55.0, 118.0, 99.0]],
    [[30.0, 30.0, 90.0, 90.0]],
    [[-20.0, 5.0, 40.0, 140.0], [20.0, 50.0, 33.0, 62.0]],
]
SIZES = [(100, 120), (100, 100), (120, 80)]
CONFIGS = [
    dict(alpha=1.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=0.4, weight="inv_area", threshold=0.8, keep_norm=True, mode="enhance"),
    dict(alpha=0.8, weight="centered", rank=2, keep_norm=False, mode="enhance"),
    dict(alpha=1.0, weight="constant", threshold=0.95, keep_norm=False, mode="orthogonal"),
]


def tiny_coca(seed: int = 0) -> torch.nn.Module:
    """std 0.5: with smaller weights the pooler's attention is nearly uniform and Q-Pert barely shows."""
    torch.manual_seed(seed)
    return randomize(open_clip.CoCa(**MODEL_CFG), seed, std=0.5).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_coca()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))


def encode(model, pixels):
    with torch.no_grad():
        return model.encode_image(pixels, normalize=False)


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c.get('rank') or c['threshold']}-{c['mode']}-kn{c['keep_norm']}"
)
def test_matches_plain_reference(model, pixels, cfg):
    def reference():
        ref = ReferenceHooks(shortest_edge_objects(BOXES, SIZES, crop=28, grid=4, patch=7, prefix=1), cfg)
        ref.mha(model.visual.attn_pool.attn)
        return ref

    handle = assert_matches_reference(model, lambda: encode(model, pixels), reference, cfg, BOXES, SIZES)
    assert handle.layout.resize == "shortest_edge" and handle.layout.num_tokens == 17


def test_bit_identical_when_inactive(model, pixels):
    # 100x120 -> 28x33 -> centre crop from x=2: x < 2/0.28 = 7.1 is cropped away, a box there covers no token
    assert_inactive_is_bit_identical(
        model, lambda: encode(model, pixels), alpha=1.0, boxes_on_no_token=[[[0.0, 0.0, 7.0, 100.0]], [], []]
    )


def test_detach_restores_model(model, pixels):
    assert_detach_restores(model, lambda: encode(model, pixels), BOXES, SIZES)


def test_box_on_one_patch_maps_to_that_token(model):
    """84x56 -> shortest edge 28 (x0.5) -> 42x28 -> centre crop from x=7: patch (1, 2) is x 42..56, y 14..28."""
    handle = qpert.attach(model)
    try:
        weights = token_weights(prepare_boxes([[[42.0, 14.0, 56.0, 28.0]]], [(56, 84)]), handle.layout)
    finally:
        handle.detach()
    expected = torch.zeros(17)
    expected[1 + 1 * 4 + 2] = 1.0
    assert torch.equal(weights[0, 0], expected)


def test_registry_and_loading_a_saved_coca(tmp_path, pixels):
    spec = MODELS["coca-l14"]
    assert (spec.library, spec.source, spec.pretrained) == (
        "open_clip",
        "coca_ViT-L-14",
        "mscoco_finetuned_laion2B-s13B-b90k",
    )
    assert spec.alphas == (0.2, 0.4, 0.6, 0.8, 1.0)
    reference = tiny_coca(seed=5)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(MODEL_CFG, custom_text=True)}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    loaded = qpert.load_model(str(tmp_path))  # the same open_clip.create_model_and_transforms path as coca-l14
    assert type(loaded.model).__name__ == "CoCa" and not loaded.model.training
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    assert loaded.processor.image_transform(image).shape == (3, 28, 28)
    assert loaded.processor.tokenizer(["a cat"]).shape[0] == 1
    handle = qpert.attach(loaded.model, qpert.QPertConfig(alpha=1.0))
    try:
        assert handle.layout.resize == "shortest_edge"
        with handle.objects(BOXES, SIZES):
            assert torch.isfinite(encode(loaded.model, pixels)).all()
    finally:
        handle.detach()
