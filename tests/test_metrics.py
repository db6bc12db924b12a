import json
import statistics
import warnings

import numpy as np
import pytest

from qpert.eval.metrics import (
    METRIC_KEYS,
    area_bins,
    format_comparison,
    harmonic_mean,
    i2t_ranks,
    median_rank,
    retrieval_metrics,
    t2i_ranks,
)

NAN = float("nan")


def test_ties_count_against_the_query():
    scores = np.array(
        [
            [0.9, 0.5, 0.1],
            [0.9, 0.4, 0.2],
            [0.1, 0.6, 0.3],
        ]
    )
    pairing = np.array([0, 1, 2])
    # text 0: image 1 ties its positive image 0 -> rank 2
    assert t2i_ranks(scores, pairing).tolist() == [2, 3, 1]
    assert i2t_ranks(scores, pairing).tolist() == [1, 2, 2]


def test_all_scores_equal_gives_worst_rank():
    scores = np.zeros((4, 8))
    pairing = np.repeat(np.arange(4), 2)
    assert t2i_ranks(scores, pairing).tolist() == [4] * 8
    # each image: the 6 other captions tie with its best caption
    assert i2t_ranks(scores, pairing).tolist() == [7] * 4


def test_five_captions_per_image():
    scores = np.array(
        [
            [0.2, 0.8, 0.1, 0.3, 0.4, 0.9, 0.8, 0.1, 0.1, 0.1],
            [0.5, 0.5, 0.5, 0.5, 0.5, 0.7, 0.6, 0.2, 0.5, 0.1],
        ]
    )
    pairing = np.repeat([0, 1], 5)
    t2i = t2i_ranks(scores, pairing)
    i2t = i2t_ranks(scores, pairing)
    assert t2i.tolist() == [2, 1, 2, 2, 2, 2, 2, 1, 1, 2]
    # image 0: best caption 0.8; texts 5 (0.9) and 6 (0.8, a tie) are ahead
    assert i2t.tolist() == [3, 1]
    with pytest.warns(UserWarning):
        m = retrieval_metrics(scores, pairing, np.array([0.5, 0.5]))
    assert m.t2i["R@1"] == pytest.approx(30.0)
    assert m.t2i["R@5"] == 100.0
    assert m.i2t["R@1"] == 50.0
    assert m.t2i["median_rank"] == 2.0
    assert m.i2t["median_rank"] == 2.0  # floor(median of 0-based [2, 0]) + 1


def test_tied_captions_of_the_same_image_do_not_hurt():
    scores = np.array([[0.7, 0.7, 0.1], [0.2, 0.2, 0.9]])
    assert i2t_ranks(scores, np.array([0, 0, 1])).tolist() == [1, 1]


def test_bins_empty_bins_and_images_without_boxes():
    scores = np.eye(5)
    scores[0, 1] = 2.0  # text 1 prefers image 0; image 0 prefers text 1
    pairing = np.arange(5)
    areas = np.array([0.05, 0.15, 0.95, 1.0, NAN])
    with pytest.warns(UserWarning, match=r"\[2, 3, 4, 5, 6, 7, 8\]"):
        m = retrieval_metrics(scores, pairing, areas)
    assert m.empty_bins == [2, 3, 4, 5, 6, 7, 8]
    assert m.num_images_without_boxes == 1
    assert m.bin_counts["t2i"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert m.bin_counts["i2t"] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert m.t2i["R@1"] == 80.0
    assert m.bin_recall["t2i"]["R@1"] == [100.0, 0.0] + [None] * 7 + [100.0]
    assert m.bin_recall["i2t"]["R@1"] == [0.0, 100.0] + [None] * 7 + [100.0]
    assert m.t2i["mR@1"] == 0.0  # a bin at 0 makes the harmonic mean 0
    assert m.t2i["mR@5"] == 100.0
    assert m.t2i["small_R@1"] == 100.0
    assert m.i2t["small_R@1"] == 0.0


def test_harmonic_mean_over_bins():
    scores = np.eye(4)
    scores[0, 1] = 2.0
    areas = np.array([0.05, 0.05, 0.5, 0.5])
    with pytest.warns(UserWarning):
        m = retrieval_metrics(scores, np.arange(4), areas)
    assert m.bin_recall["t2i"]["R@1"][0] == 50.0
    assert m.t2i["mR@1"] == pytest.approx(2 / (1 / 50 + 1 / 100))
    assert m.t2i["small_R@1"] == 50.0


def test_small_object_recall_is_none_when_bin_zero_is_empty():
    areas = np.array([0.55, 0.95])
    with pytest.warns(UserWarning):
        m = retrieval_metrics(np.eye(2), np.arange(2), areas)
    assert m.t2i["small_R@1"] is None
    assert m.i2t["small_R@10"] is None
    assert m.t2i["mR@1"] == 100.0


def test_no_boxes_at_all_gives_no_binned_metrics():
    with pytest.warns(UserWarning):
        m = retrieval_metrics(np.eye(3), np.arange(3), np.full(3, NAN))
    assert m.num_images_without_boxes == 3
    assert m.t2i["mR@1"] is None and m.t2i["small_R@1"] is None
    assert m.t2i["R@1"] == 100.0


def test_no_warning_when_every_bin_is_filled():
    areas = np.arange(10) / 10 + 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = retrieval_metrics(np.eye(10), np.arange(10), areas)
    assert m.empty_bins == []
    assert m.t2i["mR@1"] == pytest.approx(100.0)


def test_area_bin_edges():
    bins = area_bins(np.array([0.0, 0.0999, 0.1, 0.3, 0.7, 0.9, 0.99, 1.0, NAN]))
    assert bins.tolist() == [0, 0, 1, 3, 7, 9, 9, 9, -1]
    with pytest.raises(ValueError, match="max_areas"):
        area_bins(np.array([1.2]))


def test_harmonic_mean_and_median_rank():
    assert harmonic_mean([50.0, 100.0]) == pytest.approx(66.6666667)
    assert harmonic_mean([0.0, 100.0]) == 0.0
    assert median_rank(np.array([1, 2, 3, 4])) == 2.0  # 0-based median 1.5 -> floor 1 -> 2


def test_to_dict_is_json_ready_with_exact_keys():
    with pytest.warns(UserWarning):
        m = retrieval_metrics(np.eye(3), np.arange(3), np.array([0.05, 0.5, NAN]))
    d = json.loads(json.dumps(m.to_dict()))
    for direction in ("t2i", "i2t"):
        assert set(d[direction]) == set(METRIC_KEYS) | {"bins"}
        assert set(d[direction]["bins"]) == {"R@1", "R@5", "R@10", "count"}
        assert len(d[direction]["bins"]["R@1"]) == 10
    assert d["num_images_without_boxes"] == 1
    assert d["bin_edges"][0] == 0.0 and d["bin_edges"][-1] == 1.0


def test_format_comparison_has_difference_column():
    areas = np.array([0.05, 0.5, 0.95])
    scores = np.eye(3)
    worse = scores.copy()
    worse[0, 1] = 2.0
    with pytest.warns(UserWarning):
        base = retrieval_metrics(worse, np.arange(3), areas)
        better = retrieval_metrics(scores, np.arange(3), areas)
    table = format_comparison({"baseline": base, "qpert": better})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "baseline", "qpert", "qpert-baseline"]
    row = next(line for line in lines if line.startswith("t2i R@1 "))
    assert row.split()[-3:] == ["66.67", "100.00", "+33.33"]
    assert "empty area bins" in table


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        t2i_ranks(np.array([[NAN, 1.0]]), np.array([0, 0]))
    with pytest.raises(ValueError, match="shape"):
        t2i_ranks(np.eye(2), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="outside"):
        t2i_ranks(np.eye(2), np.array([0, 2]))
    with pytest.raises(ValueError, match="at least one caption"):
        i2t_ranks(np.ones((2, 2)), np.array([0, 0]))


def test_negative_infinity_scores_are_allowed():
    scores = np.array([[1.0, -np.inf], [-np.inf, -np.inf]])
    assert t2i_ranks(scores, np.array([0, 1])).tolist() == [1, 2]


# ------------------------------------------------------------- independent plain loops


def plain_t2i(scores, pairing):
    ranks = []
    for t in range(scores.shape[1]):
        positive = scores[pairing[t], t]
        rank = 1
        for i in range(scores.shape[0]):
            if i != pairing[t] and scores[i, t] >= positive:
                rank += 1
        ranks.append(rank)
    return ranks


def plain_i2t(scores, pairing):
    ranks = []
    for i in range(scores.shape[0]):
        best = None
        for c in range(scores.shape[1]):
            if pairing[c] != i:
                continue
            rank = 1
            for j in range(scores.shape[1]):
                if j == c:
                    continue
                if pairing[j] == i:
                    rank += scores[i, j] > scores[i, c]
                else:
                    rank += scores[i, j] >= scores[i, c]
            best = rank if best is None else min(best, rank)
        ranks.append(best)
    return ranks


def plain_metrics(scores, pairing, areas):
    bins = [None if np.isnan(a) else min(int(a * 10), 9) for a in areas]
    out = {}
    for direction, ranks, query_bins in (
        ("t2i", plain_t2i(scores, pairing), [bins[p] for p in pairing]),
        ("i2t", plain_i2t(scores, pairing), bins),
    ):
        values = {}
        for k in (1, 5, 10):
            values[f"R@{k}"] = 100 * sum(r <= k for r in ranks) / len(ranks)
            per_bin = []
            for b in range(10):
                in_bin = [r for r, qb in zip(ranks, query_bins) if qb == b]
                if in_bin:
                    per_bin.append(100 * sum(int(r <= k) for r in in_bin) / len(in_bin))
            values[f"mR@{k}"] = statistics.harmonic_mean(per_bin) if per_bin else None
            small = [r for r, qb in zip(ranks, query_bins) if qb == 0]
            small_hits = sum(int(r <= k) for r in small)
            values[f"small_R@{k}"] = 100 * small_hits / len(small) if small else None
        out[direction] = (ranks, values)
    return out


@pytest.mark.parametrize(
    "num_images, seed, block_rows",
    [(1, 0, 1024), (3, 1, 2), (17, 2, 4), (40, 3, 1024), (40, 4, 7)],
)
def test_agrees_with_plain_loops_on_random_scores(num_images, seed, block_rows):
    rng = np.random.default_rng(seed)
    captions = rng.integers(1, 8, size=num_images)  # 1..7 captions per image
    pairing = np.repeat(np.arange(num_images), captions)
    rng.shuffle(pairing)  # captions need not be grouped by image
    scores = np.round(rng.normal(size=(num_images, len(pairing))), 1)  # many ties
    areas = rng.uniform(0, 1, size=num_images)
    areas[rng.uniform(size=num_images) < 0.2] = NAN
    areas[rng.uniform(size=num_images) < 0.1] = 1.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = retrieval_metrics(scores, pairing, areas, block_rows=block_rows)
    expected = plain_metrics(scores, pairing, areas)
    for direction in ("t2i", "i2t"):
        ranks, values = expected[direction]
        assert m.ranks[direction].tolist() == ranks
        for key, value in values.items():
            got = getattr(m, direction)[key]
            if value is None:
                assert got is None, key
            else:
                assert got == pytest.approx(value), key
