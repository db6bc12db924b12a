"""``qpert demo``: the whole system offline — synthetic scenes, a small trained BLIP-2, baseline vs Q-Pert.

The scenes are written in the real Flickr30K / Flickr30K Entities formats and go through the
same loaders and evaluation pipeline as the benchmarks. alpha is chosen on a validation seed,
never on a test seed; the report shows the metrics, R@1 per object-size bin (the paper's Fig. 2)
and a few small-object queries with their top images.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import QPertConfig
from .data.box_sources import BoxSet, flickr30k_entities_boxes
from .data.datasets import RetrievalDataset, load_dataset
from .errors import MissingDependencyError
from .eval.metrics import NUM_BINS, RetrievalMetrics, format_comparison
from .eval.pipeline import EvalOptions, EvalResult, evaluate
from .models.registry import MODELS, family_of, load_model
from .synthetic import write_flickr30k

DEMO_MODEL = "blip2-shapes"
VALIDATION_SEED = 1000
TEST_SEEDS = (2000, 2001, 2002, 2003, 2004)
SUMMARY_KEYS = ("R@1", "R@5", "R@10", "mR@1", "small_R@1")
#: Q-Pert and the ablation's controls, by the projector each object gets (qpert.config.PROJECTORS):
#: the official code's Vᵀ D_S V, a random subspace of the same rank (does the object subspace matter?)
#: and P = I, plain query scaling by 1 + mean weight (is it only sharper attention?).
ABLATION = {
    "qpert": "paper",
    "official projector": "official",
    "random subspace": "random",
    "query scaling": "identity",
}
ABLATION_COLUMNS = (
    ("t2i", "R@1"),
    ("t2i", "mR@1"),
    ("t2i", "small_R@1"),
    ("i2t", "R@1"),
    ("i2t", "mR@1"),
    ("i2t", "small_R@1"),
)


@dataclass
class DemoResult:
    alphas: dict[str, float]  # per method, chosen on the validation seed by T2I mR@1
    validation: EvalResult
    tests: dict[int, EvalResult]
    report: Path

    @property
    def alpha(self) -> float:
        return self.alphas["qpert"]

    def summary(self) -> str:
        """Mean ± std over test seeds of the headline T2I metrics, and Q-Pert's gain."""
        lines = [f"{'T2I':10s} {'baseline':>15s} {'Q-Pert':>15s} {'gain':>15s}"]
        for key in SUMMARY_KEYS:
            base = [r.metrics["baseline"].t2i[key] for r in self.tests.values()]
            pert = [r.metrics["qpert"].t2i[key] for r in self.tests.values()]
            if None in base or None in pert:
                continue
            gain = [p - b for p, b in zip(pert, base)]
            lines.append(f"{key:10s} " + " ".join(_mean_std(v) for v in (base, pert, gain)))
        return "\n".join(lines)

    def ablation_table(self) -> str:
        """Every method's headline metrics, mean ± std over the test seeds (empty without the ablation)."""
        methods = [m for m in ("baseline", *ABLATION) if m in next(iter(self.tests.values())).metrics]
        if len(methods) <= 2:
            return ""
        header = f"{'method':20s} {'alpha':>5s} " + " ".join(f"{d.upper() + ' ' + k:>15s}" for d, k in ABLATION_COLUMNS)
        lines = [header]
        for method in methods:
            cells = []
            for direction, key in ABLATION_COLUMNS:
                values = [getattr(r.metrics[method], direction)[key] for r in self.tests.values()]
                cells.append(f"{'-':>15s}" if None in values else _mean_std(values))
            alpha = f"{self.alphas[method]:5g}" if method in self.alphas else f"{'-':>5s}"
            lines.append(f"{method:20s} {alpha} " + " ".join(cells))
        return "\n".join(lines)


def _mean_std(values: Sequence[float]) -> str:
    """ "mean ± std" over seeds; one seed has no spread to show (not a spread of zero)."""
    if len(values) == 1:
        return f"{values[0]:15.2f}"
    return f"{statistics.mean(values):8.2f} ± {statistics.stdev(values):4.2f}"


def _split(folder: Path, seed: int, count: int, split: str) -> tuple[RetrievalDataset, BoxSet]:
    layout = write_flickr30k(folder, seed, count, split=split)
    dataset = load_dataset("flickr30k", layout.root, split=split)
    return dataset, flickr30k_entities_boxes(layout.entities, dataset.image_ids)


def run_demo(
    out_dir: Path,
    model: str = DEMO_MODEL,
    seeds: Sequence[int] = TEST_SEEDS[:1],
    n_test: int = 500,
    n_val: int = 300,
    alphas: Optional[Sequence[float]] = None,
    itm: bool = True,
    k: int = 10,
    progress: bool = True,
    ablation: bool = False,
) -> DemoResult:
    """Choose alpha on the validation seed, evaluate baseline and Q-Pert on each test seed, write a report.

    ``ablation`` adds the controls of :data:`ABLATION`, each with its own alpha chosen by the same rule.
    """
    threads = torch.get_num_threads()
    if model == DEMO_MODEL:  # a 1M-parameter model gains nothing from threads and loses much on a busy CPU
        torch.set_num_threads(1)
    try:
        return _run_demo(Path(out_dir), model, seeds, n_test, n_val, alphas, itm, k, progress, ablation)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    out_dir: Path,
    model: str,
    seeds: Sequence[int],
    n_test: int,
    n_val: int,
    alphas: Optional[Sequence[float]],
    itm: bool,
    k: int,
    progress: bool,
    ablation: bool,
) -> DemoResult:
    loaded = load_model(model)
    spec = MODELS.get(model)
    alphas = alphas or (spec.alphas if spec else family_of(loaded.model).alpha_grid)
    projectors = ABLATION if ablation else {"qpert": "paper"}
    val_data, val_boxes = _split(out_dir / "data" / f"seed{VALIDATION_SEED}", VALIDATION_SEED, n_val, "val")
    grid = {
        method: {
            _grid_name(method, a): QPertConfig(alpha=a, weight="constant", threshold=0.99, projector=projector)
            for a in alphas
        }
        for method, projector in projectors.items()
    }
    validation = evaluate(
        loaded,
        val_data,
        val_boxes,
        {"baseline": None, **{n: c for g in grid.values() for n, c in g.items()}},
        EvalOptions(itm=False, progress=progress),
    )
    chosen = {
        method: configs[max(configs, key=lambda n: validation.metrics[n].t2i["mR@1"] or 0.0)]
        for method, configs in grid.items()
    }
    tests = {}
    for seed in seeds:
        data, boxes = _split(out_dir / "data" / f"seed{seed}", seed, n_test, "test")
        tests[seed] = evaluate(
            loaded,
            data,
            boxes,
            {"baseline": None, **chosen},
            EvalOptions(itm=itm, k=k, progress=progress, keep_scores=True),
        )
        tests[seed].settings["seed"] = seed
        last = (data, boxes)
    result = DemoResult({m: c.alpha for m, c in chosen.items()}, validation, tests, out_dir / "report.html")
    _write_report(result, *last)
    return result


def _grid_name(method: str, alpha: float) -> str:
    return f"alpha={alpha:g}" if method == "qpert" else f"{method} alpha={alpha:g}"


# ------------------------------------------------------------------------------------ report
def _png(fig_or_image) -> str:
    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, format="PNG")
    else:
        fig_or_image.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bin_chart(metrics: dict[str, RetrievalMetrics]) -> str:
    try:
        import matplotlib
    except ImportError:  # the ``report`` extra
        raise MissingDependencyError("the demo's report draws with matplotlib: pip install 'qpert[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(NUM_BINS)
    for offset, (name, m) in zip((-0.2, 0.2), metrics.items()):
        values = [v if v is not None else 0.0 for v in m.bin_recall["t2i"]["R@1"]]
        ax.bar(x + offset, values, width=0.4, label=name)
    counts = next(iter(metrics.values())).bin_counts["t2i"]
    ax.set_xticks(x, [f"{b / 10:.1f}-{(b + 1) / 10:.1f}\n(n={c})" for b, c in enumerate(counts)], fontsize=7)
    ax.set_xlabel("largest object area / image area (T2I queries per bin)")
    ax.set_ylabel("T2I R@1 (%)")
    ax.legend()
    url = _png(fig)
    plt.close(fig)
    return url


def _thumbnail(path: Path, boxes: np.ndarray, correct: bool, scale: int = 2) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for x0, y0, x1, y1 in boxes * scale:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255))
    if correct:
        draw.rectangle([0, 0, im.width - 1, im.height - 1], outline=(0, 200, 0), width=4)
    return _png(im)


def _examples(result: EvalResult, data: RetrievalDataset, boxes: BoxSet, n: int = 4) -> str:
    """Small-object queries where Q-Pert moved the right image up (and one where it moved it down)."""
    base, pert = result.metrics["baseline"].ranks["t2i"], result.metrics["qpert"].ranks["t2i"]
    areas = boxes.max_areas(data.image_ids)[data.text_to_image]
    small = np.flatnonzero(areas < 0.1)
    better = small[np.argsort(pert[small] - base[small])][:n]
    worse = small[np.argsort(base[small] - pert[small])][:1]
    rows = []
    for t in list(better) + [w for w in worse if pert[w] > base[w]]:
        cells = []
        target = data.text_to_image[t]
        for name in ("baseline", "qpert"):
            top = np.argsort(-result.scores[name][:, t], kind="stable")[:5]
            thumbs = "".join(
                f'<img src="{_thumbnail(data.image_paths[i], boxes[data.image_ids[i]].boxes, i == target)}">'
                for i in top
            )
            cells.append(f"<td><b>{name}</b> ({_rank_label(result, name, t, data)})<br>{thumbs}</td>")
        rows.append(f"<tr><td>{html.escape(data.texts[t])}</td>{''.join(cells)}</tr>")
    return (
        "<table class=ex><tr><th>query</th><th>baseline top 5</th><th>Q-Pert top 5</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _rank_label(result: EvalResult, name: str, text: int, data: RetrievalDataset) -> str:
    """The right image's rank, or that re-ranking never saw it (its rank then is only the tie-worst)."""
    if not np.isfinite(result.scores[name][data.text_to_image[text], text]):
        return f"not in the top {result.settings['k']}"
    return f"rank {result.metrics[name].ranks['t2i'][text]}"


def _ablation_section(result: DemoResult) -> str:
    table = result.ablation_table()
    if not table:
        return ""
    return f"""<h2>Ablation: which part of Q-Pert helps (mean ± std over test seeds)</h2>
<p>Same boxes, weight (constant), tau and alpha rule (T2I mR@1 on validation seed {VALIDATION_SEED}) for every row;
only the projector each object gets differs: <b>qpert</b> the paper's projector onto the object's key subspace,
<b>official projector</b> the official code's Vᵀ D_S V (canonical signs), <b>random subspace</b> a random subspace
of the same rank per object, layer and head, <b>query scaling</b> P = I (every query scaled by 1 + mean weight).
Toy model: these numbers show the mechanism on synthetic shapes, not what BLIP-2 does on Flickr30K.</p>
<pre>{html.escape(table)}</pre>"""


def _write_report(result: DemoResult, data: RetrievalDataset, boxes: BoxSet) -> None:
    seed, last = list(result.tests.items())[-1]
    val_rows = "".join(
        f"<tr><td>{n}</td><td>{m.t2i['R@1']:.2f}</td><td>{m.t2i['mR@1']:.2f}</td></tr>"
        for n, m in result.validation.metrics.items()
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>qpert demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} pre{{background:#f4f4f4;padding:1em}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
.ex img{{margin:2px}}</style></head><body>
<h1>qpert demo: Q-Pert on a toy BLIP-2</h1>
<p>A small <code>Blip2ForImageTextRetrieval</code> trained on synthetic coloured shapes (a toy model that
demonstrates the mechanism, not the paper's numbers; real results come from <code>qpert eval</code> with BLIP-2
weights). Ground-truth boxes; alpha = {result.alpha:g} (constant weight, tau 0.99) chosen by T2I mR@1 on validation
seed {VALIDATION_SEED}; test seeds {", ".join(map(str, result.tests))}.</p>
<h2>{"Mean ± std over test seeds" if len(result.tests) > 1 else "Headline metrics"} (T2I)</h2>
<pre>{html.escape(result.summary())}</pre>
{_ablation_section(result)}
<h2>Test seed {seed}: all metrics</h2><pre>{html.escape(format_comparison(last.metrics))}</pre>
<h2>R@1 per object-size bin (test seed {seed})</h2>
<img src="{_bin_chart({n: last.metrics[n] for n in ("baseline", "qpert")})}">
<h2>Small-object queries (top 5; green frame: the right image; white: ground-truth boxes)</h2>
{_examples(last, data, boxes)}
<h2>Validation (alpha selection)</h2><table><tr><th>setting</th><th>T2I R@1</th><th>T2I mR@1</th></tr>{val_rows}</table>
</body></html>"""
    result.report.parent.mkdir(parents=True, exist_ok=True)
    result.report.write_text(page)
