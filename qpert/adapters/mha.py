"""``torch.nn.MultiheadAttention`` with learned queries: OpenCLIP CoCa's pooler, SigLIP's pooling head.

The query projection happens inside ``F.multi_head_attention_forward``, where no hook can reach
it. Attention outputs depend on the queries only through the scores q·k/√d, so a forward
pre-hook adds the perturbation's effect on the scores, (q̂ − q)·k/√d, to the module's own
additive ``attn_mask``: the module then computes softmax((q̂·k)/√d) V exactly, for any
dtype and any projection weight. (Moving the query *input* by Δx = W_q⁻¹Δq instead is exact
only up to cond(W_q) times the input's rounding, which is poor for trained weights and
useless in half precision.) Keys, values and the module's weights are untouched.
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

_PARAMS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]  # query, key, value, ...


class MultiheadAttentionSite(CrossAttentionSite):
    """One ``nn.MultiheadAttention`` whose keys are image tokens and whose queries are perturbed."""

    def __init__(self, name: str, module: nn.MultiheadAttention):
        if module.bias_k is not None or module.add_zero_attn:
            raise UnsupportedModelError(
                f"{name}: Q-Pert does not support nn.MultiheadAttention with add_bias_kv or "
                "add_zero_attn (their extra key would escape the perturbation)"
            )
        self.name = name
        self.module = module
        self.num_heads = int(module.num_heads)
        self.head_dim = int(module.head_dim)

    def _projection(self, which: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) of the query (0) or key (1) projection, sliced as the module slices them."""
        m, e = self.module, self.module.embed_dim
        if m._qkv_same_embed_dim:
            weight = m.in_proj_weight[which * e : (which + 1) * e]
        else:
            weight = m.q_proj_weight if which == 0 else m.k_proj_weight
        bias = None if m.in_proj_bias is None else m.in_proj_bias[which * e : (which + 1) * e]
        return weight, bias

    def key_projection(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self._projection(1)

    def _heads(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """(B, T, E) inputs -> (B, T, H, d) projected queries or keys, heads split as the module does."""
        weight, bias = self._projection(which)
        return F.linear(x, weight, bias).unflatten(-1, (self.num_heads, self.head_dim))

    def _score_offsets(self, dq: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(B, H, L, N) offsets Δq·k of the scores, from Δq (B, L, H, d) and the key inputs (B, N, E).

        Δq·k = (Δq W_k)·x + Δq·b_k: with few queries (SigLIP's one probe) folding Δq into W_k costs
        L·E² + L·H·N·E instead of projecting every key (N·E² + L·N·E), e.g. 48x less for SigLIP-base;
        with as many queries as keys (CoCa) projecting the keys stays cheaper.
        """
        (length, heads, dim), (tokens, embed) = dq.shape[1:], key.shape[1:]
        if length * embed + length * heads * tokens >= tokens * embed + length * tokens:
            return torch.einsum("blhd,bnhd->bhln", dq, self._heads(key, 1))
        weight, bias = self._projection(1)
        folded = torch.einsum("blhd,hde->blhe", dq, weight.view(heads, dim, embed))
        offsets = torch.einsum("blhe,bne->bhln", folded, key)
        if bias is not None:
            offsets = offsets + torch.einsum("blhd,hd->bhl", dq, bias.view(heads, dim))[..., None]
        return offsets

    def install(
        self,
        on_image_tokens: Callable[[torch.Tensor], bool],
        on_queries: Callable[[torch.Tensor], Optional[torch.Tensor]],
    ) -> list[RemovableHandle]:
        """on_image_tokens((B, N, C)) -> whether to perturb; on_queries((B, T, H, d)) -> new queries or None."""
        batch_first = self.module.batch_first

        def pre_hook(_module, args, kwargs):
            bound = dict(zip(_PARAMS, args), **kwargs)
            query, key = bound["query"], bound["key"]
            if query.dim() == 2:  # unbatched: a batch of one
                query, key = query[None], key[None]
            elif not batch_first:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
            if not on_image_tokens(key):
                return None
            if bound.get("is_causal", False):
                raise UnsupportedModelError(f"{self.name}: Q-Pert cannot perturb a causal nn.MultiheadAttention call")
            q = self._heads(query, 0)
            new = on_queries(q)
            if new is None:
                return None
            delta = self._score_offsets(new - q, key) * self.head_dim**-0.5
            bound["attn_mask"] = _add_to_mask(bound.get("attn_mask"), delta.flatten(0, 1))
            kpm = bound.get("key_padding_mask")
            if kpm is not None and kpm.dtype == torch.bool:  # keep both masks float, as MHA prefers
                bound["key_padding_mask"] = _float_mask(kpm, delta.dtype)
            return (), bound

        return [self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)]


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = not allowed) as MHA's additive float mask."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _add_to_mask(mask: Optional[torch.Tensor], delta: torch.Tensor) -> torch.Tensor:
    """Add score offsets (B*H, L, S) to an MHA attn_mask given as None, (L, S) or (B*H, L, S).

    Unbatched calls are a batch of one, so (H, L, S) is also their 3-D mask form.
    """
    if mask is None:
        return delta
    mask = _float_mask(mask, delta.dtype) if mask.dtype == torch.bool else mask.to(delta.dtype)
    return delta + mask


def find_multihead_attentions(root: nn.Module, names: tuple[str, ...]) -> list[MultiheadAttentionSite]:
    """The ``nn.MultiheadAttention`` modules of ``root`` at the given dotted names, with clear errors."""
    modules = dict(root.named_modules())
    sites = []
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.MultiheadAttention):
            raise UnsupportedModelError(f"expected an nn.MultiheadAttention at {name!r}, found {type(module).__name__}")
        sites.append(MultiheadAttentionSite(name, module))
    return sites
