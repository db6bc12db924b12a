"""Query-aware Q-Pert on the toy benchmark (#22): does perturbing towards only the objects a query names help?

Photo search (``qpert search --query-boxes``) re-scores its best candidates with Q-Pert on the boxes an
open-vocabulary detector finds for what the query names, instead of on every object the index's detector
found. This measures the idea offline (``qpert demo --query-aware``), on scenes whose captions name a subset
of their shapes while their boxes hold all of them (``SceneConfig(caption_names="subset")``: the detector
situation). Every row but the baseline gets its own alpha, chosen by T2I mR@1 on the validation seed as
``qpert demo`` chooses it:

* baseline, Q-Pert on all boxes, query scaling (P = I, the ablation's control): ``qpert.eval.evaluate``.
* Q-Pert on the named boxes: baseline ITC ranks first; each caption's top k candidates are re-scored with
  Q-Pert on only those of the candidate's boxes whose shape (colour and shape) the caption names, what a
  perfect open-vocabulary detector would return; a candidate with none keeps its baseline score (Q-Pert on
  no boxes is the model itself). The rest rank below the k, as a search returns only its candidates.
  I2T the same way round: each image's top k captions, each re-scored on the image's boxes it names.
* Q-Pert on all boxes where one is named: the same candidates, re-scored on all their boxes when the caption
  names at least one of them. A perfect detector also tells which candidates hold a named shape; this
  control separates that from the choice of boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..adapters import ImageObjects, QPertHandle
from ..attach import attach
from ..config import QPertConfig
from ..data.box_sources import BoxSet, flickr30k_entities_boxes
from ..data.datasets import RetrievalDataset, load_dataset
from ..demo import DEMO_MODEL, TEST_SEEDS, VALIDATION_SEED, mean_std, toy_threads
from ..eval.metrics import RetrievalMetrics, retrieval_metrics
from ..eval.pipeline import EvalOptions, evaluate
from ..models.family import RetrievalHeads
from ..models.registry import MODELS, LoadedModel, family_of, load_model, retrieval_heads
from .scenes import Scene, SceneConfig, make_scenes, named_objects
from .writer import write_scenes

#: Captions naming 1 .. M-1 of a scene's M shapes; boxes on all M.
SCENES = SceneConfig(caption_names="subset")
BASELINE, ALL_BOXES, NAMED, GATED, SCALING = (
    "baseline",
    "Q-Pert, all boxes",
    "Q-Pert, named boxes",
    "Q-Pert, all if one named",
    "query scaling",
)
ROWS = (BASELINE, ALL_BOXES, NAMED, GATED, SCALING)
#: Rows the evaluation pipeline runs, by the projector each object gets.
PIPELINE = {ALL_BOXES: "paper", SCALING: "identity"}
#: Rows re-scored per (caption, candidate): the indexes of the candidate's boxes to perturb with, from the
#: ones the caption names and the candidate's number of boxes.
BoxRule = Callable[[tuple[int, ...], int], tuple[int, ...]]
RESCORED: dict[str, BoxRule] = {
    NAMED: lambda named, count: named,
    GATED: lambda named, count: tuple(range(count)) if named else (),
}
COLUMNS = (("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "mR@1"), ("t2i", "small_R@1"), ("i2t", "R@1"))


@dataclass
class QueryAwareResult:
    alphas: dict[str, float]  # per row but the baseline, chosen on the validation seed by T2I mR@1
    validation: dict[tuple[str, float], RetrievalMetrics]  # (row, alpha) -> metrics; the baseline's alpha is 0
    tests: dict[int, dict[str, RetrievalMetrics]]  # test seed -> row -> metrics
    k: int  # candidates re-scored per query

    def table(self) -> str:
        """Each row's headline metrics, mean ± std over the test seeds."""
        header = f"{'method':26s} {'alpha':>5s} " + " ".join(f"{d.upper() + ' ' + k:>15s}" for d, k in COLUMNS)
        lines = [header]
        for row in ROWS:
            cells = []
            for direction, key in COLUMNS:
                values = [getattr(metrics[row], direction)[key] for metrics in self.tests.values()]
                cells.append(f"{'-':>15s}" if None in values else mean_std(values))
            alpha = f"{self.alphas[row]:5g}" if row in self.alphas else f"{'-':>5s}"
            lines.append(f"{row:26s} {alpha} " + " ".join(cells))
        return "\n".join(lines)


@dataclass
class Split:
    """One seed's scenes, written and loaded back as the evaluation pipeline reads a benchmark."""

    scenes: list[Scene]
    dataset: RetrievalDataset
    boxes: BoxSet


def write_split(folder: Path, seed: int, count: int, split: str) -> Split:
    scenes = make_scenes(seed, count, SCENES)
    layout = write_scenes(folder, scenes, split)
    dataset = load_dataset("flickr30k", layout.root, split=split)
    return Split(scenes, dataset, flickr30k_entities_boxes(layout.entities, dataset.image_ids))


@dataclass
class Rescored:
    """ITC of a gallery, each query's top k by it, and re-scored (I, T) matrices (-inf outside the top k)."""

    baseline: np.ndarray  # (I, T) first-stage ITC
    t2i: np.ndarray  # (I, T) bool: each text's top k images
    i2t: np.ndarray  # (I, T) bool: each image's top k texts
    scores: dict[tuple[str, float], np.ndarray]  # (row, alpha) -> (I, T), finite on t2i | i2t

    def metrics(self, key: tuple[str, float], text_to_image: np.ndarray, max_areas: np.ndarray) -> RetrievalMetrics:
        """T2I ranks each text's k re-scored images, I2T each image's k re-scored texts; the rest rank last."""
        scores = self.scores[key]
        return retrieval_metrics(
            np.where(self.t2i, scores, -np.inf),
            text_to_image,
            max_areas,
            i2t_scores=np.where(self.i2t, scores, -np.inf),
        )


@torch.no_grad()
def rescore(
    loaded: LoadedModel,
    scenes: Sequence[Scene],
    texts: Sequence[str],
    configs: dict[str, Sequence[QPertConfig]],
    k: int,
    batch_size: int = 64,
) -> Rescored:
    """Baseline ITC of ``scenes`` x ``texts``, and for each row of :data:`RESCORED` and each of its configs
    (one recipe per row: the subspaces serve every alpha) the top k pairs re-scored with Q-Pert on the boxes
    the row's rule picks from those the text names."""
    model, processor = loaded.model, loaded.processor
    heads = retrieval_heads(model)
    images = [Image.fromarray(s.image) for s in scenes]  # pixel for pixel the written PNGs
    tokens = torch.cat(
        [
            heads.image_tokens(model, heads.preprocess(model, processor, images[s : s + batch_size]))
            for s in range(0, len(images), batch_size)
        ]
    )
    ids, mask = heads.tokenize(model, processor, texts)
    text_emb = torch.cat(
        [heads.text_embeddings(model, ids[s : s + 256], mask[s : s + 256]) for s in range(0, len(texts), 256)]
    )
    baseline = _itc(heads, model, tokens, text_emb, batch_size)
    n_img, n_txt = baseline.shape
    t2i = np.zeros(baseline.shape, dtype=bool)
    t2i[np.argsort(-baseline, axis=0, kind="stable")[: min(k, n_img)], np.arange(n_txt)] = True
    i2t = np.zeros(baseline.shape, dtype=bool)
    i2t[np.arange(n_img)[:, None], np.argsort(-baseline, axis=1, kind="stable")[:, : min(k, n_txt)]] = True
    pairs = np.argwhere(t2i | i2t)
    named = [named_objects(texts[t], scenes[i].objects) for i, t in pairs]
    sizes = [s.image.shape[:2] for s in scenes]
    scores = {}
    with attach(model, QPertConfig()) as handle:
        for row, rule in RESCORED.items():
            chosen = [rule(n, len(scenes[i].objects)) for (i, _), n in zip(pairs, named)]
            per_pair = pair_scores(
                handle,
                heads,
                tokens,
                sizes,
                [s.boxes for s in scenes],
                text_emb,
                pairs,
                chosen,
                configs[row],
                baseline[pairs[:, 0], pairs[:, 1]],
                batch_size,
            )
            for config, values in zip(configs[row], per_pair):
                matrix = np.full(baseline.shape, -np.inf, dtype=np.float32)
                matrix[pairs[:, 0], pairs[:, 1]] = values
                scores[row, config.alpha] = matrix
    return Rescored(baseline, t2i, i2t, scores)


def _itc(
    heads: RetrievalHeads, model: torch.nn.Module, tokens: torch.Tensor, text_emb: torch.Tensor, batch_size: int
) -> np.ndarray:
    """(I, T) unperturbed ITC."""
    return torch.cat(
        [
            heads.itc_scores(heads.image_embeddings(model, tokens[s : s + batch_size]), text_emb).float().cpu()
            for s in range(0, len(tokens), batch_size)
        ]
    ).numpy()


@torch.no_grad()
def pair_scores(
    handle: QPertHandle,
    heads: RetrievalHeads,
    tokens: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    boxes: Sequence[np.ndarray],
    text_emb: torch.Tensor,
    pairs: np.ndarray,
    chosen: Sequence[tuple[int, ...]],
    configs: Sequence[QPertConfig],
    baseline: np.ndarray,
    batch_size: int = 64,
) -> list[np.ndarray]:
    """Per config, the ITC of each (image, text) pair of ``pairs`` with Q-Pert on the boxes ``chosen[p]`` of
    its image; a pair with none keeps ``baseline[p]``. An image embedding depends on the image and its boxes,
    not on the text: one set of subspaces and one embedding per distinct (image, boxes), for all texts."""
    keys = sorted({(int(i), c) for (i, _), c in zip(pairs, chosen) if c})
    out = [np.asarray(baseline, dtype=np.float32).copy() for _ in configs]
    if not keys:
        return out
    image = torch.tensor([i for i, _ in keys])
    batches = [slice(s, s + batch_size) for s in range(0, len(keys), batch_size)]
    objects = [
        ImageObjects.from_boxes(
            handle,
            tokens[image[b]],
            [boxes[i][list(c)] for i, c in keys[b]],
            [image_sizes[i] for i, _ in keys[b]],
            configs[0],
        )
        for b in batches
    ]
    hit = np.array([p for p, c in enumerate(chosen) if c])
    row = {key: r for r, key in enumerate(keys)}
    rows = np.array([row[int(pairs[p, 0]), chosen[p]] for p in hit])
    model = handle.model
    for config, values in zip(configs, out):
        itc = []
        for b, found in zip(batches, objects):
            with ImageObjects(handle, found.subspaces, config).perturb():
                itc.append(heads.itc_scores(heads.image_embeddings(model, tokens[image[b]]), text_emb).float().cpu())
        values[hit] = torch.cat(itc).numpy()[rows, pairs[hit, 1]]
    return out


def run_query_aware(
    out_dir: Path,
    model: str = DEMO_MODEL,
    seeds: Sequence[int] = TEST_SEEDS,
    n_test: int = 500,
    n_val: int = 300,
    alphas: Optional[Sequence[float]] = None,
    k: int = 10,
    progress: bool = True,
) -> QueryAwareResult:
    """Choose each row's alpha on the validation seed, then evaluate every row on each test seed."""
    with toy_threads(model):
        loaded = load_model(model)
        spec = MODELS.get(model)
        alphas = alphas or (spec.alphas if spec else family_of(loaded.model).alpha_grid)
        grid = {
            row: [
                QPertConfig(alpha=a, weight="constant", threshold=0.99, projector=PIPELINE.get(row, "paper"))
                for a in alphas
            ]
            for row in ROWS[1:]
        }
        out_dir = Path(out_dir)
        validation = _evaluate(
            loaded, write_split(out_dir / f"seed{VALIDATION_SEED}", VALIDATION_SEED, n_val, "val"), grid, k, progress
        )
        chosen = {
            row: max(configs, key=lambda c: validation[row, c.alpha].t2i["mR@1"] or 0.0)
            for row, configs in grid.items()
        }
        tests = {}
        for seed in seeds:
            split = write_split(out_dir / f"seed{seed}", seed, n_test, "test")
            metrics = _evaluate(loaded, split, {row: [c] for row, c in chosen.items()}, k, progress)
            tests[seed] = {
                BASELINE: metrics[BASELINE, 0.0],
                **{row: metrics[row, c.alpha] for row, c in chosen.items()},
            }
    return QueryAwareResult({row: c.alpha for row, c in chosen.items()}, validation, tests, k)


def _evaluate(
    loaded: LoadedModel, split: Split, configs: dict[str, Sequence[QPertConfig]], k: int, progress: bool
) -> dict[tuple[str, float], RetrievalMetrics]:
    """Metrics of the baseline (key ``(BASELINE, 0.0)``) and of every (row, alpha) of ``configs``."""
    methods = {f"{row} alpha={c.alpha:g}": (row, c) for row in PIPELINE for c in configs[row]}
    result = evaluate(
        loaded,
        split.dataset,
        split.boxes,
        {BASELINE: None, **{name: c for name, (_, c) in methods.items()}},
        EvalOptions(itm=False, progress=progress),
    )
    metrics = {(BASELINE, 0.0): result.metrics[BASELINE]}
    metrics.update({(row, c.alpha): result.metrics[name] for name, (row, c) in methods.items()})
    rescored = rescore(loaded, split.scenes, split.dataset.texts, {row: configs[row] for row in RESCORED}, k)
    max_areas = split.boxes.max_areas(split.dataset.image_ids)
    metrics.update({key: rescored.metrics(key, split.dataset.text_to_image, max_areas) for key in rescored.scores})
    return metrics
