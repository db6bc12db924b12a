"""One call from names to numbers: the Python face of ``qpert eval`` and ``qpert tune``."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Union

from ..config import COMPATS, QPertConfig, compat_dtype
from ..data.boxes import BoxSet, load_boxes
from ..data.datasets import RetrievalDataset, load_dataset
from ..models.registry import MODELS, load_model
from .metrics import METRIC_KEYS
from .pipeline import EvalOptions, EvalResult, evaluate, method_name, paper_grid

BOX_KINDS = {"entities": "flickr30k-entities", "coco-json": "detector", "coco-instances": "coco-instances",
             "coco-entities": "coco-entities"}


def resolve_boxes(spec: str, dataset: RetrievalDataset, data_root: Path, score_threshold: float = 0.0,
                  max_boxes: Optional[int] = None, rules: str = "paper") -> BoxSet:
    """``entities`` (ROOT/flickr30k/Annotations or ROOT/flickr30k_entities/Annotations), ``entities:DIR``,
    ``coco-json:FILE`` (detector results), ``coco-instances:FILE`` or ``coco-entities:FILE``, read by
    ``rules`` (``qpert.data.boxes.Rules``)."""
    kind, _, path = spec.partition(":")
    if kind not in BOX_KINDS:
        raise ValueError(f"unknown box source {spec!r}: use entities[:DIR], coco-json:FILE, "
                         "coco-instances:FILE or coco-entities:FILE")
    if not path:
        if kind != "entities":
            raise ValueError(f"--boxes {kind} needs a file: {kind}:FILE")
        candidates = [Path(data_root) / "flickr30k" / "Annotations", Path(data_root) / "flickr30k_entities" / "Annotations"]
        path = str(next((c for c in candidates if c.is_dir()), candidates[0]))
    options = {"score_threshold": score_threshold, "max_boxes": max_boxes} if kind == "coco-json" else {}
    return load_boxes(BOX_KINDS[kind], path, dataset, rules, **options)


def read_config_file(path: Union[str, Path]) -> QPertConfig:
    """A config JSON as written by ``qpert tune`` (or a bare QPertConfig dict)."""
    data = json.loads(Path(path).read_text())
    return QPertConfig.from_dict(data.get("qpert", data))


def evaluate_benchmark(model: str, dataset: str, data_root: Union[str, Path], boxes: str,
                       configs: Sequence[QPertConfig], split: str = "test", captions_file: Optional[str] = None,
                       device: str = "cpu", dtype: Optional[str] = None, score_threshold: float = 0.0,
                       max_boxes: Optional[int] = None, options: Optional[EvalOptions] = None,
                       trust_remote_code: bool = False, compat: str = "paper",
                       bin_boxes: Optional[str] = None) -> EvalResult:
    """Baseline and every Q-Pert config on a benchmark split, side by side.

    ``compat="official"`` runs what the official code runs (its box rules, projector, weights, token
    weights and metric conventions, in float32); ``bin_boxes`` (same syntax as ``boxes``) bins the images
    for mR@K by another box source.
    """
    if compat not in COMPATS:
        raise ValueError(f"unknown compat {compat!r}; choose one of {list(COMPATS)}")
    dtype = compat_dtype(compat, dtype)
    if compat == "official":
        ablations = sorted({c.projector for c in configs if c.projector not in ("paper", "official")})
        if ablations:
            raise ValueError(f"the ablation projectors {ablations} run with --compat paper")
        configs = [replace(c, compat=compat, projector=None) for c in configs]
    options = replace(options or EvalOptions(), compat=compat)
    data = load_dataset(dataset, Path(data_root), split=split, captions_file=captions_file)
    box_set = resolve_boxes(boxes, data, Path(data_root), score_threshold, max_boxes, rules=compat)
    bin_set = resolve_boxes(bin_boxes, data, Path(data_root), score_threshold, max_boxes, rules=compat) \
        if bin_boxes else None
    loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    methods = {"baseline": None}
    for config in configs:
        methods["qpert" if len(configs) == 1 else method_name(config)] = config
    return evaluate(loaded, data, box_set, methods, options, bin_boxes=bin_set)


def tune(model: str, dataset: str, data_root: Union[str, Path], boxes: str, split: str = "val",
         alphas: Optional[Sequence[float]] = None, thresholds: Sequence[float] = (0.8, 0.85, 0.9, 0.95, 0.99),
         weights: Optional[Sequence[str]] = None, select_by: str = "t2i mR@1", **kwargs) -> tuple[EvalResult, str]:
    """The paper's grid on the validation split; returns the results and the best method's name."""
    direction, _, key = select_by.partition(" ")
    if direction not in ("t2i", "i2t") or key not in METRIC_KEYS:
        raise ValueError(f"select_by must be '<t2i|i2t> <metric>' with a metric among {METRIC_KEYS}")
    if alphas is None:
        spec = MODELS.get(model)
        alphas = spec.alpha_grid if spec else (2.0, 4.0, 6.0, 8.0, 10.0)
    grid = [c for c in paper_grid(alphas, thresholds) if weights is None or c.weight in weights]
    result = evaluate_benchmark(model, dataset, data_root, boxes, grid, split=split, **kwargs)
    scored = {n: getattr(m, direction)[key] for n, m in result.metrics.items() if n != "baseline"}
    best = max(scored, key=lambda n: -1.0 if scored[n] is None else scored[n])
    return result, best
