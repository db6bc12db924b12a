"""Model families and named checkpoints: what to load, with which class, and how Q-Pert attaches.

Both are registries others can extend: ``register_family`` for a new kind of model (its
cross-attention sites, token layout and retrieval heads), ``register_model`` for a new named
checkpoint of a known family; ``list_models`` names what is registered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, MissingFileError, UnsupportedModelError
from .blip import BLIP
from .blip2 import BLIP2
from .checkpoints import tensor_only_pickles
from .coca import COCA, load_open_clip
from .family import ModelFamily, RetrievalHeads
from .internvl import INTERNVL
from .processing import load_processor
from .siglip import SIGLIP
from .siglip2 import SIGLIP2_NAFLEX

#: Families in matching order: a model belongs to the first that supports it.
_FAMILIES: list[ModelFamily] = [BLIP2, BLIP, SIGLIP, SIGLIP2_NAFLEX, COCA, INTERNVL]

#: What ``save_pretrained``-style folders of OpenCLIP models hold (``open_clip.push_to_hf_hub`` layout).
OPEN_CLIP_CONFIG = "open_clip_config.json"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ITM re-ranking candidates per query: BLIP-2's evaluation (and the paper) use 64.
DEFAULT_RERANK_K = 64


def register_family(family: ModelFamily, *, replace: bool = False) -> None:
    """Teach qpert a new kind of model (as PEFT's ``register_peft_method``).

    Args:
        family: a :class:`~qpert.models.family.ModelFamily`; it is tried before the built-in ones, so
            it can also take over a subclass of a supported class.
        replace: allow replacing a registered family of the same name.

    Raises:
        ConfigError: a family of that name is registered and ``replace`` is False.
    """
    names = [f.name for f in _FAMILIES]
    if family.name in names:
        if not replace:
            raise ConfigError(f"a model family named {family.name!r} is registered; pass replace=True to replace it")
        del _FAMILIES[names.index(family.name)]
    _FAMILIES.insert(0, family)


def families() -> tuple[ModelFamily, ...]:
    """The registered families, in matching order."""
    return tuple(_FAMILIES)


@dataclass(frozen=True)
class ModelSpec:
    """A named checkpoint. ``alpha_grid`` None means its family's; ``library`` picks the loader."""

    name: str
    source: str  # Hugging Face hub id (or a local folder); for OpenCLIP, its model name
    model_class: str  # class that loads it (transformers, or open_clip's for library="open_clip")
    family: ModelFamily
    image_size: int
    description: str
    alpha_grid: Optional[tuple[float, ...]] = None
    library: str = "transformers"  # or "open_clip"
    pretrained: Optional[str] = None  # OpenCLIP pretrained tag
    remote_code: bool = False  # the checkpoint's own modeling code (needs trust_remote_code=True)
    rerank_k: int = DEFAULT_RERANK_K  # ITM re-ranking candidates per query in its authors' evaluation

    @property
    def alphas(self) -> tuple[float, ...]:
        return self.alpha_grid or self.family.alpha_grid


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "blip2-coco",
            "Salesforce/blip2-itm-vit-g-coco",
            "Blip2ForImageTextRetrieval",
            BLIP2,
            364,
            "BLIP-2 ViT-g, retrieval heads fine-tuned on COCO (the paper's model)",
        ),
        ModelSpec(
            "blip2",
            "Salesforce/blip2-itm-vit-g",
            "Blip2ForImageTextRetrieval",
            BLIP2,
            224,
            "BLIP-2 ViT-g, pre-trained retrieval heads",
        ),
        ModelSpec(
            "blip2-shapes",
            str(Path(__file__).parents[1] / "assets" / "blip2-shapes"),
            "Blip2ForImageTextRetrieval",
            BLIP2,
            64,
            "toy BLIP-2 (1M parameters) trained on synthetic coloured shapes (qpert.synthetic), for offline use",
            alpha_grid=(0.5, 1.0, 2.0, 4.0, 8.0),
        ),
        # Captioning (``qpert caption``): Q-Pert on the Q-Former pass that feeds the language model.
        ModelSpec(
            "blip2-opt-2.7b",
            "Salesforce/blip2-opt-2.7b",
            "Blip2ForConditionalGeneration",
            BLIP2,
            224,
            "BLIP-2 ViT-g + OPT-2.7b captioner (Q-Pert in the Q-Former)",
        ),
        ModelSpec(
            "blip2-flant5-xl",
            "Salesforce/blip2-flan-t5-xl",
            "Blip2ForConditionalGeneration",
            BLIP2,
            224,
            "BLIP-2 ViT-g + Flan-T5-XL captioner (Q-Pert in the Q-Former)",
        ),
        # BLIP's and LAVIS's retrieval evaluations re-rank the top 256 (COCO) and 128 (Flickr30K).
        ModelSpec(
            "blip-coco",
            "Salesforce/blip-itm-large-coco",
            "BlipForImageTextRetrieval",
            BLIP,
            384,
            "BLIP ViT-L, retrieval fine-tuned on COCO (Q-Pert in the ITM pass)",
            rerank_k=256,
        ),
        ModelSpec(
            "blip-flickr",
            "Salesforce/blip-itm-large-flickr",
            "BlipForImageTextRetrieval",
            BLIP,
            384,
            "BLIP ViT-L, retrieval fine-tuned on Flickr30K (Q-Pert in the ITM pass)",
            rerank_k=128,
        ),
        ModelSpec(
            "coca-l14",
            "coca_ViT-L-14",
            "CoCa",
            COCA,
            224,
            "OpenCLIP CoCa ViT-L/14 fine-tuned on COCO (Q-Pert in the attentional pooler)",
            library="open_clip",
            pretrained="mscoco_finetuned_laion2B-s13B-b90k",
        ),
        ModelSpec(
            "siglip-so400m",
            "google/siglip-so400m-patch14-384",
            "SiglipModel",
            SIGLIP,
            384,
            "SigLIP So400m/14 (Q-Pert in the vision pooling head)",
        ),
        # Light checkpoints for photo search on a CPU (the ``laptop`` preset of ``qpert index``): ViT-B/16.
        ModelSpec(
            "siglip-base",
            "google/siglip-base-patch16-224",
            "SiglipModel",
            SIGLIP,
            224,
            "SigLIP Base/16 (203M parameters; Q-Pert in the vision pooling head): photo search on a CPU",
        ),
        ModelSpec(
            "siglip2-base",
            "google/siglip2-base-patch16-224",
            "SiglipModel",
            SIGLIP,
            224,
            "SigLIP 2 Base/16, fixed resolution (375M parameters, 256k-token vocabulary; Q-Pert in the vision "
            "pooling head)",
        ),
        ModelSpec(
            "siglip2-base-naflex",
            "google/siglip2-base-patch16-naflex",
            "Siglip2Model",
            SIGLIP2_NAFLEX,
            256,
            "SigLIP 2 Base/16 NaFlex, a patch grid per aspect ratio (Q-Pert in the vision pooling head)",
        ),
        ModelSpec(
            "siglip2-so400m",
            "google/siglip2-so400m-patch14-384",
            "SiglipModel",
            SIGLIP,
            384,
            "SigLIP 2 So400m/14, fixed resolution (Q-Pert in the vision pooling head)",
        ),
        # NaFlex: up to 256 patches of 16 px per image (a 256 x 256 square), the grid following the aspect ratio.
        ModelSpec(
            "siglip2-so400m-naflex",
            "google/siglip2-so400m-patch16-naflex",
            "Siglip2Model",
            SIGLIP2_NAFLEX,
            256,
            "SigLIP 2 So400m/16 NaFlex, a patch grid per aspect ratio (Q-Pert in the vision pooling head)",
        ),
        ModelSpec(
            "internvl-g",
            "OpenGVLab/InternVL-14B-224px",
            "InternVLModel",
            INTERNVL,
            224,
            "InternVL-G: InternViT-6B + QLLaMA (Q-Pert in every QLLaMA cross-attention and the attention "
            "pooling; remote code)",
            remote_code=True,
        ),
    )
}


def register_model(spec: ModelSpec, *, replace: bool = False) -> None:
    """Name a checkpoint (as OpenCLIP's ``add_model_config``): ``load_model(spec.name)`` then loads it.

    Raises:
        ConfigError: the name is taken and ``replace`` is False, or ``spec.library`` has no loader.
    """
    if spec.name in MODELS and not replace:
        raise ConfigError(f"a model named {spec.name!r} is registered; pass replace=True to replace it")
    if spec.library not in LOADERS:
        raise ConfigError(f"no loader for library {spec.library!r}; known: {sorted(LOADERS)}")
    MODELS[spec.name] = spec


def list_models() -> list[str]:
    """The registered model names (``qpert models`` prints them with their checkpoints)."""
    return sorted(MODELS)


@dataclass
class LoadedModel:
    """A model ready for Q-Pert, with the processor that prepares its images and texts."""

    name: str
    model: nn.Module
    processor: Any
    spec: Optional[ModelSpec]


def _supported_classes() -> list[str]:
    return sorted({name for f in _FAMILIES for name in f.class_names})


def family_of(model: nn.Module) -> ModelFamily:
    """The registered family ``model`` belongs to (the first that supports it).

    Raises:
        UnsupportedModelError: no family supports it.
    """
    for family in _FAMILIES:
        if family.supports(model):
            return family
    raise UnsupportedModelError(
        f"Q-Pert does not support {type(model).__name__}; supported model classes: "
        f"{', '.join(_supported_classes())} (or register a family: qpert.register_family)"
    )


def retrieval_heads(model: nn.Module) -> RetrievalHeads:
    """The retrieval heads of ``model``'s family, for scoring, evaluation and search.

    Raises:
        UnsupportedModelError: the model's family has none, or this class does not carry them.
    """
    heads = family_of(model).retrieval_of(model)
    if heads is None:
        carriers = sorted(
            {name.rpartition(".")[2] for f in _FAMILIES if f.retrieval for name in (f.retrieval_classes or f.classes)}
        )
        raise UnsupportedModelError(
            f"{type(model).__name__} has no image-text retrieval heads for qpert to score; scoring and evaluation "
            f"take {', '.join(carriers)} (attach to other models with qpert.attach(model, config))"
        )
    return heads


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _local_model_class(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise MissingFileError(
            f"{path} is a folder but has no config.json (transformers) or {OPEN_CLIP_CONFIG} "
            "(OpenCLIP): not a saved model"
        )
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError) as error:
        raise ConfigError(f"{config} is not a transformers config ({error})") from None
    supported = _supported_classes()
    for name in architectures:
        if name in supported:
            return name
    raise UnsupportedModelError(
        f"{path} holds {architectures or 'an unknown architecture'}; Q-Pert supports {', '.join(supported)}"
    )


def _family_of_class(class_name: str) -> ModelFamily:
    """The first registered family with a class of that name (a saved folder's ``architectures``)."""
    return next(f for f in _FAMILIES if class_name in f.class_names)


def _has_remote_code(path: Path) -> bool:
    """A saved folder whose config maps its classes to modeling code shipped with it."""
    config = path / "config.json"
    return config.is_file() and "auto_map" in json.loads(config.read_text())


def _resolve(name_or_path: str) -> tuple[Optional[ModelSpec], str]:
    """(spec, source) of a registered name, the hub id of a registered model, or a local folder."""
    if name_or_path in MODELS:
        return MODELS[name_or_path], MODELS[name_or_path].source
    path = Path(name_or_path)
    if path.is_dir():
        return None, name_or_path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise MissingFileError(f"model path {name_or_path} is not a folder saved with save_pretrained")
    known = {spec.source: spec for spec in MODELS.values()}
    if name_or_path not in known:
        raise ConfigError(
            f"unknown model {name_or_path!r}: use one of {list_models()}, a hub id among "
            f"{sorted(known)}, or a local folder"
        )
    return known[name_or_path], name_or_path


def load_model(
    name_or_path: str,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype, None] = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a model and its processor, ready for ``qpert.attach``, ``qpert.score`` and evaluation.

    Args:
        name_or_path: a registered name (``blip2-coco``; see :func:`list_models`), the hub id of a
            registered model, or a local folder saved with ``save_pretrained`` (or an OpenCLIP folder
            holding ``open_clip_config.json``).
        device: where the model goes (``cpu``, ``cuda``, ``cuda:1``, ...).
        dtype: ``fp32``, ``fp16``, ``bf16`` or a ``torch.dtype``; None keeps the checkpoint's.
        trust_remote_code: run modeling code shipped with the checkpoint (InternVL-G); never implied.

    Returns:
        :class:`LoadedModel` (name, model in eval mode, processor, registry entry or None).

    Raises:
        ConfigError: an unknown name or dtype, or remote code without ``trust_remote_code``.
        MissingFileError: a path that is not a saved model.
        UnsupportedModelError: a model no registered family supports.
    """
    spec, source = _resolve(name_or_path)
    library = spec.library if spec else "open_clip" if (Path(source) / OPEN_CLIP_CONFIG).is_file() else "transformers"
    with tensor_only_pickles(source):
        return LOADERS[library](spec, source, device, parse_dtype(dtype), trust_remote_code)


def _load_transformers(
    spec: Optional[ModelSpec],
    source: str,
    device: Union[str, torch.device],
    dtype: Optional[torch.dtype],
    trust_remote_code: bool,
) -> LoadedModel:
    import transformers

    if spec.remote_code if spec else _has_remote_code(Path(source)):
        if not trust_remote_code:
            raise ConfigError(
                f"{source} runs modeling code downloaded with the checkpoint; read it, then opt in with "
                "trust_remote_code=True (qpert.load_model) or --trust-remote-code (command line)"
            )
        family = spec.family if spec else _family_of_class(_local_model_class(Path(source)))
        if family.load_remote is not None:
            model = family.load_remote(source, dtype)
        else:
            model = transformers.AutoModel.from_pretrained(source, dtype=dtype, trust_remote_code=True)
    else:
        class_name = spec.model_class if spec else _local_model_class(Path(source))
        model = getattr(transformers, class_name).from_pretrained(source, dtype=dtype)
    model.to(device).eval()
    heads = family_of(model).retrieval_of(model)  # also: the class must be one Q-Pert supports
    if heads is not None and heads.load_processor is not None:
        processor = heads.load_processor(source)
    else:
        processor = load_processor(source, trust_remote_code=trust_remote_code)
    return LoadedModel(spec.name if spec else source, model, processor, spec)


def _load_open_clip(
    spec: Optional[ModelSpec],
    source: str,
    device: Union[str, torch.device],
    dtype: Optional[torch.dtype],
    trust_remote_code: bool,
) -> LoadedModel:
    model_name, pretrained = (spec.source, spec.pretrained) if spec else (f"local-dir:{source}", None)
    model, processor = load_open_clip(model_name, pretrained, device, dtype)
    family_of(model)  # an OpenCLIP model without a supported pooler is an error here, not at attach time
    return LoadedModel(spec.name if spec else source, model, processor, spec)


#: How each ``ModelSpec.library`` is loaded: (spec or None, source, device, dtype, trust_remote_code) -> LoadedModel.
LOADERS: dict[str, Callable[..., LoadedModel]] = {"transformers": _load_transformers, "open_clip": _load_open_clip}
