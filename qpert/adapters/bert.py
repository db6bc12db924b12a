"""BERT-style cross-attention (separate ``query``/``key`` linears): BLIP-2's Q-Former, BLIP.

Attached with hooks only: a pre-hook on the attention module sees the image tokens it
attends to, a forward hook on its ``query`` linear perturbs the projected queries.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .site import CrossAttentionSite


class BertCrossAttentionSite(CrossAttentionSite):
    """One cross-attention module whose keys are projected image tokens."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.num_heads = int(module.num_attention_heads)
        self.head_dim = int(module.attention_head_size)
        # Where encoder_hidden_states sits among positional args differs across library versions.
        params = list(inspect.signature(module.forward).parameters)
        self._tokens_position = params.index("encoder_hidden_states")

    def key_projection(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.module.key.weight, self.module.key.bias

    def install(
        self,
        on_image_tokens: Callable[[torch.Tensor], bool],
        on_queries: Callable[[torch.Tensor], Optional[torch.Tensor]],
    ) -> list[RemovableHandle]:
        """on_image_tokens(tokens) -> whether to perturb; on_queries((B, T, H, d)) -> new queries or None."""
        armed = [False]

        def pre_hook(_module, args, kwargs):
            pos = self._tokens_position
            tokens = kwargs.get("encoder_hidden_states", args[pos] if len(args) > pos else None)
            armed[0] = tokens is not None and on_image_tokens(tokens)

        def query_hook(_module, _inputs, output):
            if not armed[0]:
                return None
            armed[0] = False
            q = output.view(*output.shape[:-1], self.num_heads, self.head_dim)
            new = on_queries(q)
            return None if new is None else new.reshape(output.shape)

        return [
            self.module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            self.module.query.register_forward_hook(query_hook),
        ]


def find_bert_cross_attentions(root: nn.Module) -> list[BertCrossAttentionSite]:
    """Every module under a ``crossattention`` block that owns ``query`` and ``key`` linears."""
    sites = []
    for name, module in root.named_modules():
        if (
            "crossattention" in name.split(".")[:-1]
            and isinstance(getattr(module, "query", None), nn.Linear)
            and isinstance(getattr(module, "key", None), nn.Linear)
            and "encoder_hidden_states" in inspect.signature(module.forward).parameters
        ):
            sites.append(BertCrossAttentionSite(name, module))
    return sites
