"""LLaMA-style cross-attention (``q_proj``/``k_proj`` linears): the QLLaMA of InternVL-G.

InternVL's remote code (``modeling_qllama.py``) gives every ``cross_attention_frequency``-th
decoder layer a ``LlamaCrossAttention`` called as ``cross_attn(hidden_states=queries,
vision_hidden_states=image_tokens, ..., repeat_time=r)``. Inside, the learned queries go through
``norm1`` then ``q_proj``; the image tokens through ``norm2`` (an RMSNorm of its own per layer)
then ``k_proj``; keys are tiled ``r`` times along the batch (``.repeat(r, 1, 1, 1)``), so query
row ``i`` attends to image ``i % B``. There are no grouped key heads: ``k_proj`` gives
``num_heads * head_dim`` outputs.

Hooks only: a pre-hook on the module sees the image tokens, a forward hook on ``q_proj``
perturbs its output; the keys Q-Pert pools are ``k_proj(norm2(tokens))``, as the module's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UnsupportedModelError
from .site import CrossAttentionSite


class LlamaCrossAttentionSite(CrossAttentionSite):
    """One QLLaMA cross-attention whose keys are projected, normalized image tokens."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.num_heads = int(module.num_heads)
        self.head_dim = int(module.head_dim)
        if module.k_proj.out_features != self.num_heads * self.head_dim:
            raise UnsupportedModelError(
                f"{name}: k_proj gives {module.k_proj.out_features} features, expected "
                f"num_heads x head_dim = {self.num_heads * self.head_dim} (grouped keys are not supported)"
            )
        params = list(inspect.signature(module.forward).parameters)
        self._tokens_position = params.index("vision_hidden_states")
        self._repeat_position = params.index("repeat_time") if "repeat_time" in params else None

    def key_projection(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.module.k_proj.weight, self.module.k_proj.bias

    def key_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """What ``k_proj`` reads: the image tokens through this layer's own ``norm2``."""
        return self.module.norm2(tokens.to(self.module.k_proj.weight.device))

    def _argument(self, args: tuple, kwargs: dict, name: str, position: Optional[int], default):
        if name in kwargs:
            return kwargs[name]
        return args[position] if position is not None and len(args) > position else default

    def install(
        self,
        on_image_tokens: Callable[[torch.Tensor], bool],
        on_queries: Callable[[torch.Tensor], Optional[torch.Tensor]],
    ) -> list[RemovableHandle]:
        """on_image_tokens((B, N, C)) -> whether to perturb; on_queries((B, T, H, d)) -> new queries or None."""
        armed = [0]  # the call's repeat_time while armed, 0 when not

        def pre_hook(_module, args, kwargs):
            tokens = self._argument(args, kwargs, "vision_hidden_states", self._tokens_position, None)
            repeat = int(self._argument(args, kwargs, "repeat_time", self._repeat_position, 1))
            armed[0] = repeat if tokens is not None and on_image_tokens(tokens) else 0

        def query_hook(_module, _inputs, output):
            repeat, armed[0] = armed[0], 0
            if not repeat:
                return None
            # Row j*B + b of the queries attends to image b: group each image's rows together.
            q = output.unflatten(-1, (self.num_heads, self.head_dim)).unflatten(0, (repeat, -1))
            grouped = q.transpose(0, 1).flatten(1, 2)
            new = on_queries(grouped)
            if new is None:
                return None
            return new.unflatten(1, (repeat, -1)).transpose(0, 1).flatten(0, 1).flatten(-2)

        return [
            self.module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            self.module.q_proj.register_forward_hook(query_hook),
        ]


def find_llama_cross_attentions(root: nn.Module) -> list[LlamaCrossAttentionSite]:
    """Every ``cross_attn`` module with ``q_proj``/``k_proj`` linears, a ``norm2`` and a vision-states input."""
    sites = []
    for name, module in root.named_modules():
        if (
            name.split(".")[-1] == "cross_attn"
            and isinstance(getattr(module, "q_proj", None), nn.Linear)
            and isinstance(getattr(module, "k_proj", None), nn.Linear)
            and isinstance(getattr(module, "norm2", None), nn.Module)
            and "vision_hidden_states" in inspect.signature(module.forward).parameters
        ):
            sites.append(LlamaCrossAttentionSite(name, module))
    return sites
