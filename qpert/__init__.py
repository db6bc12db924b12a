"""qpert: Object-Aware Query Perturbation (Q-Pert, ECCV 2024) for vision-and-language models."""
from .adapters import QPertHandle
from .attach import attach
from .captioning import Captions, caption
from .config import QPertConfig
from .core import QPertWarning, Subspaces, TokenLayout
from .models.compiling import compile_vision_encoder
from .models.registry import MODELS, LoadedModel, load_model

__version__ = "0.1.0"

__all__ = ["MODELS", "Captions", "LoadedModel", "QPertConfig", "QPertHandle", "QPertWarning", "Subspaces",
           "TokenLayout", "attach", "caption", "compile_vision_encoder", "load_model", "__version__"]
