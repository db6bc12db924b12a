"""Optional ``torch.compile`` of a retrieval model's vision encoder."""

from __future__ import annotations

import os
import shutil
from typing import Optional

from torch import nn

from ..errors import UnsupportedModelError
from .registry import retrieval_heads


def has_cpp_compiler() -> bool:
    """torch.compile's code generation builds C++ (on the CPU, and Triton's launchers on a GPU)."""
    return any(c and shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++"))


def compile_vision_encoder(model: nn.Module, mode: Optional[str] = None) -> nn.Module:
    """Compile, in place, the vision transformer that turns pixels into the tokens Q-Pert reads.

    Only this stack is compiled: it is most of the image-encoding time and holds none of Q-Pert's
    hooks. The cross-attention and ITM passes stay eager: their hooks read per-batch Python state
    (boxes, subspaces), on which compiled code would break its graph or recompile. Weights,
    ``state_dict`` keys and feature-cache keys are unchanged; the first batches of each new shape
    pay the compilation.

    Args:
        model: a model whose family names its vision encoder (``RetrievalHeads.vision_encoder``).
        mode: ``torch.compile``'s mode (e.g. ``"max-autotune"``).

    Returns:
        The compiled module (compiled in place).

    Raises:
        OSError: no C++ compiler, which ``torch.compile`` needs.
        UnsupportedModelError: the family has no retrieval heads or names no vision encoder.
    """
    if not has_cpp_compiler():
        raise OSError(
            "torch.compile needs a C++ compiler (g++, clang++ or $CXX) and none was found: install one "
            "(e.g. apt-get install g++) or run without --compile"
        )
    heads = retrieval_heads(model)
    if heads.vision_encoder is None:
        raise UnsupportedModelError(f"{type(model).__name__}'s family names no vision encoder to compile")
    encoder = heads.vision_encoder(model)
    encoder.compile(mode=mode)
    return encoder
