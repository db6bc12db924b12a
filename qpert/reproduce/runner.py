"""``qpert reproduce``: from a data root (fetched or checked first) to results.json and report.html.

Every step goes through the same calls as ``qpert data fetch``, ``qpert tune`` and ``qpert eval``, so a
reproduction is resumable through the feature cache and shares its work across ``torchrun`` ranks.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .. import __version__
from ..atomic import atomic_write
from ..config import QPertConfig
from ..data.fetch import fetch_data
from ..data.fetch.catalog import DEFAULT_DATA_ROOT
from ..distributed import Ranks
from ..errors import MissingFileError
from ..eval.api import evaluate_benchmark, tune
from ..eval.pipeline import EvalOptions, EvalResult
from ..models.registry import load_model
from .protocols import Protocol, Run, get_protocol
from .published import Published, published

#: The metrics every comparison shows, published or not (published ones are added).
HEADLINE = ("R@1", "R@5", "R@10", "mR@1", "small_R@1")
METHODS = ("baseline", "qpert")
SELECT_BY = "t2i mR@1"


@dataclass
class RunResult:
    run: Run
    config: QPertConfig  # the setting evaluated on test
    test: EvalResult
    tuning: Optional[EvalResult] = None  # the validation grid, when the setting was tuned

    def tuning_rows(self, top: int = 10) -> list[tuple[Any, ...]]:
        """The best ``top`` settings of the validation grid by T2I mR@1, and the baseline."""
        if self.tuning is None:
            return []
        metrics = self.tuning.metrics
        ranked = sorted((n for n in metrics if n != "baseline"), key=lambda n: -(metrics[n].t2i["mR@1"] or -1.0))
        return [
            (name, metrics[name].t2i["R@1"], metrics[name].t2i["mR@1"], metrics[name].t2i["small_R@1"])
            for name in ["baseline", *ranked[:top]]
        ]


@dataclass
class Reproduction:
    protocol: Protocol
    model: str
    published: Published
    runs: list[RunResult]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def model_is_published(self) -> bool:
        """Whether the numbers are comparable with the published ones (the protocol's own checkpoint)."""
        return self.model == self.protocol.model

    def comparison(self) -> list[dict[str, Any]]:
        """One row per (run, method, direction, metric): measured, published (or None) and their difference."""
        rows = []
        for done in self.runs:
            for method in METHODS:
                row = self.published.row(done.run.name, method)
                for direction in ("t2i", "i2t"):
                    extra = [] if row is None else [m for m in row.metrics.get(direction, {}) if m not in HEADLINE]
                    for metric in (*HEADLINE, *extra):
                        measured = getattr(done.test.metrics[method], direction)[metric]
                        value = row.value(direction, metric) if row else None
                        difference = None if value is None or measured is None else round(measured - value, 2)
                        rows.append(
                            {
                                "run": done.run.name,
                                "method": method,
                                "direction": direction,
                                "metric": metric,
                                "measured": measured,
                                "published": value,
                                "difference": difference,
                            }
                        )
        return rows

    def summary(self) -> str:
        """The headline metrics of every run and method, with the published numbers and the difference under them."""
        columns = [(d, m) for d in ("t2i", "i2t") for m in HEADLINE]
        labels = [f"{d.upper()} {m.replace('small_', 's')}" for d, m in columns]
        lines = [f"{'run':9s} {'method':9s} {'':10s} " + " ".join(f"{label:>9s}" for label in labels)]
        for done in self.runs:
            for method in METHODS:
                metrics = done.test.metrics[method]
                measured = [getattr(metrics, d)[m] for d, m in columns]
                lines.append(f"{done.run.name:9s} {method:9s} {'measured':10s} " + _cells(measured))
                row = self.published.row(done.run.name, method)
                if row is None:
                    continue
                values = [row.value(d, m) for d, m in columns]
                lines.append(f"{'':9s} {'':9s} {'published':10s} " + _cells(values))
                diffs = [None if v is None or x is None else x - v for x, v in zip(measured, values)]
                lines.append(f"{'':9s} {'':9s} {'difference':10s} " + _cells(diffs, signed=True))
        lines.append("sR@1: R@1 of the small-object subset (largest box under 10% of the image); –: none published")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol.name,
            "description": self.protocol.description,
            "model": self.model,
            "model_is_published": self.model_is_published,
            "settings": self.settings,
            "published": {"source": self.published.source, "url": self.published.url, "note": self.published.note},
            "comparison": self.comparison(),
            "runs": {
                done.run.name: {
                    "description": done.run.description,
                    "boxes": done.run.boxes,
                    "bin_boxes": done.run.bin_boxes,
                    "compat": done.run.compat,
                    "config": done.config.to_dict(),
                    "tuned": done.tuning is not None,
                    "test": done.test.to_dict(),
                    "tuning": done.tuning.to_dict() if done.tuning is not None else None,
                }
                for done in self.runs
            },
        }


def _cells(values: list[Optional[float]], signed: bool = False) -> str:
    return " ".join(f"{'–':>9s}" if v is None else (f"{v:+9.2f}" if signed else f"{v:9.2f}") for v in values)


def reproduce(
    protocol: str,
    data_root: Union[str, Path] = DEFAULT_DATA_ROOT,
    *,
    model: Optional[str] = None,
    device: str = "cpu",
    detections: Optional[Path] = None,
    fetch: bool = True,
    mirror: Optional[str] = None,
    catalog: Optional[Path] = None,
    flickr30k_images: Optional[Path] = None,
    tune_itm: bool = False,
    alphas: Optional[list[float]] = None,
    options: Optional[EvalOptions] = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    ranks: Optional[Ranks] = None,
    echo: Callable[[str], None] = print,
) -> Reproduction:
    """Run ``protocol`` (``official-example``, ``flickr30k``, ``coco``) end to end and return its numbers.

    Args:
        data_root: the data root; with ``fetch`` its data are fetched (or, when already there, checked by
            size against the manifest) with ``mirror``, ``catalog`` and ``flickr30k_images`` as for
            :func:`qpert.data.fetch.fetch_data`; without, it must hold the documented layout.
        model: a checkpoint other than the protocol's (its numbers are then not the published ones).
        detections: a COCO results JSON of a detector's boxes for the (D) rows (val and test images).
        tune_itm: score the validation grid with ITM re-ranking too (slow; ITC alone by default).
        alphas: the alpha grid of tuned runs (default: the model's paper grid).
        options: cache, batch sizes and the rest (:class:`EvalOptions`); ``itm`` and ``k`` are the protocol's.
        ranks: this process's place under ``torchrun``: only rank 0 fetches, every rank evaluates its share.

    Raises:
        ConfigError: an unknown protocol; MissingFileError: no ``detections`` file; FetchError and the
        evaluation's errors as their commands raise them.
    """
    spec = get_protocol(protocol)
    ranks = ranks or Ranks()
    if detections is not None and not Path(detections).is_file():
        raise MissingFileError(f"--detections {detections}: no such file (a COCO results JSON of val and test)")
    runs = spec.runs(Path(detections) if detections is not None else None)
    data_root = Path(data_root).expanduser()
    started = time.time()
    if fetch:
        if ranks.is_main:
            echo(f"data: qpert data fetch {' '.join(spec.data)} --data-root {data_root}")
            report = fetch_data(
                list(spec.data),
                data_root,
                mirror=mirror,
                catalog=catalog,
                flickr30k_images=flickr30k_images,
                progress=progress,
                echo=echo,
            )
            echo(report.summary())
        ranks.barrier()
    name = model or spec.model
    echo(f"model: {name} in float32 (downloaded the first time)")
    loaded = load_model(name, device=str(ranks.device(device)), dtype="fp32", trust_remote_code=trust_remote_code)
    options = replace(options or EvalOptions(), progress=progress)
    done = []
    for number, run in enumerate(runs, 1):
        common = {"compat": run.compat, "bin_boxes": run.bin_boxes, "ranks": ranks}
        tuning = None
        config = run.config
        if config is None:
            echo(f"run {run.name} ({number}/{len(runs)}): tuning on val by {SELECT_BY} ({run.description})")
            grid_options = replace(options, itm=tune_itm, k=run.k, keep_scores=False)
            tuning, best = tune(
                loaded, spec.dataset, data_root, run.boxes, alphas=alphas, options=grid_options, **common
            )
            config = QPertConfig.from_dict(tuning.settings["methods"][best])
            echo(f"run {run.name}: chose {best}")
        echo(f"run {run.name} ({number}/{len(runs)}): test ({run.description})")
        test = evaluate_benchmark(
            loaded, spec.dataset, data_root, run.boxes, [config], options=replace(options, itm=None, k=run.k), **common
        )
        done.append(RunResult(run, config, test, tuning))
    settings = {
        "data_root": str(data_root),
        "device": device,
        "detections": str(detections) if detections is not None else None,
        "tune_itm": tune_itm,
        "select_by": SELECT_BY,
        "seconds": round(time.time() - started, 1),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": ranks.world,
        "versions": _versions(),
        "gpu": torch.cuda.get_device_name() if str(device).startswith("cuda") else None,
    }
    return Reproduction(spec, name, published(spec.name), done, settings)


def _versions() -> dict[str, str]:
    import transformers

    return {
        "qpert": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_outputs(reproduction: Reproduction, output_dir: Path) -> tuple[Path, Path]:
    """``output_dir/results.json`` and ``output_dir/report.html``, written whole or not at all."""
    from .report import render

    output_dir.mkdir(parents=True, exist_ok=True)
    results, page = output_dir / "results.json", output_dir / "report.html"
    for path, text in ((results, json.dumps(reproduction.to_dict(), indent=2)), (page, render(reproduction))):
        with atomic_write(path) as out:
            out.write(text.encode("utf-8"))
    return results, page
