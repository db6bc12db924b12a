"""Named checkpoints: what to load, with which class, and the paper's alpha grid for it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .blip2 import BLIP2
from .family import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (BLIP2,)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str          # Hugging Face hub id (or a local folder)
    model_class: str     # transformers class that loads it
    family: ModelFamily
    image_size: int
    alpha_grid: tuple[float, ...]
    description: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("blip2-coco", "Salesforce/blip2-itm-vit-g-coco", "Blip2ForImageTextRetrieval", BLIP2, 364,
                  (2.0, 4.0, 6.0, 8.0, 10.0), "BLIP-2 ViT-g, retrieval heads fine-tuned on COCO (the paper's model)"),
        ModelSpec("blip2", "Salesforce/blip2-itm-vit-g", "Blip2ForImageTextRetrieval", BLIP2, 224,
                  (2.0, 4.0, 6.0, 8.0, 10.0), "BLIP-2 ViT-g, pre-trained retrieval heads"),
    )
}

SUPPORTED_CLASSES = tuple(sorted({c for f in FAMILIES for c in f.class_names}))


@dataclass
class LoadedModel:
    """A model ready for Q-Pert, with the processor that prepares its images and texts."""

    name: str
    model: nn.Module
    processor: Any
    spec: Optional[ModelSpec]


def family_of(model: nn.Module) -> ModelFamily:
    for family in FAMILIES:
        if family.supports(model):
            return family
    raise UnsupportedModelError(f"Q-Pert does not support {type(model).__name__}; supported model classes: "
                    f"{', '.join(SUPPORTED_CLASSES)}")


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _local_model_class(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is a folder but has no config.json: not a saved transformers model")
    architectures = json.loads(config.read_text()).get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_CLASSES:
            return name
    raise UnsupportedModelError(f"{path} holds {architectures or 'an unknown architecture'}; Q-Pert supports "
                    f"{', '.join(SUPPORTED_CLASSES)}")


def load_model(name_or_path: str, device: Union[str, torch.device] = "cpu",
               dtype: Union[None, str, torch.dtype] = None) -> LoadedModel:
    """Load a registered name (``blip2-coco``), a hub id or a local ``save_pretrained`` folder."""
    import transformers
    from transformers import AutoProcessor

    spec = MODELS.get(name_or_path)
    source = spec.source if spec else name_or_path
    if spec:
        class_name = spec.model_class
    elif Path(source).is_dir():
        class_name = _local_model_class(Path(source))
    elif Path(source).exists() or source.startswith((".", "/")):
        raise FileNotFoundError(f"model path {source} is not a folder saved with save_pretrained")
    else:
        known = {s.source: s for s in MODELS.values()}
        if source not in known:
            raise ValueError(f"unknown model {source!r}: use one of {sorted(MODELS)}, a hub id among "
                             f"{sorted(known)}, or a local folder")
        spec, class_name = known[source], known[source].model_class
    model = getattr(transformers, class_name).from_pretrained(source, dtype=parse_dtype(dtype))
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(source)
    return LoadedModel(spec.name if spec else source, model, processor, spec)
