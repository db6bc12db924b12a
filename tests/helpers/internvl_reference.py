"""The plain reference (tests/helpers/reference.py) hooked into InternVL-G's cross-attentions, found by name.

Shared by the stand-in (tests/test_internvl.py) and the real remote code (tests/test_internvl_remote.py),
whose modules have the same names and call signatures; shares no code with qpert.
"""

from __future__ import annotations

import torch
from torch import nn

from helpers.reference_hooks import _perturb_batch, stretch_objects


class Reference:
    """Every QLLaMA ``cross_attn``: keys k_proj(norm2(tokens)), row i of the queries against image i % B, as
    the module's ``repeat(repeat_time, 1, 1, 1)`` pairs them; ``clip_projector``: its whole attention
    recomputed with the perturbed mean-token query."""

    def __init__(self, model, cfg, boxes, sizes, input_size: int, patch: int):
        objects = stretch_objects(boxes, sizes, input_size=input_size, grid=input_size // patch, patch=patch, prefix=1)
        self.handles = []
        for layer in model.qllama.model.layers:
            if layer.cross_attn is not None:
                self._hook(layer.cross_attn, objects, cfg)
        self._hook_pooling(model.clip_projector.cross_attn, objects, cfg)

    def _hook_pooling(self, attn, objects, cfg):
        def post(_m, args, kwargs, out):
            x, k, v = args[0], kwargs["k"], kwargs["v"]
            heads = attn.num_heads
            q = nn.functional.linear(x, attn.q.weight, attn.q_bias).unflatten(-1, (heads, -1))
            keys = nn.functional.linear(k, attn.k.weight, attn.k_bias).unflatten(-1, (heads, -1))
            values = nn.functional.linear(v, attn.v.weight, attn.v_bias).unflatten(-1, (heads, -1))
            q = _perturb_batch(q, keys, objects, cfg).to(keys.dtype)
            weights = torch.einsum("bthd,bnhd->bhtn", q * attn.scale, keys).softmax(-1)
            return attn.proj(torch.einsum("bhtn,bnhd->bthd", weights, values).flatten(-2))

        self.handles.append(attn.register_forward_hook(post, with_kwargs=True))

    def _hook(self, attn, objects, cfg):
        seen = {}

        def pre(_m, _args, kwargs):
            seen.update(tokens=kwargs["vision_hidden_states"], repeat=kwargs["repeat_time"])

        def post(_m, _inputs, out):
            tokens, repeat = seen["tokens"], seen["repeat"]
            keys = attn.k_proj(attn.norm2(tokens)).view(*tokens.shape[:2], attn.num_heads, attn.head_dim)
            q = out.view(*out.shape[:2], attn.num_heads, attn.head_dim)
            new = _perturb_batch(q, keys.repeat(repeat, 1, 1, 1), objects * repeat, cfg)
            return new.reshape(out.shape).to(out.dtype)

        self.handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.q_proj.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()
