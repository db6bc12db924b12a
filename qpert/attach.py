"""``qpert.attach(model, config)``: the two-line entry point."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .adapters import QPertHandle, attach_sites
from .config import QPertConfig
from .models.registry import family_of


def attach(model: nn.Module, config: Optional[QPertConfig] = None) -> QPertHandle:
    """Hook Q-Pert into every cross-attention over image tokens of ``model``.

    The model is unchanged until boxes are given with ``handle.objects(...)``;
    ``handle.detach()`` removes every hook.
    """
    family = family_of(model)
    return attach_sites(model, config or QPertConfig(), family.sites(model), family.token_layout(model))
