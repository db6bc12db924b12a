"""Named (model, detector) pairs for ``qpert index --preset``, and the choice made when none is given.

``quality`` is the paper's pair: BLIP-2 ViT-g at 364 px and Faster R-CNN v2 (about 20 s per photo on one
CPU thread); ``laptop`` is a pair that indexes several photos per second on a 2-core CPU (measured by
``bench/search.py``, docs/COST.md). Without ``--model`` and ``--preset``, ``qpert index`` takes ``quality``
on a GPU and ``laptop`` on a CPU. Register pairs of your own with :func:`register_preset`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # a registered model name (qpert models)
    detector: str  # a detector spec (qpert.search.detectors.load_detector)
    description: str


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset, *, replace: bool = False) -> None:
    """Add a preset to ``qpert index --preset`` (``replace`` to change a registered one)."""
    if preset.name in PRESETS and not replace:
        raise ConfigError(f"a preset named {preset.name!r} is registered; pass replace=True to replace it")
    PRESETS[preset.name] = preset


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class Choice:
    model: str
    detector: str
    why: str  # what was chosen and why, when the user did not say (empty otherwise)


def choose_models(
    index_dir: Path,
    device: str,
    *,
    preset: Optional[str] = None,
    model: Optional[str] = None,
    detector: Optional[str] = None,
) -> Choice:
    """The model and detector of ``qpert index``: what the user named, else what the index holds (a re-run
    keeps its models), else the preset's (``preset``, or the default for ``device``), with a line saying
    which when the user did not name both."""
    stored = None if preset else _stored(index_dir)
    if stored is not None and model in (None, stored["model"]):
        chosen = Choice(stored["model"], detector or stored["detector"], "")
        why = "following the index"
    else:
        source, reason = (get_preset(preset), "") if preset else default_preset(device)
        chosen = Choice(model or source.model, detector or source.detector, "")
        why = f"preset {source.name}" + (f" ({reason})" if reason else "")
    unnamed = [f"model {chosen.model}"] * (model is None) + [f"detector {chosen.detector}"] * (detector is None)
    if not unnamed or (preset and detector is None and model is None):
        return chosen
    return replace(
        chosen, why=f"{why}: {', '.join(unnamed)} (choose with --preset {'|'.join(PRESETS)}, --model, --detector)"
    )


def _stored(index_dir: Path) -> Optional[dict]:
    from .indexer import read_manifest

    manifest = read_manifest(index_dir)
    return None if manifest is None else manifest["settings"]


def default_preset(device: str) -> tuple[Preset, str]:
    """The preset for ``device`` (``auto`` included) and why, for the message ``qpert index`` prints."""
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if gpu:
        return PRESETS["quality"], "a GPU is available"
    return PRESETS["laptop"], "no GPU: indexing runs on the CPU"


for _preset in (
    Preset(
        "laptop",
        "siglip-base",
        "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
        "SigLIP Base/16 at 224 px + Faster R-CNN MobileNetV3-Large 320 (COCO box AP 22.8): several photos per "
        "second on a 2-core CPU; ITC only (no ITM re-ranking)",
    ),
    Preset(
        "quality",
        "blip2-coco",
        "torchvision:fasterrcnn_resnet50_fpn_v2",
        "the paper's BLIP-2 ViT-g at 364 px + Faster R-CNN ResNet-50 FPN v2 (COCO box AP 46.7): ITM re-ranking; "
        "about 20 s per photo on one CPU thread, for a GPU",
    ),
):
    register_preset(_preset)
