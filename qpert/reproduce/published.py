"""The published numbers ``qpert reproduce`` compares with: data shipped in the package, each with its source."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Optional


@dataclass(frozen=True)
class PublishedRow:
    """Published metrics of one method in one run of a protocol (``run`` and ``method`` name the measured one)."""

    run: str
    method: str
    metrics: dict[str, dict[str, float]]  # direction ("t2i", "i2t") -> metric -> value

    def value(self, direction: str, metric: str) -> Optional[float]:
        return self.metrics.get(direction, {}).get(metric)


@dataclass(frozen=True)
class Published:
    source: str
    url: str
    rows: tuple[PublishedRow, ...]
    note: str  # why the numbers may not reproduce to the digit (every protocol's report shows it)

    def row(self, run: str, method: str) -> Optional[PublishedRow]:
        return next((r for r in self.rows if r.run == run and r.method == method), None)


@cache
def published(protocol: str) -> Published:
    """The published numbers of ``protocol`` (a key of ``published.json``)."""
    data = json.loads(resources.files(__package__).joinpath("published.json").read_text(encoding="utf-8"))
    entry = data[protocol]
    rows = tuple(
        PublishedRow(r["run"], r["method"], {d: r[d] for d in ("t2i", "i2t") if d in r}) for r in entry["rows"]
    )
    return Published(entry["source"], entry["url"], rows, data["note"])
