"""InternVL's attention pooling (``AttentionPoolingBlock`` -> ``CrossAttention``), InternVL-G's ``clip_projector``.

The paper's supplement (A.2.1) perturbs this cross-attention after the vision encoder as well as
QLLaMA's. Its single query is ``norm1_q`` of the mean image token, its keys
``k(norm1_k(tokens))``. The module projects its query with ``F.linear(x, self.q.weight,
self.q_bias)`` rather than by calling ``self.q``, so no hook sees the projected query; its
attention probabilities, though, pass through ``self.attn_drop``. So a pre-hook on the module
computes softmax(scale * q̂ kᵀ) from the module's own inputs and weights, and a pre-hook on
``attn_drop`` hands those probabilities to the rest of the forward (values, output projection),
which runs unchanged. Only the rows of images whose queries changed take them: the others keep the
module's own probabilities, so an image without boxes is bit-identical in every dtype (recomputing
its attention in float32 would move a bf16 / fp16 model's output by rounding).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from ..errors import UnsupportedModelError
from .site import CrossAttentionSite


class AttentionPoolingSite(CrossAttentionSite):
    """The cross-attention of one attention-pooling block over image tokens."""

    def __init__(self, name: str, block: nn.Module):
        attention = block.cross_attn
        for part in ("q", "k", "v", "attn_drop", "proj"):
            if not isinstance(getattr(attention, part, None), nn.Module):
                raise UnsupportedModelError(f"{name}: an attention-pooling CrossAttention needs a {part!r} module")
        if list(inspect.signature(attention.forward).parameters)[:3] != ["x", "k", "v"]:
            raise UnsupportedModelError(f"{name}: expected CrossAttention.forward(x, k, v), as InternVL's")
        self.name = name
        self.block = block
        self.module = attention
        self.num_heads = int(attention.num_heads)
        self.head_dim = attention.q.out_features // self.num_heads

    def key_projection(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.module.k.weight, self.module.k_bias

    def key_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the key projection reads: the image tokens through the block's ``norm1_k``."""
        return self.block.norm1_k(tokens.to(self.module.k.weight.device))

    def install(
        self,
        on_image_tokens: Callable[[torch.Tensor], bool],
        on_queries: Callable[[torch.Tensor], Optional[torch.Tensor]],
    ) -> list[RemovableHandle]:
        """on_image_tokens((B, N, C)) -> whether to perturb; on_queries((B, T, H, d)) -> new queries or None."""
        state: dict = {}
        heads = (self.num_heads, self.head_dim)

        def block_pre_hook(_module, args, kwargs):
            tokens = args[0] if args else kwargs["x"]
            state["armed"] = on_image_tokens(tokens)

        def attention_pre_hook(module, args, kwargs):
            if not state.pop("armed", False):
                return None
            x = args[0] if args else kwargs["x"]
            k = args[1] if len(args) > 1 else kwargs["k"]
            original = F.linear(x, module.q.weight, module.q_bias).unflatten(-1, heads)
            queries = on_queries(original)
            if queries is not None:
                keys = F.linear(k, module.k.weight, module.k_bias).unflatten(-1, heads)
                scores = torch.einsum("bthd,bnhd->bhtn", queries.float() * module.scale, keys.float())
                changed = (queries != original).flatten(1).any(1)  # (B,): the images Q-Pert perturbs
                state["probabilities"] = (scores.softmax(-1).to(x.dtype), changed[:, None, None, None])

        def dropout_pre_hook(_module, args):
            perturbed = state.pop("probabilities", None)
            if perturbed is None:
                return None
            probabilities, changed = perturbed
            return (torch.where(changed, probabilities, args[0]),)

        return [
            self.block.register_forward_pre_hook(block_pre_hook, with_kwargs=True),
            self.module.register_forward_pre_hook(attention_pre_hook, with_kwargs=True),
            self.module.attn_drop.register_forward_pre_hook(dropout_pre_hook),
        ]
