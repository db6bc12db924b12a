"""Named checkpoints: what to load, with which class, and the paper's alpha grid for it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .blip import BLIP
from .blip2 import BLIP2
from .coca import COCA, load_open_clip
from .family import ModelFamily, Retriever
from .internvl import INTERNVL
from .processing import pil_image_processor
from .siglip import SIGLIP
from .siglip2 import SIGLIP2_NAFLEX

FAMILIES: tuple[ModelFamily, ...] = (BLIP2, BLIP, SIGLIP, SIGLIP2_NAFLEX, COCA, INTERNVL)

#: What ``save_pretrained``-style folders of OpenCLIP models hold (``open_clip.push_to_hf_hub`` layout).
OPEN_CLIP_CONFIG = "open_clip_config.json"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ITM re-ranking candidates per query: BLIP-2's evaluation (and the paper) use 64.
DEFAULT_RERANK_K = 64


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str          # Hugging Face hub id (or a local folder); for OpenCLIP, its model name
    model_class: str     # class that loads it (transformers, or open_clip's for library="open_clip")
    family: ModelFamily
    image_size: int
    alpha_grid: tuple[float, ...]
    description: str
    library: str = "transformers"     # or "open_clip"
    pretrained: Optional[str] = None  # OpenCLIP pretrained tag
    remote_code: bool = False         # the checkpoint's own modeling code (needs trust_remote_code=True)
    rerank_k: int = DEFAULT_RERANK_K  # ITM re-ranking candidates per query in its authors' evaluation


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("blip2-coco", "Salesforce/blip2-itm-vit-g-coco", "Blip2ForImageTextRetrieval", BLIP2, 364,
                  (2.0, 4.0, 6.0, 8.0, 10.0), "BLIP-2 ViT-g, retrieval heads fine-tuned on COCO (the paper's model)"),
        ModelSpec("blip2", "Salesforce/blip2-itm-vit-g", "Blip2ForImageTextRetrieval", BLIP2, 224,
                  (2.0, 4.0, 6.0, 8.0, 10.0), "BLIP-2 ViT-g, pre-trained retrieval heads"),
        ModelSpec("blip2-shapes", str(Path(__file__).parents[1] / "assets" / "blip2-shapes"),
                  "Blip2ForImageTextRetrieval", BLIP2, 64, (0.5, 1.0, 2.0, 4.0, 8.0),
                  "toy BLIP-2 (1M parameters) trained on synthetic coloured shapes (qpert.synthetic), for offline use"),
        # Captioning (``qpert caption``): Q-Pert on the Q-Former pass that feeds the language model.
        ModelSpec("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b", "Blip2ForConditionalGeneration", BLIP2, 224,
                  (2.0, 4.0, 6.0, 8.0, 10.0), "BLIP-2 ViT-g + OPT-2.7b captioner (Q-Pert in the Q-Former)"),
        ModelSpec("blip2-flant5-xl", "Salesforce/blip2-flan-t5-xl", "Blip2ForConditionalGeneration", BLIP2, 224,
                  (2.0, 4.0, 6.0, 8.0, 10.0), "BLIP-2 ViT-g + Flan-T5-XL captioner (Q-Pert in the Q-Former)"),
        # BLIP was not in the paper; its ITM cross-attentions have the Q-Former's shape (12 heads x 64),
        # so BLIP-2's grid is the starting point.
        # BLIP's and LAVIS's retrieval evaluations re-rank the top 256 (COCO) and 128 (Flickr30K).
        ModelSpec("blip-coco", "Salesforce/blip-itm-large-coco", "BlipForImageTextRetrieval", BLIP, 384,
                  (2.0, 4.0, 6.0, 8.0, 10.0), "BLIP ViT-L, retrieval fine-tuned on COCO (Q-Pert in the ITM pass)",
                  rerank_k=256),
        ModelSpec("blip-flickr", "Salesforce/blip-itm-large-flickr", "BlipForImageTextRetrieval", BLIP, 384,
                  (2.0, 4.0, 6.0, 8.0, 10.0), "BLIP ViT-L, retrieval fine-tuned on Flickr30K (Q-Pert in the ITM pass)",
                  rerank_k=128),
        ModelSpec("coca-l14", "coca_ViT-L-14", "CoCa", COCA, 224, (0.2, 0.4, 0.6, 0.8, 1.0),
                  "OpenCLIP CoCa ViT-L/14 fine-tuned on COCO (Q-Pert in the attentional pooler)",
                  library="open_clip", pretrained="mscoco_finetuned_laion2B-s13B-b90k"),
        # SigLIP was not in the paper: a pooling head like CoCa's, so CoCa's grid is the starting point.
        ModelSpec("siglip-so400m", "google/siglip-so400m-patch14-384", "SiglipModel", SIGLIP, 384,
                  (0.2, 0.4, 0.6, 0.8, 1.0), "SigLIP So400m/14 (Q-Pert in the vision pooling head)"),
        ModelSpec("siglip2-so400m", "google/siglip2-so400m-patch14-384", "SiglipModel", SIGLIP, 384,
                  (0.2, 0.4, 0.6, 0.8, 1.0), "SigLIP 2 So400m/14, fixed resolution (Q-Pert in the vision pooling head)"),
        # NaFlex: up to 256 patches of 16 px per image (a 256 x 256 square), the grid following the aspect ratio.
        ModelSpec("siglip2-so400m-naflex", "google/siglip2-so400m-patch16-naflex", "Siglip2Model", SIGLIP2_NAFLEX,
                  256, (0.2, 0.4, 0.6, 0.8, 1.0), "SigLIP 2 So400m/16 NaFlex, a patch grid per aspect ratio (Q-Pert "
                  "in the vision pooling head)"),
        ModelSpec("internvl-g", "OpenGVLab/InternVL-14B-224px", "InternVLModel", INTERNVL, 224,
                  (0.2, 0.4, 0.6, 0.8, 1.0), "InternVL-G: InternViT-6B + QLLaMA (Q-Pert in every QLLaMA "
                  "cross-attention; remote code)", remote_code=True),
    )
}

SUPPORTED_CLASSES = tuple(sorted({c for f in FAMILIES for c in f.class_names}))
RETRIEVAL_CLASSES = tuple(sorted({c for f in FAMILIES if f.retriever for c in f.retriever.class_names}))


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


def retriever_of(model: nn.Module) -> Retriever:
    """The retrieval interface of ``model``'s family, for scoring and evaluation."""
    retriever = family_of(model).retriever
    if retriever is None or type(model).__name__ not in retriever.class_names:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no image-text retrieval heads for qpert to score; scoring and evaluation "
            f"take {', '.join(RETRIEVAL_CLASSES)} (attach to other models with qpert.attach(model, config))")
    return retriever


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _local_model_class(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is a folder but has no config.json (transformers) or {OPEN_CLIP_CONFIG} "
                                "(OpenCLIP): not a saved model")
    architectures = json.loads(config.read_text()).get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_CLASSES:
            return name
    raise UnsupportedModelError(f"{path} holds {architectures or 'an unknown architecture'}; Q-Pert supports "
                    f"{', '.join(SUPPORTED_CLASSES)}")


def _has_remote_code(path: Path) -> bool:
    """A saved folder whose config maps its classes to modeling code shipped with it."""
    config = path / "config.json"
    return config.is_file() and "auto_map" in json.loads(config.read_text())


def load_model(name_or_path: str, device: Union[str, torch.device] = "cpu",
               dtype: Union[None, str, torch.dtype] = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load a registered name (``blip2-coco``), a hub id or a local ``save_pretrained`` folder.

    A folder holding ``open_clip_config.json`` and its weights loads through OpenCLIP. Checkpoints
    that ship their own modeling code (InternVL-G) run it only with ``trust_remote_code=True``.
    """
    import transformers
    from transformers import AutoProcessor

    spec = MODELS.get(name_or_path)
    source = spec.source if spec else name_or_path
    if spec:
        class_name = spec.model_class
    elif (Path(source) / OPEN_CLIP_CONFIG).is_file():
        return _load_open_clip(source, f"local-dir:{source}", None, device, dtype)
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
    if spec and spec.library == "open_clip":
        return _load_open_clip(spec.name, spec.source, spec.pretrained, device, dtype, spec)
    if spec.remote_code if spec else _has_remote_code(Path(source)):
        if not trust_remote_code:
            raise ValueError(f"{source} runs modeling code downloaded with the checkpoint; read it, then opt in with "
                             "trust_remote_code=True (qpert.load_model) or --trust-remote-code (command line)")
        model = transformers.AutoModel.from_pretrained(source, dtype=parse_dtype(dtype), trust_remote_code=True)
        family_of(model)  # the remote class must be one Q-Pert supports
    else:
        model = getattr(transformers, class_name).from_pretrained(source, dtype=parse_dtype(dtype))
    model.to(device).eval()
    retriever = family_of(model).retriever
    if retriever is not None and retriever.load_processor is not None:
        processor = retriever.load_processor(source)
    else:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **pil_image_processor())
    return LoadedModel(spec.name if spec else source, model, processor, spec)


def _load_open_clip(name: str, model_name: str, pretrained: Optional[str], device: Union[str, torch.device],
                    dtype: Union[None, str, torch.dtype], spec: Optional[ModelSpec] = None) -> LoadedModel:
    model, processor = load_open_clip(model_name, pretrained, device, parse_dtype(dtype))
    family_of(model)  # an OpenCLIP model without a supported pooler is an error here, not at attach time
    return LoadedModel(name, model, processor, spec)
