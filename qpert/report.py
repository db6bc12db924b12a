"""The HTML report that ``qpert demo`` and ``qpert reproduce`` share: one page layout, one chart.

A report is one self-contained file (figures inlined as PNG data URLs) so it can be mailed or
attached to an issue as is.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .errors import MissingDependencyError
from .eval.metrics import NUM_BINS, RetrievalMetrics

_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}
pre{background:#f4f4f4;padding:1em;overflow-x:auto} table{border-collapse:collapse;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff8e0;border-left:4px solid #e0b000;padding:0.5em 1em} .ex img{margin:2px}
.worse{color:#b00} .better{color:#070}"""


def page(title: str, intro: str, sections: Sequence[tuple[str, str]], note: str = "") -> str:
    """A whole report: ``intro`` and each section's body are HTML; ``note`` is shown boxed under the intro."""
    body = "".join(f"<h2>{html.escape(heading)}</h2>\n{content}\n" for heading, content in sections if content)
    boxed = f'<p class="note">{note}</p>' if note else ""
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<p>{intro}</p>\n{boxed}\n{body}"
        "</body></html>"
    )


def preformatted(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table of plain cells: numbers right-aligned with two decimals, None as a dash, text escaped."""

    def cell(value: Any) -> str:
        if value is None:
            return '<td class="num">–</td>'
        if isinstance(value, float):
            return f'<td class="num">{value:.2f}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def png(fig_or_image: Any) -> str:
    """A matplotlib figure or a PIL image as a PNG data URL."""
    buf = io.BytesIO()
    if isinstance(fig_or_image, Image.Image):
        fig_or_image.save(buf, format="PNG")
    else:
        fig_or_image.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bin_chart(metrics: Mapping[str, RetrievalMetrics], direction: str = "t2i") -> str:
    """R@1 per object-size bin (the paper's Fig. 2), one bar per method, as an ``<img>``."""
    try:
        import matplotlib
    except ImportError:  # the ``report`` extra
        raise MissingDependencyError("the HTML report draws with matplotlib: pip install 'qpert[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(NUM_BINS)
    width = 0.8 / len(metrics)
    for n, (name, m) in enumerate(metrics.items()):
        values = [v if v is not None else 0.0 for v in m.bin_recall[direction]["R@1"]]
        ax.bar(x - 0.4 + width * (n + 0.5), values, width=width, label=name)
    counts = next(iter(metrics.values())).bin_counts[direction]
    ax.set_xticks(x, [f"{b / 10:.1f}-{(b + 1) / 10:.1f}\n(n={c})" for b, c in enumerate(counts)], fontsize=7)
    ax.set_xlabel(f"largest object area / image area ({direction.upper()} queries per bin)")
    ax.set_ylabel(f"{direction.upper()} R@1 (%)")
    ax.legend()
    url = png(fig)
    plt.close(fig)
    return f'<img alt="R@1 per object-size bin" src="{url}">'
