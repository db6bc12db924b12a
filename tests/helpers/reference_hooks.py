"""Hook the plain reference of DESIGN.md §1 (tests/reference.py) into any cross-attention.

Shares no code with qpert. The attention modules are named by each test, not found by qpert's
adapters. BERT-style modules get their projected queries replaced; an ``nn.MultiheadAttention``
gets its whole output recomputed by a plain softmax(q̂kᵀ/√d)V, so the reference does not rely on
the attention-mask route qpert's MHA adapter takes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from helpers.reference import coverage, grid_coverage, perturb


def coverage_shortest_edge(box, image_hw, crop, grid, patch, prefix=1):
    """Token weights of one box for a shortest-edge resize to ``crop`` then a centre crop: loop over patches."""
    h, w = image_hw
    x0, y0, x1, y1 = np.clip(box[0], 0, w), np.clip(box[1], 0, h), np.clip(box[2], 0, w), np.clip(box[3], 0, h)
    area = (x1 - x0) * (y1 - y0) / (h * w)
    scale = crop / min(h, w)
    new_h, new_w = (crop, int(scale * w)) if h <= w else (int(scale * h), crop)
    sx, sy = new_w / w, new_h / h
    ox, oy = round((new_w - crop) / 2), round((new_h - crop) / 2)
    x0, x1, y0, y1 = x0 * sx - ox, x1 * sx - ox, y0 * sy - oy, y1 * sy - oy
    return grid_coverage(x0, y0, x1, y1, grid, patch, prefix), area


def stretch_objects(boxes, image_sizes, input_size, grid, patch, prefix):
    return [
        [coverage(np.asarray(b, float), hw, (input_size, input_size), grid, patch, prefix) for b in img]
        for img, hw in zip(boxes, image_sizes)
    ]


def shortest_edge_objects(boxes, image_sizes, crop, grid, patch, prefix):
    return [
        [coverage_shortest_edge(np.asarray(b, float), hw, crop, grid, patch, prefix) for b in img]
        for img, hw in zip(boxes, image_sizes)
    ]


def _perturb_batch(q: torch.Tensor, keys: torch.Tensor, objects, cfg) -> torch.Tensor:
    """q (B, T, H, d), keys (B, N, H, d) -> perturbed q, one image at a time in float64."""
    qn, kn = q.double().numpy(), keys.double().numpy()
    return torch.from_numpy(np.stack([perturb(qn[b], kn[b], objects[b], cfg) for b in range(qn.shape[0])]))


class ReferenceHooks:
    """The reference hooked into named attention modules; ``remove()`` takes it out again."""

    def __init__(self, objects, cfg: dict):
        self.objects, self.cfg, self.handles = objects, cfg, []

    def bert(self, attn) -> ReferenceHooks:
        """A module with ``query``/``key`` linears called with ``encoder_hidden_states``."""
        seen = {}
        heads, d = attn.num_attention_heads, attn.attention_head_size

        def pre(_m, _args, kwargs):
            seen["tokens"] = kwargs["encoder_hidden_states"]

        def post(_m, _inputs, out):
            tokens = seen["tokens"]
            keys = attn.key(tokens).view(*tokens.shape[:2], heads, d)
            new = _perturb_batch(out.view(*out.shape[:2], heads, d), keys, self.objects, self.cfg)
            return new.reshape(out.shape).to(out.dtype)

        self.handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.query.register_forward_hook(post)]
        return self

    def mha(self, mha) -> ReferenceHooks:
        """A batch-first ``nn.MultiheadAttention`` called as (query, key, value) and, optionally, a float
        (B*H, L, S) ``attn_mask`` added to the scores (SigLIP 2 NaFlex masks its padding so)."""
        heads, d, e = mha.num_heads, mha.head_dim, mha.embed_dim

        def post(_m, args, kwargs, _out):
            query, key, value = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args) :]])[:3]
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.split(e)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            bq, bk, bv = mha.in_proj_bias.split(e)
            b = query.shape[0]
            q = F.linear(query, wq, bq).view(b, -1, heads, d)
            k = F.linear(key, wk, bk).view(b, -1, heads, d)
            v = F.linear(value, wv, bv).view(b, -1, heads, d).double()
            q = _perturb_batch(q, k, self.objects, self.cfg)
            scores = torch.einsum("blhd,bnhd->bhln", q, k.double()) / d**0.5
            if kwargs.get("attn_mask") is not None:
                scores = scores + kwargs["attn_mask"].double().view(b, heads, *scores.shape[-2:])
            att = torch.softmax(scores, dim=-1)
            ctx = torch.einsum("bhln,bnhd->blhd", att, v).reshape(b, -1, e)
            return F.linear(ctx.to(query.dtype), mha.out_proj.weight, mha.out_proj.bias), None

        self.handles.append(mha.register_forward_hook(post, with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
