"""What the attach step needs to know about a family of models."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..adapters import CrossAttentionSite
from ..core import TokenLayout


@dataclass(frozen=True)
class ModelFamily:
    """A family of model classes sharing one adapter and one way to place boxes on tokens."""

    name: str
    class_names: tuple[str, ...]
    sites: Callable[[nn.Module], list[CrossAttentionSite]]
    token_layout: Callable[[nn.Module], TokenLayout]

    def supports(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.class_names
