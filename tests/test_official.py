"""compat="official": the official code's projector, weights and token weights, against a plain port of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.official_port import OfficialPort, box_info

import qpert
from qpert.core import (
    TokenLayout,
    canonical_signs,
    official_projectors,
    official_token_weights,
    pooled_projectors,
    prepare_boxes,
)
from qpert.models.tiny import tiny_blip2

# Every box covers at least 9 of the 16 patches (head size d = 8): the keys' autocorrelation is full
# rank, so its eigenvectors are unique up to sign and the port must agree to float precision.
BOXES = [[[10.3, 12.7, 95.2, 80.9], [40.5, 30.2, 119.0, 99.0]], [], [[3.0, 20.6, 70.9, 117.5]]]
SIZES = [(100, 120), (100, 100), (120, 80)]
WEIGHTS = ["constant", "area", "inv_area", "centered", "inv_centered"]


@pytest.fixture(scope="module")
def model():
    return tiny_blip2(seed=3)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, 100, (3, 6), generator=g)
    return dict(pixel_values=torch.randn(3, 3, 28, 28, generator=g), input_ids=ids, attention_mask=torch.ones_like(ids))


def run(model, inputs, itm):
    with torch.no_grad():
        return model(**inputs, use_image_text_matching_head=itm).logits_per_image


def with_qpert(model, inputs, itm, **config):
    handle = qpert.attach(model, qpert.QPertConfig(**config))
    try:
        with handle.objects(BOXES, SIZES):
            return run(model, inputs, itm)
    finally:
        handle.detach()


@pytest.mark.parametrize("itm", [False, True], ids=["itc", "itm"])
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("threshold", [0.99, 0.8, 3])
def test_matches_port_of_official_code(model, inputs, weight, threshold, itm):
    base = run(model, inputs, itm)
    port = OfficialPort(model, [box_info(b, *s) for b, s in zip(BOXES, SIZES)], 4.0, weight, threshold)
    try:
        expected = run(model, inputs, itm)
    finally:
        port.remove()
    rule = dict(rank=threshold) if isinstance(threshold, int) else dict(threshold=threshold)
    got = with_qpert(model, inputs, itm, alpha=4.0, weight=weight, compat="official", **rule)
    paper = with_qpert(model, inputs, itm, alpha=4.0, weight=weight, **rule)
    assert (expected - base).abs().max() > 1e-3, "the port must change the outputs"
    assert (got - expected).abs().max() <= 2e-5
    assert (paper - expected).abs().max() > 1e-3, "the official computation must differ from the paper's"


def test_keep_norm_matches_port(model, inputs):
    port = OfficialPort(model, [box_info(b, *s) for b, s in zip(BOXES, SIZES)], 6.0, "area", 0.9, do_normalize=True)
    try:
        expected = run(model, inputs, False)
    finally:
        port.remove()
    got = with_qpert(model, inputs, False, alpha=6.0, weight="area", threshold=0.9, keep_norm=True, compat="official")
    assert (got - expected).abs().max() <= 2e-5


def test_token_weights_match_port_on_odd_sizes(model):
    port = OfficialPort(model, [], 1.0, "constant", 0.9)
    port.remove()
    layout = TokenLayout(grid=(4, 4), patch=(7, 7), num_prefix_tokens=1)
    rng = np.random.default_rng(0)
    for h, w in [(333, 500), (97, 41), (28, 28), (500, 333)]:
        boxes = [
            [x0, y0, x0 + bw, y0 + bh]
            for x0, y0, bw, bh in zip(
                rng.uniform(0, w / 2, 6),
                rng.uniform(0, h / 2, 6),
                rng.uniform(0.3, w / 2, 6),
                rng.uniform(0.3, h / 2, 6),
            )
        ]
        got = official_token_weights(prepare_boxes([boxes], [(h, w)]), layout)[0]
        expected = port.get_key_weight(box_info(boxes, h, w))
        assert torch.equal(got, expected)
        paper = qpert.core.token_weights(prepare_boxes([boxes], [(h, w)]), layout)[0]
        assert not torch.equal(got, paper)  # binarised masks, not exact coverage


def test_inv_area_is_minus_alpha_area():
    official = qpert.QPertConfig(alpha=2.0, weight="inv_area", compat="official")
    paper = qpert.QPertConfig(alpha=2.0, weight="inv_area")
    assert official.weight_of(0.25) == pytest.approx(-0.5) and paper.weight_of(0.25) == pytest.approx(1.5)
    for weight in ("constant", "area", "centered", "inv_centered"):
        assert qpert.QPertConfig(weight=weight, compat="official").weight_of(0.3) == qpert.QPertConfig(
            weight=weight
        ).weight_of(0.3)


def random_keys(tokens, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3 + torch.randn(d, generator=g)


def energy(keys, p):
    return float(((keys @ p) ** 2).sum() / (keys**2).sum())


def test_official_projector_keeps_less_key_energy_than_paper():
    keys = random_keys(200)
    assert energy(keys, pooled_projectors(keys, 0.99)) > 0.98
    assert energy(keys, official_projectors(keys, 0.99)) < 0.8


def test_signs_decide_the_uncanonical_projector_and_canonical_signs_fix_it():
    keys = random_keys(200, d=16)
    _, vectors = torch.linalg.eigh(keys.T @ keys)
    flips = torch.where(torch.rand(16, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    select = (torch.arange(16) < 8).float()[:, None]

    def row_projector(v):
        return (v * select).T @ (v * select)

    assert (row_projector(vectors) - row_projector(vectors * flips)).abs().max() > 0.1
    assert torch.equal(canonical_signs(vectors), canonical_signs(vectors * flips))


def test_fewer_tokens_than_dims_makes_the_official_projector_depend_on_rounding():
    """A box covering T < d tokens leaves d - T zero eigenvalues whose eigenvectors are any basis of the
    null space: the official Vᵀ D_S V then follows rounding noise, even with canonical signs."""
    keys = random_keys(40)
    noisy = keys * (1 + 1e-6 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(2)))
    assert (official_projectors(keys, 0.99) - official_projectors(noisy, 0.99)).abs().max() > 0.05
    assert (pooled_projectors(keys, 0.99) - pooled_projectors(noisy, 0.99)).abs().max() < 1e-3


def test_subspaces_remember_their_recipe(model, inputs):
    tokens = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    handle = qpert.attach(model, qpert.QPertConfig(compat="official"))
    try:
        official = handle.compute_subspaces(tokens, BOXES, SIZES)
        assert official.compat == "official" and official.projector == "official"
        with (
            pytest.raises(ValueError, match="recompute"),
            handle.objects(subspaces=official, config=qpert.QPertConfig()),
        ):
            pass
        again = qpert.core.Subspaces.from_state_dict(official.state_dict())
        assert again.recipe() == official.recipe()
    finally:
        handle.detach()


def test_compat_validation():
    with pytest.raises(ValueError, match="compat"):
        qpert.QPertConfig(compat="lavis")
    with pytest.raises(ValueError, match="ablation"):
        qpert.QPertConfig(compat="official", projector="random")
    assert (
        qpert.QPertConfig.from_dict(
            {"alpha": 2.0, "weight": "area", "threshold": 0.9, "keep_norm": False, "mode": "enhance"}
        ).projector
        == "paper"
    )  # configs saved before compat


def test_edge_and_zero_width_boxes_as_the_official_code_reads_them(model, inputs):
    """The official loaders subtract 1 from every corner: a box at the left or top edge starts at -1, which the
    official mask slices as the last column or row (an empty mask); a zero-width box is empty too. Both stay
    objects with the rank-1 projector of a zero matrix, counted in the mean: compat="official" keeps them."""
    boxes = [
        [[-1.0, 9.0, 90.2, 80.9], [40.5, 30.2, 119.0, 99.0]],
        [[20.0, -1.0, 20.0, 60.0]],
        [[3.0, 20.6, 70.9, 117.5], [10.0, 10.0, 10.0, 50.0]],
    ]
    port = OfficialPort(model, [box_info(b, *s) for b, s in zip(boxes, SIZES)], 4.0, "area", 0.9)
    try:
        expected = run(model, inputs, True)
    finally:
        port.remove()
    handle = qpert.attach(model, qpert.QPertConfig(alpha=4.0, weight="area", threshold=0.9, compat="official"))
    try:
        with handle.objects(boxes, SIZES):
            got = run(model, inputs, True)
    finally:
        handle.detach()
    assert (got - expected).abs().max() <= 2e-5
    assert (expected - run(model, inputs, True)).abs().max() > 1e-3
