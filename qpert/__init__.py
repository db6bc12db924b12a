"""qpert: Object-Aware Query Perturbation (Q-Pert, ECCV 2024) for vision-and-language models."""

from .adapters import CrossAttentionSite, ImageObjects, QPertHandle, attach_sites
from .attach import attach
from .captioning import Captions, caption
from .config import QPertConfig
from .core import QPertWarning, Subspaces, TokenLayout
from .errors import QPertError
from .eval.api import evaluate_benchmark, tune
from .models.compiling import compile_vision_encoder
from .models.family import ModelFamily, RetrievalHeads
from .models.registry import (
    MODELS,
    LoadedModel,
    ModelSpec,
    family_of,
    list_models,
    load_model,
    register_family,
    register_model,
)
from .scoring import Scores, score

__version__ = "0.2.0"

__all__ = [
    "MODELS",
    "Captions",
    "CrossAttentionSite",
    "ImageObjects",
    "LoadedModel",
    "ModelFamily",
    "ModelSpec",
    "QPertConfig",
    "QPertError",
    "QPertHandle",
    "QPertWarning",
    "RetrievalHeads",
    "Scores",
    "Subspaces",
    "TokenLayout",
    "__version__",
    "attach",
    "attach_sites",
    "caption",
    "compile_vision_encoder",
    "evaluate_benchmark",
    "family_of",
    "list_models",
    "load_model",
    "register_family",
    "register_model",
    "score",
    "tune",
]
