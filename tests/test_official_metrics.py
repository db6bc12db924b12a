"""The official metric conventions, by hand and against a port of the official code."""

from __future__ import annotations

import json

import helpers.official_loader_port as port
import numpy as np
import pytest

from qpert.eval.metrics import (
    KS,
    NUM_BINS,
    area_bins,
    harmonic_mean,
    median_rank,
    official_area_bins,
    retrieval_metrics,
)

NAN = float("nan")
# exact edges, an area that float32 rounds up across the 0.3 edge, the two edges float32 rounds
# down (0.7, 0.9), the top edge, and the official -1 of an image without annotation
TRICKY = [0.0, 0.1, 0.3 - 1e-9, 0.7, 0.9, 1.0, -1.0, NAN]


def staircase(n: int) -> np.ndarray:
    """Images x texts scores giving text j the T2I rank j+1 and image i the I2T rank n-i."""
    i, j = np.indices((n, n))
    return np.where(i < j, 1.0, np.where(i == j, 0.5, 0.0))


def test_official_median_rank_of_an_even_query_count():
    ranks = np.array([1, 2, 3, 4])
    assert median_rank(ranks) == 2.0
    assert median_rank(ranks, "official") == 2.5
    assert median_rank(np.array([1, 2, 9]), "official") == median_rank(np.array([1, 2, 9])) == 2.0
    with pytest.warns(UserWarning):
        paper = retrieval_metrics(staircase(4), np.arange(4), np.full(4, 0.05))
    with pytest.warns(UserWarning):
        official = retrieval_metrics(staircase(4), np.arange(4), np.full(4, 0.05), convention="official")
    assert official.ranks["t2i"].tolist() == [1, 2, 3, 4] and official.ranks["i2t"].tolist() == [4, 3, 2, 1]
    assert paper.t2i["median_rank"] == paper.i2t["median_rank"] == 2.0
    assert official.t2i["median_rank"] == official.i2t["median_rank"] == 2.5
    assert official.t2i["R@1"] == paper.t2i["R@1"] == 25.0


def test_official_bins_by_hand():
    bins = official_area_bins(np.array(TRICKY))
    assert bins["i2t"].tolist() == [0, 1, 3, 7, 9, -1, -1, -1]
    assert bins["t2i"].tolist() == [0, 1, 3, 6, 8, -1, -1, -1]
    assert area_bins(np.array(TRICKY[:6] + [NAN])).tolist() == [0, 1, 2, 7, 9, 9, -1]
    assert official_area_bins(np.array([1.2, 0.99999]))["i2t"].tolist() == [-1, 9]


def test_official_bins_match_the_port():
    edges = np.linspace(0, 1.0, 11)
    near_edges = [float(np.nextafter(np.float32(e), np.float32(s))) for e in edges for s in (-1, 2)]
    areas = np.array(TRICKY + near_edges + list(edges) + list(np.random.default_rng(0).random(40)))
    img2txt = {i: [i] for i in range(len(areas))}
    i2t, t2i = port.bin_indexes(areas.astype(np.float32), edges, img2txt, len(areas))
    bins = official_area_bins(areas)
    for b in range(NUM_BINS):
        assert np.flatnonzero(bins["i2t"] == b).tolist() == i2t[b].tolist(), b
        assert np.flatnonzero(bins["t2i"] == b).tolist() == t2i[b].tolist(), b
    assert any(not np.array_equal(x, y) for x, y in zip(i2t, t2i))  # the directions do differ


def test_official_directions_bin_an_area_of_0_7_differently():
    areas = np.array([0.7, 0.05])
    with pytest.warns(UserWarning, match=r"\[1, 2, 3, 4, 5, 6, 7, 8, 9\]"):
        m = retrieval_metrics(np.eye(2), np.arange(2), areas, convention="official")
    assert m.bin_counts["t2i"][6:8] == [1, 0] and m.bin_counts["i2t"][6:8] == [0, 1]
    assert m.to_dict()["convention"] == "official"
    with pytest.warns(UserWarning):
        paper = retrieval_metrics(np.eye(2), np.arange(2), np.array([0.05, 0.95]))
    assert paper.to_dict()["convention"] == "paper"


def test_official_areas_outside_0_1_are_in_no_bin_not_an_error():
    areas = np.array([-1.0, 1.0, 1.5, 0.5])
    with pytest.raises(ValueError, match="max_areas"):
        retrieval_metrics(np.eye(4), np.arange(4), areas)
    with pytest.warns(UserWarning):
        m = retrieval_metrics(np.eye(4), np.arange(4), areas, convention="official")
    assert m.num_images_without_boxes == 3 and sum(m.bin_counts["t2i"]) == 1
    with pytest.raises(ValueError, match="unknown metric convention 'oficial'"):
        retrieval_metrics(np.eye(4), np.arange(4), areas, convention="oficial")


@pytest.mark.filterwarnings("ignore:no image has its largest object")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_metrics_match_the_port(seed):
    """Random ITM-style scores (one matrix per direction), 1-5 captions per image."""
    rng = np.random.default_rng(seed)
    num_images = 60
    captions = rng.integers(1, 6, size=num_images)
    text_to_image = np.repeat(np.arange(num_images), captions)
    t2i_scores = rng.normal(size=(num_images, len(text_to_image)))
    i2t_scores = rng.normal(size=(num_images, len(text_to_image)))
    t2i_scores[text_to_image, np.arange(len(text_to_image))] += 2.5  # positives mostly near the top
    i2t_scores[text_to_image, np.arange(len(text_to_image))] += 2.5
    areas = rng.random(num_images) ** 3
    areas[: len(TRICKY)] = TRICKY

    m = retrieval_metrics(t2i_scores, text_to_image, areas, i2t_scores=i2t_scores, convention="official")
    img2txt = {i: np.flatnonzero(text_to_image == i).tolist() for i in range(num_images)}
    overall, per_bin, i2t_ranks, t2i_ranks = port.report_metrics(
        i2t_scores, t2i_scores.T, dict(enumerate(text_to_image.tolist())), img2txt, areas
    )

    np.testing.assert_array_equal(m.ranks["t2i"], t2i_ranks + 1)
    np.testing.assert_array_equal(m.ranks["i2t"], i2t_ranks + 1)
    for ours, theirs in (("t2i", "img"), ("i2t", "txt")):
        values = getattr(m, ours)
        assert values["median_rank"] == overall[f"{theirs}_mdr"]
        for k in KS:
            assert values[f"R@{k}"] == pytest.approx(overall[f"{theirs}_r{k}"])
            expected_bins = [b[f"{theirs}_r{k}"] for b in per_bin]
            assert m.bin_recall[ours][f"R@{k}"] == pytest.approx(expected_bins)
            filled = [v for v in expected_bins if v is not None]
            assert values[f"mR@{k}"] == pytest.approx(harmonic_mean(filled))
            assert values[f"small_R@{k}"] == pytest.approx(expected_bins[0])
    assert json.loads(json.dumps(m.to_dict()))["convention"] == "official"
