"""What every adapter provides: one hooked cross-attention over image tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

#: Called with the image tokens a cross-attention is about to read; returns whether to perturb it.
OnImageTokens = Callable[[torch.Tensor], bool]
#: Called with that cross-attention's projected queries (B, T, H, d); returns the new ones (or None: keep).
OnQueries = Callable[[torch.Tensor], Optional[torch.Tensor]]
#: A family's image tokens -> what its cross-attentions read (e.g. CoCa's pooler LayerNorm).
KeyTokens = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def same_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The default :data:`KeyTokens`: the cross-attentions read the image tokens as they are."""
    return tokens


class CrossAttentionSite:
    """One cross-attention whose keys are projected image tokens.

    Adapters subclass it: ``name`` (its module path), ``num_heads`` and ``head_dim``, the key
    projection, and ``install``, which hooks the module so that ``on_image_tokens`` sees the image
    tokens and ``on_queries`` replaces the projected queries. A site whose key projection reads
    transformed tokens (QLLaMA and InternVL's pooling normalize them first) overrides ``key_inputs``.
    """

    name: str
    num_heads: int
    head_dim: int

    def key_projection(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) that turn ``key_inputs(tokens)`` into keys, heads concatenated."""
        raise NotImplementedError

    def key_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the key projection reads, given the image tokens the module receives."""
        return tokens

    def install(self, on_image_tokens: OnImageTokens, on_queries: OnQueries) -> list[RemovableHandle]:
        """Hook the module; returns the hooks, which ``QPertHandle.detach`` removes."""
        raise NotImplementedError
