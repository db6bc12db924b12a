"""One call from names to numbers: the Python face of ``qpert eval`` and ``qpert tune``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from ..config import COMPATS, QPertConfig, compat_dtype
from ..data.box_sources import BoxSet, load_boxes
from ..data.datasets import RetrievalDataset, load_dataset
from ..data.layout import DataLayout
from ..distributed import Ranks
from ..errors import ConfigError, MissingFileError
from ..models.registry import LoadedModel, family_of, load_model
from .metrics import METRIC_KEYS
from .pipeline import PAPER_THRESHOLDS, EvalOptions, EvalResult, evaluate, method_name, paper_grid

BOX_KINDS = {
    "entities": "flickr30k-entities",
    "coco-json": "detector",
    "coco-instances": "coco-instances",
    "coco-entities": "coco-entities",
}


def resolve_boxes(
    spec: str,
    dataset: RetrievalDataset,
    data_root: Path,
    score_threshold: float = 0.0,
    max_boxes: Optional[int] = None,
    rules: str = "paper",
) -> BoxSet:
    """``entities[:DIR]`` (default: the data root's Entities ``Annotations``), ``coco-json:FILE`` (detector
    results), ``coco-instances:FILE`` or ``coco-entities[:FILE]`` (default: the data root's
    ``coco_entities_release.json``), read by ``rules`` (``qpert.data.box_sources.Rules``)."""
    kind, _, path = spec.partition(":")
    if kind not in BOX_KINDS:
        raise ConfigError(
            f"unknown box source {spec!r}: use entities[:DIR], coco-json:FILE, "
            "coco-instances:FILE or coco-entities[:FILE]"
        )
    if not path:
        layout = DataLayout(data_root)
        if kind == "entities":
            candidates = layout.entities_candidates()
            path = str(next((c for c in candidates if c.is_dir()), candidates[0]))
        elif kind == "coco-entities":
            path = str(layout.coco_entities)
        else:
            raise ConfigError(f"--boxes {kind} needs a file: {kind}:FILE")
    options = {"score_threshold": score_threshold, "max_boxes": max_boxes} if kind == "coco-json" else {}
    return load_boxes(BOX_KINDS[kind], path, dataset, rules, **options)


def read_config_file(path: Union[str, Path]) -> QPertConfig:
    """A config JSON as written by ``qpert tune`` (or a bare QPertConfig dict).

    Raises:
        MissingFileError: no such file; ConfigError: not JSON, or not a Q-Pert config.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no config file {path} (write one with qpert tune --output)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not JSON ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("qpert"), dict):
        data = data["qpert"]
    try:
        return QPertConfig.from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def evaluate_benchmark(
    model: Union[str, LoadedModel],
    dataset: str,
    data_root: Union[str, Path],
    boxes: str,
    configs: Sequence[QPertConfig],
    split: str = "test",
    captions_file: Optional[str] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
    score_threshold: float = 0.0,
    max_boxes: Optional[int] = None,
    options: Optional[EvalOptions] = None,
    trust_remote_code: bool = False,
    compat: str = "paper",
    bin_boxes: Optional[str] = None,
    ranks: Optional[Ranks] = None,
) -> EvalResult:
    """Baseline and every Q-Pert config on a benchmark split, side by side, from one feature cache.

    Args:
        model: a name or folder for :func:`qpert.load_model`, or a :class:`~qpert.LoadedModel`.
        dataset: ``flickr30k``, ``coco``, ``flickr30k-fg`` or ``coco-fg``, under ``data_root`` in the
            documented layout; ``split`` ``test`` or ``val``; ``captions_file`` replaces the captions.
        boxes: the box source that perturbs (``entities[:DIR]``, ``coco-json:FILE``,
            ``coco-instances:FILE``, ``coco-entities[:FILE]``); ``score_threshold`` and ``max_boxes``
            filter ``coco-json`` detections.
        configs: the Q-Pert settings to compare with the baseline.
        device, dtype, trust_remote_code: for loading the model by name.
        options: batch sizes, cache, ITM re-ranking and the rest (:class:`EvalOptions`).
        compat: ``official`` runs what the official code runs (its box rules, projector, weights,
            token weights and metric conventions, in float32); every config is set to it.
        bin_boxes: another box source (same syntax as ``boxes``) that places images in the mR@K bins.
        ranks: this process's place under ``torchrun`` (``qpert.distributed.start()``): each rank does its
            share, through a cache every rank sees; the result is the same as in one process.

    Returns:
        :class:`EvalResult`: metrics per method (``.table()``, ``.to_dict()``) and the settings.

    Raises:
        ConfigError: an unknown compat, a dtype other than float32 with ``compat="official"``, or an
            ablation projector with it.
        DataError, MissingFileError: a dataset or box source not in the documented layout.
    """
    if compat not in COMPATS:
        raise ConfigError(f"unknown compat {compat!r}; choose one of {list(COMPATS)}")
    dtype = compat_dtype(compat, dtype)
    if compat == "official":
        ablations = sorted({c.projector for c in configs if c.projector not in ("paper", "official")})
        if ablations:
            raise ConfigError(f"the ablation projectors {ablations} run with --compat paper")
        configs = [replace(c, compat=compat, projector=None) for c in configs]
    options = replace(options or EvalOptions(), compat=compat)
    data = load_dataset(dataset, Path(data_root), split=split, captions_file=captions_file)
    box_set = resolve_boxes(boxes, data, Path(data_root), score_threshold, max_boxes, rules=compat)
    bin_set = (
        resolve_boxes(bin_boxes, data, Path(data_root), score_threshold, max_boxes, rules=compat) if bin_boxes else None
    )
    if isinstance(model, str):
        model = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    methods = {"baseline": None}
    for config in configs:
        methods["qpert" if len(configs) == 1 else method_name(config)] = config
    return evaluate(model, data, box_set, methods, options, bin_boxes=bin_set, ranks=ranks)


def tune(
    model: Union[str, LoadedModel],
    dataset: str,
    data_root: Union[str, Path],
    boxes: str,
    split: str = "val",
    alphas: Optional[Sequence[float]] = None,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    weights: Optional[Sequence[str]] = None,
    select_by: str = "t2i mR@1",
    device: str = "cpu",
    dtype: Optional[str] = None,
    trust_remote_code: bool = False,
    compat: str = "paper",
    **kwargs,
) -> tuple[EvalResult, str]:
    """The paper's grid on the validation split: alpha x the five weight functions x tau.

    Args:
        model, dataset, data_root, boxes, split, device, dtype, trust_remote_code, compat, **kwargs:
            as for :func:`evaluate_benchmark`.
        alphas: the alpha values (default: the model's family's grid, ``qpert models``).
        thresholds: the tau values; weights: the weight functions (default: all five).
        select_by: ``"<t2i|i2t> <metric>"``, a metric of :data:`~qpert.eval.metrics.METRIC_KEYS`.

    Returns:
        (the results of every setting, the name of the best one by ``select_by``).

    Raises:
        ConfigError: a malformed ``select_by``; and as :func:`evaluate_benchmark`.
    """
    direction, _, key = select_by.partition(" ")
    if direction not in ("t2i", "i2t") or key not in METRIC_KEYS:
        raise ConfigError(f"select_by must be '<t2i|i2t> <metric>' with a metric among {METRIC_KEYS}")
    if isinstance(model, str):
        model = load_model(model, device=device, dtype=compat_dtype(compat, dtype), trust_remote_code=trust_remote_code)
    alphas = alphas or (model.spec.alphas if model.spec else family_of(model.model).alpha_grid)
    grid = [c for c in paper_grid(alphas, thresholds) if weights is None or c.weight in weights]
    result = evaluate_benchmark(model, dataset, data_root, boxes, grid, split=split, compat=compat, **kwargs)
    scored = {n: getattr(m, direction)[key] for n, m in result.metrics.items() if n != "baseline"}
    best = max(scored, key=lambda n: -1.0 if scored[n] is None else scored[n])
    return result, best
