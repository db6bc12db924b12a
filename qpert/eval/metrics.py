"""Retrieval metrics of the Q-Pert protocol: R@K, median rank, area-binned mR@K, small-object R@K.

Everything starts from the 1-based rank of each query's positive, computed with numpy over
blocks of gallery rows, so a 5k x 25k score matrix needs no Python loop over queries.

Ties count against the query: a negative whose score equals the positive's is ranked ahead
of it. This is the pessimistic convention, so a degenerate scorer (e.g. all scores equal)
gets rank = gallery size instead of a flattering rank 1.

Two conventions (``convention``): ``"paper"`` (below) and ``"official"``, the arithmetic of
the authors' released code (``BaseTask.report_metrics`` / ``compute_metrics`` /
``report_metircs_on_size`` in NEC-N-SOGI/query-perturbation @ c6e0294), to reproduce its
published numbers: see :func:`median_rank` and :func:`official_area_bins`. The official ranks
come from ``np.argsort(score)[::-1]``, which orders ties arbitrarily; qpert keeps its own tie
rule in both conventions, since with float scores ties only arise among the -100 fillers
that ITM re-ranking puts beyond its top-k, where they cannot change R@1/5/10.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

KS = (1, 5, 10)
NUM_BINS = 10
MetricConvention = Literal["paper", "official"]
CONVENTIONS = ("paper", "official")
DIRECTIONS = ("t2i", "i2t")
METRIC_KEYS = (
    "R@1", "R@5", "R@10",
    "mR@1", "mR@5", "mR@10",
    "small_R@1", "small_R@5", "small_R@10",
    "median_rank",
)  # fmt: skip

# Rows of the score matrix processed at once: bounds the boolean temporaries to
# block_rows x num_texts (about 25 MB for 25k texts).
DEFAULT_BLOCK_ROWS = 1024


@dataclass(frozen=True, eq=False)
class RetrievalMetrics:
    """Metrics of one run, both directions.

    ``t2i`` / ``i2t`` map each of :data:`METRIC_KEYS` to a number (percentages for recalls),
    or None where undefined (no non-empty bin, or bin 0 empty). ``bin_recall[d]["R@K"]`` holds
    the 10 per-bin values (None for empty bins) and ``bin_counts[d]`` the number of queries
    per bin. ``num_images_without_boxes`` counts the images in no bin. ``ranks[d]`` are the
    1-based positive ranks, kept for per-query analysis. ``convention`` is ``"paper"`` or
    ``"official"`` (see the module docstring).
    """

    t2i: dict[str, Optional[float]]
    i2t: dict[str, Optional[float]]
    bin_recall: dict[str, dict[str, list[Optional[float]]]]
    bin_counts: dict[str, list[int]]
    empty_bins: list[int]
    num_images_without_boxes: int
    ranks: dict[str, np.ndarray] = field(repr=False)
    convention: MetricConvention = "paper"

    def to_dict(self) -> dict:
        """JSON-ready dict (plain floats, ints, None, lists); ranks are left out."""
        out: dict = {}
        for d in DIRECTIONS:
            values = dict(getattr(self, d))
            bins = {key: list(v) for key, v in self.bin_recall[d].items()}
            values["bins"] = {**bins, "count": list(self.bin_counts[d])}
            out[d] = values
        out["bin_edges"] = [b / NUM_BINS for b in range(NUM_BINS + 1)]
        out["empty_bins"] = list(self.empty_bins)
        out["num_images_without_boxes"] = self.num_images_without_boxes
        out["convention"] = self.convention
        return out


def t2i_ranks(scores: np.ndarray, text_to_image: np.ndarray, block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """1-based rank of each text's paired image among all images (ties against the text)."""
    return _t2i_ranks(*_check_inputs(scores, text_to_image, block_rows), block_rows)


def i2t_ranks(scores: np.ndarray, text_to_image: np.ndarray, block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """1-based rank of each image's best-ranked caption among all texts.

    The best caption is the highest-scoring one; its rank is 1 + the number of other
    images' captions scoring at least as high (ties against the image).
    """
    return _i2t_ranks(*_check_inputs(scores, text_to_image, block_rows), block_rows)


def _t2i_ranks(scores: np.ndarray, text_to_image: np.ndarray, block_rows: int) -> np.ndarray:
    positive = scores[text_to_image, np.arange(scores.shape[1])]
    ranks = np.zeros(scores.shape[1], dtype=np.int64)
    for start in range(0, scores.shape[0], block_rows):
        ranks += (scores[start : start + block_rows] >= positive).sum(axis=0)
    return ranks  # the positive itself is counted once: that makes the rank 1-based


def _i2t_ranks(scores: np.ndarray, text_to_image: np.ndarray, block_rows: int) -> np.ndarray:
    num_images = scores.shape[0]
    if np.bincount(text_to_image, minlength=num_images).min() == 0:
        raise ValueError("every image needs at least one caption for image-to-text ranks")
    positive = scores[text_to_image, np.arange(scores.shape[1])]
    best = np.full(num_images, -np.inf, dtype=scores.dtype)
    np.maximum.at(best, text_to_image, positive)
    tied_positives = np.bincount(text_to_image, weights=positive >= best[text_to_image], minlength=num_images).astype(
        np.int64
    )
    at_least_best = np.empty(num_images, dtype=np.int64)
    for start in range(0, num_images, block_rows):
        stop = start + block_rows
        at_least_best[start:stop] = (scores[start:stop] >= best[start:stop, None]).sum(axis=1)
    return at_least_best - tied_positives + 1


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose positive is within the top ``k``."""
    return float(100.0 * np.mean(ranks <= k))


def median_rank(ranks: np.ndarray, convention: MetricConvention = "paper") -> float:
    """Median of the 1-based ranks.

    ``"paper"``: the VSE++/SCAN convention, floor(median of 0-based ranks) + 1.
    ``"official"``: ``np.median(ranks0 + 1)``, which is x.5 for an even query count whose two
    middle ranks differ.
    """
    _check_convention(convention)
    if convention == "official":
        return float(np.median(ranks))
    return float(np.floor(np.median(ranks - 1)) + 1)


def area_bins(max_areas: np.ndarray) -> np.ndarray:
    """Bin index 0..9 of each image's largest normalized object area; -1 where NaN (no boxes).

    Bin b is [b/10, (b+1)/10); the last bin also holds 1.0.
    """
    areas = np.asarray(max_areas, dtype=np.float64)
    valid = ~np.isnan(areas)
    if np.any((areas[valid] < 0) | (areas[valid] > 1)):
        raise ValueError("max_areas must lie in [0, 1] (or be NaN for images without boxes)")
    bins = np.full(areas.shape, -1, dtype=np.int64)
    bins[valid] = np.minimum(np.floor(areas[valid] * NUM_BINS), NUM_BINS - 1).astype(np.int64)
    return bins


def official_area_bins(max_areas: np.ndarray) -> dict[str, np.ndarray]:
    """Per-direction bin index (-1: in no bin) of each image, as the official code bins them.

    Areas are cast to float32 and bin b holds ``edges[b] <= area < edges[b+1]`` with
    ``edges = np.linspace(0, 1.0, 11)``, so an area >= 1.0, negative (the official -1 of an
    image without annotation) or NaN is in no bin. The official code ran on numpy 1.24, whose
    value-based casting compared the float32 image areas with float32-rounded edges (I2T),
    but the texts' areas, copied into a float64 array, with float64 edges (T2I): an area that
    rounds to float32(0.7) or float32(0.9), the two edges float32 rounds down, lands one bin
    higher for I2T than for T2I. Both are reproduced.
    """
    areas32 = np.asarray(max_areas, dtype=np.float32)
    edges = np.linspace(0, 1.0, NUM_BINS + 1)
    compared = {
        "i2t": (areas32, edges.astype(np.float32)),
        "t2i": (areas32.astype(np.float64), edges),
    }
    bins = {}
    for direction, (areas, direction_edges) in compared.items():
        bins[direction] = np.full(areas.shape, -1, dtype=np.int64)
        for b in range(NUM_BINS):
            bins[direction][(direction_edges[b] <= areas) & (areas < direction_edges[b + 1])] = b
    return bins


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 when any value is 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("harmonic mean of no values")
    if np.any(values == 0):
        return 0.0
    return float(values.size / np.sum(1.0 / values))


def retrieval_metrics(
    scores: np.ndarray,
    text_to_image: np.ndarray,
    max_areas: np.ndarray,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    i2t_scores: Optional[np.ndarray] = None,
    convention: MetricConvention = "paper",
) -> RetrievalMetrics:
    """All metrics of the protocol from an (images x texts) score matrix, higher = better.

    ``max_areas[i]`` is image i's largest normalized object area (NaN: no boxes). Per-bin
    recalls use the queries of the bin (T2I: texts whose image is in it; I2T: its images),
    still ranked against the whole gallery. mR@K is the harmonic mean over non-empty bins;
    empty bins are listed in ``empty_bins`` and reported with a warning. With ITM re-ranking
    each direction has its own matrix (as in BLIP's evaluation): ``scores`` then ranks T2I and
    ``i2t_scores`` (same shape) ranks I2T. ``convention="official"`` bins with
    :func:`official_area_bins` (any area allowed: -1 means no annotation) and takes the
    official :func:`median_rank`; everything else is shared (the official code reports the
    per-bin values, mR@K is their harmonic mean as in the paper).
    """
    _check_convention(convention)
    scores, text_to_image = _check_inputs(scores, text_to_image, block_rows)
    max_areas = np.asarray(max_areas)
    if max_areas.shape != (scores.shape[0],):
        raise ValueError(f"max_areas must have shape ({scores.shape[0]},), got {max_areas.shape}")
    if convention == "official":
        image_bins = official_area_bins(max_areas)
    else:
        image_bins = dict.fromkeys(DIRECTIONS, area_bins(max_areas))
    ranks = {
        "t2i": _t2i_ranks(scores, text_to_image, block_rows),
        "i2t": _i2t_ranks(
            scores if i2t_scores is None else _check_inputs(i2t_scores, text_to_image, block_rows)[0],
            text_to_image,
            block_rows,
        ),
    }
    query_bins = {"t2i": image_bins["t2i"][text_to_image], "i2t": image_bins["i2t"]}
    empty_bins = [b for b in range(NUM_BINS) if not all(np.any(image_bins[d] == b) for d in DIRECTIONS)]
    if empty_bins:
        warnings.warn(
            f"no image has its largest object in area bin(s) {empty_bins} "
            f"(bin b = [b/10, (b+1)/10)); mR@K averages over the other bins only",
            stacklevel=2,
        )

    summary: dict[str, dict[str, Optional[float]]] = {}
    bin_recall: dict[str, dict[str, list[Optional[float]]]] = {}
    bin_counts: dict[str, list[int]] = {}
    for d in DIRECTIONS:
        r, qb = ranks[d], query_bins[d]
        per_bin = {
            f"R@{k}": [recall_at_k(r[qb == b], k) if np.any(qb == b) else None for b in range(NUM_BINS)] for k in KS
        }
        values: dict[str, Optional[float]] = {f"R@{k}": recall_at_k(r, k) for k in KS}
        for k in KS:
            filled = [v for v in per_bin[f"R@{k}"] if v is not None]
            values[f"mR@{k}"] = harmonic_mean(filled) if filled else None
        for k in KS:
            values[f"small_R@{k}"] = per_bin[f"R@{k}"][0]
        values["median_rank"] = median_rank(r, convention)
        summary[d] = values
        bin_recall[d] = per_bin
        bin_counts[d] = [int(np.sum(qb == b)) for b in range(NUM_BINS)]

    return RetrievalMetrics(
        t2i=summary["t2i"],
        i2t=summary["i2t"],
        bin_recall=bin_recall,
        bin_counts=bin_counts,
        empty_bins=empty_bins,
        num_images_without_boxes=int(np.sum(image_bins["i2t"] < 0)),
        ranks=ranks,
        convention=convention,
    )


def format_comparison(results: Mapping[str, RetrievalMetrics], directions: Sequence[str] = DIRECTIONS) -> str:
    """Plain-text table of several named runs side by side, plus each later run minus the first."""
    if not results:
        raise ValueError("nothing to format")
    names = list(results)
    header = ["metric", *names, *(f"{n}-{names[0]}" for n in names[1:])]
    rows = [header]
    for d in directions:
        for key in METRIC_KEYS:
            values = [getattr(results[n], d)[key] for n in names]
            diffs = [_diff(v, values[0]) for v in values[1:]]
            cells = [_cell(v) for v in values] + [_cell(v, signed=True) for v in diffs]
            rows.append([f"{d} {key}", *cells])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    without_boxes = {results[n].num_images_without_boxes for n in names}
    empty = {tuple(results[n].empty_bins) for n in names}
    notes = []
    if without_boxes != {0}:
        notes.append(f"images without boxes (in no bin): {sorted(without_boxes)}")
    if empty != {()}:
        notes.append(f"empty area bins (left out of mR@K): {sorted(empty)}")
    return "\n".join(lines + notes)


def _diff(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or reference is None:
        return None
    return value - reference


def _cell(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; expected one of {CONVENTIONS}")


def _check_inputs(scores: np.ndarray, text_to_image: np.ndarray, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    text_to_image = np.asarray(text_to_image)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (num_images, num_texts), got shape {scores.shape}")
    if text_to_image.shape != (scores.shape[1],):
        raise ValueError(f"text_to_image must have shape ({scores.shape[1]},), got {text_to_image.shape}")
    if not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError("text_to_image must hold integer image indices")
    if text_to_image.size and (text_to_image.min() < 0 or text_to_image.max() >= scores.shape[0]):
        raise ValueError("text_to_image holds an index outside [0, num_images)")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    for start in range(0, scores.shape[0], block_rows):
        if np.isnan(scores[start : start + block_rows]).any():
            raise ValueError("scores contain NaN")
    return scores, text_to_image
