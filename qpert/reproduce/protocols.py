"""What ``qpert reproduce NAME`` runs: the data it needs, the model, and its runs (box source, setting, compat).

A run either has a fixed Q-Pert setting (the official example) or is tuned the paper's way: the grid of
alpha x the five weight functions x tau on the validation split, chosen by T2I mR@1, then evaluated
on test. Register a protocol of your own with :func:`register_protocol`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import QPertConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class Run:
    """One row group of the report: baseline and Q-Pert on the test split with one box source and compat."""

    name: str  # "official", "paper", "E", "D": the key published.json rows name
    description: str
    boxes: str  # a --boxes spec (qpert.eval.api.resolve_boxes)
    compat: str
    config: Optional[QPertConfig] = None  # None: tuned on the validation split
    bin_boxes: Optional[str] = None
    k: Optional[int] = None  # None: the model's


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    dataset: str  # a qpert eval --dataset name
    data: tuple[str, ...]  # what `qpert data fetch` gets for it
    model: str
    runs: Callable[[Optional[Path]], list[Run]]  # the runs, given the --detections file (or None)


#: The official example's setting (examples/blip2_flickr.yaml of the official repository).
OFFICIAL_EXAMPLE_CONFIG = QPertConfig(alpha=8.0, weight="constant", threshold=0.99)


def _official_example(detections: Optional[Path]) -> list[Run]:
    return [
        Run(
            "official",
            "the official code's projector, weights, box rules and metric conventions (--compat official)",
            "entities",
            "official",
            OFFICIAL_EXAMPLE_CONFIG,
            k=64,
        ),
        Run(
            "paper",
            "the paper's equations (--compat paper), float32",
            "entities",
            "paper",
            OFFICIAL_EXAMPLE_CONFIG,
            k=64,
        ),
    ]


def _flickr30k(detections: Optional[Path]) -> list[Run]:
    runs = [Run("E", "Flickr30K Entities boxes", "entities", "official")]
    if detections is not None:
        # The paper bins Flickr30K by Entities boxes in every row, also its detector rows (§5.1.3).
        runs.append(
            Run(
                "D",
                f"detector boxes ({detections.name}), binned by Entities",
                f"coco-json:{detections}",
                "official",
                bin_boxes="entities",
            )
        )
    return runs


def _coco(detections: Optional[Path]) -> list[Run]:
    # The paper bins COCO by detector (CO-DINO) boxes, also for its COCO Entities rows.
    bins = f"coco-json:{detections}" if detections is not None else None
    binned = f", binned by {detections.name}" if detections is not None else " (binned by them: no --detections)"
    runs = [Run("E", "COCO Entities boxes" + binned, "coco-entities", "official", bin_boxes=bins)]
    if detections is not None:
        runs.append(Run("D", f"detector boxes ({detections.name})", f"coco-json:{detections}", "official"))
    return runs


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> None:
    """Add a protocol to ``qpert reproduce``, or replace the one of the same name."""
    PROTOCOLS[protocol.name] = protocol


for _protocol in (
    Protocol(
        "official-example",
        "The official repository's example: BLIP-2 coco (364 px), Flickr30K test, Entities boxes, "
        "alpha 8, constant weight, tau 0.99, ITM re-ranking of the top 64; official code and paper equations",
        "flickr30k",
        ("flickr30k",),
        "blip2-coco",
        _official_example,
    ),
    Protocol(
        "flickr30k",
        "The paper's BLIP-2 rows on Flickr30K: alpha, weight and tau tuned on val by T2I mR@1, then test; "
        "Entities boxes (E) and, with --detections, a detector's (D)",
        "flickr30k",
        ("flickr30k",),
        "blip2-coco",
        _flickr30k,
    ),
    Protocol(
        "coco",
        "The paper's BLIP-2 rows on MSCOCO 5K: tuned on val by T2I mR@1, then test; COCO Entities boxes (E) "
        "and, with --detections, a detector's (D), binned by the detections",
        "coco",
        ("coco", "coco-entities"),
        "blip2-coco",
        _coco,
    ),
):
    register_protocol(_protocol)


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
