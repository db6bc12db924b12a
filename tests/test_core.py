"""The pure-tensor core: token weights, subspaces, perturbation, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers.reference import coverage, projector

from qpert import QPertConfig, QPertWarning
from qpert.core import (
    Subspaces,
    TokenLayout,
    compute_subspaces,
    perturb_queries,
    perturbation_matrix,
    prepare_boxes,
    projectors,
    token_weights,
)

LAYOUT = TokenLayout(grid=(4, 4), patch=(7, 7), num_prefix_tokens=1)


def weights_of(boxes, sizes, layout=LAYOUT):
    return token_weights(prepare_boxes(boxes, sizes), layout)


def test_box_covering_exactly_one_patch():
    # image 100 x 200 (h x w) is stretched to 28 x 28; patch (row 1, col 2) is [14, 21] x [7, 14] there
    box = [14 * 200 / 28, 7 * 100 / 28, 21 * 200 / 28, 14 * 100 / 28]
    w = weights_of([[box]], [(100, 200)])[0, 0]
    expected = torch.zeros(17)
    expected[1 + 1 * 4 + 2] = 1.0
    assert torch.allclose(w, expected, atol=1e-6)
    half = weights_of([[[box[0], box[1], (box[0] + box[2]) / 2, box[3]]]], [(100, 200)])[0, 0]
    assert half[7].item() == pytest.approx(0.5, abs=1e-6) and half.sum().item() == pytest.approx(0.5, abs=1e-6)


def test_shortest_edge_center_crop_layout():
    layout = TokenLayout(grid=(4, 4), patch=(7, 7), num_prefix_tokens=1, resize="shortest_edge")
    # 200 x 400 image -> 28 x 56, centre crop drops 14 px left: original x 200..250 is crop x 14..21 (col 2)
    w = weights_of([[[200.0, 0.0, 250.0, 50.0]]], [(200, 400)], layout)[0, 0]
    expected = torch.zeros(17)
    expected[1 + 0 * 4 + 2] = 1.0
    assert torch.allclose(w, expected, atol=1e-6)
    # a box entirely in the cropped-away margin covers no token
    assert weights_of([[[0.0, 0.0, 90.0, 200.0]]], [(200, 400)], layout).sum() == 0


def test_token_weights_match_plain_loop():
    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(20, 300)), int(rng.integers(20, 300))) for _ in range(6)]
    boxes = []
    for h, w in sizes:
        xy = rng.uniform(-10, [w + 10, h + 10], size=(5, 2))
        wh = rng.uniform(1, [w, h], size=(5, 2))
        boxes.append(np.concatenate([xy, xy + wh], 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QPertWarning)
        batch = prepare_boxes(boxes, sizes)
    got = token_weights(batch, LAYOUT)
    for i, (b, hw) in enumerate(zip(boxes, sizes)):
        rows = [coverage(box, hw, (28, 28), 4, 7) for box in b]
        rows = [r for r in rows if r[1] > 0]
        assert len(rows) == int(batch.valid[i].sum())
        for j, (cov, area) in enumerate(rows):
            assert np.allclose(got[i, j].numpy(), cov, atol=1e-5)
            assert batch.areas[i, j].item() == pytest.approx(area, abs=1e-6)


def test_bad_boxes_are_clipped_or_dropped_with_warning():
    with pytest.warns(QPertWarning) as record:
        batch = prepare_boxes(
            [[[-5, -5, 50, 40], [np.nan, 0, 3, 3], [30, 30, 10, 40], [5, 5, 5, 20], [200, 200, 300, 300]]], [(100, 100)]
        )
    messages = " ".join(str(r.message) for r in record)
    assert "non-finite" in messages and "inverted" in messages and "zero-area or outside" in messages
    assert batch.valid.tolist() == [[True]]
    assert batch.boxes[0, 0].tolist() == [0, 0, 50, 40]
    assert batch.areas[0, 0].item() == pytest.approx(0.2)


@pytest.mark.parametrize(
    "boxes,sizes,match",
    [
        ([[[0, 0, 1, 1]]], [(10, 10), (10, 10)], "1 box lists but 2 image sizes"),
        ([[[0, 0, 1]]], [(10, 10)], r"shape \(M, 4\)"),
        ([[[0, 0, 1, 1]]], [(0, 10)], "positive"),
        ([[[0, 0, 1, 1]]], [(10,)], "height, width"),
        (np.zeros((3, 4)), [(10, 10)] * 3, "one \\(M, 4\\) array per image"),
    ],
)
def test_bad_box_arguments_raise(boxes, sizes, match):
    with pytest.raises(ValueError, match=match):
        prepare_boxes(boxes, sizes)


def diag_autocorr(eigenvalues, d=6, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    lam = np.zeros(d)
    lam[: len(eigenvalues)] = eigenvalues
    return torch.tensor(q @ np.diag(lam) @ q.T, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)


@pytest.mark.parametrize(
    "threshold,fixed,rank",
    [(0.3, None, 1), (0.85, None, 2), (0.95, None, 3), (0.999, None, 3), (0.99, 2, 2), (0.5, 10, 4)],
)
def test_rank_rule(threshold, fixed, rank):
    c, q = diag_autocorr([4.0, 3.0, 2.0, 1.0])  # contribution ratios 0.4, 0.7, 0.9, 1.0
    p = projectors(c, threshold, fixed)
    expected = q[:, :rank] @ q[:, :rank].T  # never more directions than the numerical rank (4)
    assert torch.allclose(p, expected, atol=1e-5)


def test_single_object_scales_subspace_component_only():
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 1, 17, 8)
    weights = torch.zeros(1, 1, 17)
    weights[0, 0, 3:9] = torch.tensor([1.0, 0.5, 1.0, 0.25, 1.0, 1.0])  # 6 tokens < d = 8
    cfg = QPertConfig(alpha=3.0, weight="area", threshold=0.9)
    area = torch.tensor([[0.4]])
    subs = compute_subspaces(keys, weights, area, torch.ones(1, 1, dtype=torch.bool), cfg)
    p = subs.mean_projector[0][0, 0]
    assert torch.allclose(p @ p, p, atol=1e-5) and torch.allclose(p, p.T, atol=1e-6)
    ref = projector(keys[0, 0, 0].double().numpy(), weights[0, 0].double().numpy(), 0.9)
    assert np.allclose(p.numpy(), ref, atol=1e-5)
    q = torch.randn(1, 5, 1, 8)
    out = perturb_queries(
        q, perturbation_matrix(subs.mean_projector[0], subs.area_projector[0], cfg), subs.active, keep_norm=False
    )
    w = 3.0 * 0.4
    inside, inside_new = q[0, :, 0] @ p, out[0, :, 0] @ p
    assert torch.allclose(inside_new, (1 + w) * inside, atol=1e-5)
    assert torch.allclose(q[0, :, 0] - inside, out[0, :, 0] - inside_new, atol=1e-5)
    kept = perturb_queries(
        q, perturbation_matrix(subs.mean_projector[0], subs.area_projector[0], cfg), subs.active, keep_norm=True
    )
    assert torch.allclose(kept.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    ortho = QPertConfig(mode="orthogonal", threshold=0.9)
    out = perturb_queries(
        q, perturbation_matrix(subs.mean_projector[0], subs.area_projector[0], ortho), subs.active, keep_norm=False
    )
    assert torch.allclose(out[0, :, 0] @ p, torch.zeros(5, 8), atol=1e-5)


def test_degenerate_inputs_are_nan_free_and_dropped():
    keys = torch.randn(2, 2, 3, 17, 8)
    keys[1, 0] = float("inf")
    weights = torch.zeros(2, 2, 17)
    weights[0, 1, 5] = 1.0  # image 0: object 0 covers nothing (dropped), object 1 one token (rank 1)
    weights[1, 0, 1:] = 1.0
    subs = compute_subspaces(keys, weights, torch.full((2, 2), 0.5), torch.ones(2, 2, dtype=torch.bool), QPertConfig())
    mean = torch.stack(subs.mean_projector, 1)
    assert torch.isfinite(mean).all() and torch.isfinite(torch.stack(subs.area_projector, 1)).all()
    assert subs.active.tolist() == [True, True]
    traces = mean[0].diagonal(dim1=-2, dim2=-1).sum(-1)
    assert torch.allclose(traces, torch.ones_like(traces), atol=1e-5)  # one token -> rank 1, M' = 1
    assert mean[1, 0].abs().sum() == 0  # non-finite keys contribute nothing
    none = compute_subspaces(
        keys, torch.zeros(2, 2, 17), torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), QPertConfig(rank=2)
    )
    assert none.active.tolist() == [False, False] and torch.stack(none.mean_projector).abs().sum() == 0


def test_chunking_does_not_change_results():
    torch.manual_seed(1)
    keys = torch.randn(3, 2, 2, 17, 8)
    weights = torch.rand(3, 4, 17) * (torch.rand(3, 4, 17) > 0.5)
    args = (keys, weights, torch.rand(3, 4), torch.ones(3, 4, dtype=torch.bool), QPertConfig(threshold=0.95))
    whole, chunked = compute_subspaces(*args), compute_subspaces(*args, chunk_bytes=1)
    for a, b in zip(whole.mean_projector + whole.area_projector, chunked.mean_projector + chunked.area_projector):
        assert torch.allclose(a, b, atol=1e-6)


def test_subspaces_select_and_cat():
    s = Subspaces(
        (torch.arange(3.0).reshape(3, 1, 1, 1),),
        (-torch.arange(3.0).reshape(3, 1, 1, 1),),
        torch.tensor([True, False, True]),
        0.9,
    )
    picked = s.select([2, 2, 0])
    assert picked.mean_projector[0].flatten().tolist() == [2, 2, 0] and picked.active.tolist() == [True, True, True]
    both = Subspaces.cat([s, picked])
    assert len(both) == 6
    with pytest.raises(ValueError, match="built differently"):
        Subspaces.cat([s, Subspaces(s.mean_projector, s.area_projector, s.active, 0.9, 3)])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(weight="square"), "weight function"),
        (dict(mode="add"), "mode"),
        (dict(threshold=1.5), r"\(0, 1\)"),
        (dict(threshold=0), r"\(0, 1\)"),
        (dict(threshold=True), "threshold"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(threshold=2), "rank=k"),
        (dict(rank=0), ">= 1"),
        (dict(rank=2.0), "int"),
        (dict(alpha=float("inf")), "finite"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QPertConfig(**kwargs)


def test_config_weight_functions():
    a = 0.3
    expected = {
        "constant": 2.0,
        "area": 2.0 * a,
        "inv_area": 2.0 * (1 - a),
        "centered": 2.0 * (a - 0.5),
        "inv_centered": 2.0 * (0.5 - a),
    }
    for name, value in expected.items():
        assert QPertConfig(alpha=2.0, weight=name).weight_of(a) == pytest.approx(value)
    assert QPertConfig.from_dict(QPertConfig(alpha=4.0, rank=3).to_dict()) == QPertConfig(alpha=4.0, rank=3)
    assert QPertConfig.from_dict({"alpha": 4.0, "threshold": 3}) == QPertConfig(alpha=4.0, rank=3)  # earlier files
    with pytest.raises(ValueError, match="neither"):
        QPertConfig.from_dict({"threshold": 1.0})
    with pytest.raises(ValueError, match="JSON object"):
        QPertConfig.from_dict([1, 2])


def test_identity_projector_is_plain_query_scaling():
    torch.manual_seed(3)
    keys = torch.randn(2, 1, 2, 17, 8)
    weights = torch.zeros(2, 3, 17)
    weights[0, 0, 1:5], weights[0, 1, 3:12], weights[1, 0, 2:4] = 1.0, 0.5, 1.0
    areas = torch.tensor([[0.1, 0.4, 0.0], [0.3, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    cfg = QPertConfig(alpha=2.0, weight="inv_area", projector="identity")
    subs = compute_subspaces(keys, weights, areas, valid, cfg)
    q = torch.randn(2, 3, 2, 8)
    out = perturb_queries(
        q, perturbation_matrix(subs.mean_projector[0], subs.area_projector[0], cfg), subs.active, keep_norm=False
    )
    mean_weight = torch.tensor([(cfg.weight_of(0.1) + cfg.weight_of(0.4)) / 2, cfg.weight_of(0.3)])
    assert torch.allclose(out, q * (1 + mean_weight)[:, None, None, None], atol=1e-5)


def test_random_projector_has_the_paper_rank_and_ignores_the_keys():
    torch.manual_seed(4)
    keys = torch.randn(2, 2, 3, 17, 8)
    weights = torch.zeros(2, 1, 17)
    weights[:, 0, 2:14] = 1.0  # the same box in both images, 12 tokens
    args = (weights, torch.full((2, 1), 0.2), torch.ones(2, 1, dtype=torch.bool))
    random_9, random_8 = QPertConfig(threshold=0.9, projector="random"), QPertConfig(rank=8, projector="random")
    paper = torch.stack(compute_subspaces(keys, *args, QPertConfig(threshold=0.9)).mean_projector, 1)
    rand = torch.stack(compute_subspaces(keys, *args, random_9).mean_projector, 1)
    trace = lambda p: p.diagonal(dim1=-2, dim2=-1).sum(-1)
    assert torch.allclose(trace(rand), trace(paper), atol=1e-4)  # same rank per object, layer and head
    assert torch.allclose(rand @ rand, rand, atol=1e-5) and torch.allclose(rand, rand.transpose(-1, -2), atol=1e-6)
    assert (rand - paper).abs().max() > 0.1
    other = torch.stack(compute_subspaces(keys * 3 + 1, *args, random_8).mean_projector, 1)
    full = torch.stack(compute_subspaces(keys, *args, random_8).mean_projector, 1)
    assert torch.allclose(other, full, atol=1e-6)  # same rank (8): the keys do not move a random subspace
    again = torch.stack(compute_subspaces(keys[1:], *[a[1:] for a in args], random_9).mean_projector, 1)
    assert torch.allclose(again[0], rand[1], atol=1e-6)  # an object's subspace does not depend on its batch
