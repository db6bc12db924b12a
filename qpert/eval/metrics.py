"""Retrieval metrics of the Q-Pert protocol: R@K, median rank, area-binned mR@K, small-object R@K.

Everything starts from the 1-based rank of each query's positive, computed with numpy over
blocks of gallery rows, so a 5k x 25k score matrix needs no Python loop over queries.

Ties count against the query: a negative whose score equals the positive's is ranked ahead
of it. This is the pessimistic convention, so a degenerate scorer (e.g. all scores equal)
gets rank = gallery size instead of a flattering rank 1.

``convention="official"`` follows the official Q-Pert code's ``BaseTask`` (``base_task.py``):
median rank ``np.median(ranks)`` (not floored), and area bins from float32 areas against
``np.linspace(0, 1, 11)`` edges with ``lower <= area < upper`` (an area of 1.0 is in no bin).
Ties keep qpert's rule; they only move ranks past the re-ranked top k, where the official
code's ``argsort`` order among its -100 fillers is arbitrary anyway.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Sequence

import numpy as np

KS = (1, 5, 10)
NUM_BINS = 10
Convention = Literal["paper", "official"]
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
    per bin. ``ranks[d]`` are the 1-based positive ranks, kept for per-query analysis.
    """

    t2i: dict[str, Optional[float]]
    i2t: dict[str, Optional[float]]
    bin_recall: dict[str, dict[str, list[Optional[float]]]]
    bin_counts: dict[str, list[int]]
    empty_bins: list[int]
    num_images_without_boxes: int
    ranks: dict[str, np.ndarray] = field(repr=False)
    convention: str = "paper"

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


def t2i_ranks(
    scores: np.ndarray, text_to_image: np.ndarray, block_rows: int = DEFAULT_BLOCK_ROWS
) -> np.ndarray:
    """1-based rank of each text's paired image among all images (ties against the text)."""
    return _t2i_ranks(*_check_inputs(scores, text_to_image, block_rows), block_rows)


def i2t_ranks(
    scores: np.ndarray, text_to_image: np.ndarray, block_rows: int = DEFAULT_BLOCK_ROWS
) -> np.ndarray:
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
    tied_positives = np.bincount(
        text_to_image, weights=positive >= best[text_to_image], minlength=num_images
    ).astype(np.int64)
    at_least_best = np.empty(num_images, dtype=np.int64)
    for start in range(0, num_images, block_rows):
        stop = start + block_rows
        at_least_best[start:stop] = (scores[start:stop] >= best[start:stop, None]).sum(axis=1)
    return at_least_best - tied_positives + 1


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose positive is within the top ``k``."""
    return float(100.0 * np.mean(ranks <= k))


def median_rank(ranks: np.ndarray, convention: Convention = "paper") -> float:
    """Median of 1-based ranks: floor(median of 0-based ranks) + 1 (VSE++/SCAN), or the plain median
    (official code); they differ by 0.5 when an even number of queries straddles two ranks."""
    if convention == "official":
        return float(np.median(ranks))
    return float(np.floor(np.median(ranks - 1)) + 1)


def area_bins(max_areas: np.ndarray, convention: Convention = "paper") -> np.ndarray:
    """Bin index 0..9 of each image's largest normalized object area; -1 where NaN (no boxes).

    Bin b is [b/10, (b+1)/10); the last bin also holds 1.0. The official convention compares
    float32 areas with ``np.linspace`` edges and puts 1.0 (and anything outside [0, 1)) in no bin.
    """
    if convention == "official":
        areas32 = np.asarray(max_areas, dtype=np.float32)
        edges = np.linspace(0, 1.0, NUM_BINS + 1)
        bins = np.full(areas32.shape, -1, dtype=np.int64)
        for b in range(NUM_BINS):
            bins[(edges[b] <= areas32) & (areas32 < edges[b + 1])] = b
        return bins
    areas = np.asarray(max_areas, dtype=np.float64)
    valid = ~np.isnan(areas)
    if np.any((areas[valid] < 0) | (areas[valid] > 1)):
        raise ValueError("max_areas must lie in [0, 1] (or be NaN for images without boxes)")
    bins = np.full(areas.shape, -1, dtype=np.int64)
    bins[valid] = np.minimum(np.floor(areas[valid] * NUM_BINS), NUM_BINS - 1).astype(np.int64)
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
    convention: Convention = "paper",
) -> RetrievalMetrics:
    """All metrics of the protocol from an (images x texts) score matrix, higher = better.

    ``max_areas[i]`` is image i's largest normalized object area (NaN: no boxes). Per-bin
    recalls use the queries of the bin (T2I: texts whose image is in it; I2T: its images),
    still ranked against the whole gallery. mR@K is the harmonic mean over non-empty bins;
    empty bins are listed in ``empty_bins`` and reported with a warning. With ITM re-ranking
    each direction has its own matrix (as in BLIP's evaluation): ``scores`` then ranks T2I and
    ``i2t_scores`` (same shape) ranks I2T. ``convention`` picks the median and the bins (module doc).
    """
    scores, text_to_image = _check_inputs(scores, text_to_image, block_rows)
    max_areas = np.asarray(max_areas)
    if max_areas.shape != (scores.shape[0],):
        raise ValueError(f"max_areas must have shape ({scores.shape[0]},), got {max_areas.shape}")
    image_bins = area_bins(max_areas, convention)
    ranks = {
        "t2i": _t2i_ranks(scores, text_to_image, block_rows),
        "i2t": _i2t_ranks(scores if i2t_scores is None else _check_inputs(i2t_scores, text_to_image, block_rows)[0],
                          text_to_image, block_rows),
    }
    query_bins = {"t2i": image_bins[text_to_image], "i2t": image_bins}
    empty_bins = [b for b in range(NUM_BINS) if not np.any(image_bins == b)]
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
            f"R@{k}": [
                recall_at_k(r[qb == b], k) if np.any(qb == b) else None for b in range(NUM_BINS)
            ]
            for k in KS
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
        num_images_without_boxes=int(np.sum(image_bins < 0)),
        ranks=ranks,
        convention=convention,
    )


def format_comparison(
    results: Mapping[str, RetrievalMetrics], directions: Sequence[str] = DIRECTIONS
) -> str:
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
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])
        for row in rows
    ]
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


def _check_inputs(
    scores: np.ndarray, text_to_image: np.ndarray, block_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    text_to_image = np.asarray(text_to_image)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (num_images, num_texts), got shape {scores.shape}")
    if text_to_image.shape != (scores.shape[1],):
        raise ValueError(
            f"text_to_image must have shape ({scores.shape[1]},), got {text_to_image.shape}"
        )
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
