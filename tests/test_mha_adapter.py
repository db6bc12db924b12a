"""The nn.MultiheadAttention adapter alone: every calling convention gives softmax(q̂kᵀ/√d + masks)V."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qpert.adapters.mha import MultiheadAttentionSite
from qpert.errors import UnsupportedModelError

E, H, L, S, B = 16, 4, 3, 5, 2


def perturbation(q: torch.Tensor) -> torch.Tensor:
    """Any per-head change of the queries will do: the adapter must not care which."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(H, E // H, E // H, generator=g) * 0.7
    return q + torch.einsum("bthd,hed->bthe", q, a)


def make_mha(kdim=None, batch_first=True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.4)
    return mha


def plain(mha, query, key, attn_mask=None, key_padding_mask=None):
    """(B, L, E) batch-first inputs -> the MHA output with perturbed queries, written out by hand."""
    e, d = mha.embed_dim, mha.head_dim
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.split(e)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.split(e)
    q = perturbation(F.linear(query, wq, bq).unflatten(-1, (H, d)))
    k, v = F.linear(key, wk, bk).unflatten(-1, (H, d)), F.linear(key, wv, bv).unflatten(-1, (H, d))
    scores = torch.einsum("blhd,bnhd->bhln", q, k) / d**0.5
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(query.shape[0], H, *attn_mask.shape[-2:])
        scores = scores + (
            torch.zeros_like(mask, dtype=scores.dtype).masked_fill(mask, float("-inf"))
            if mask.dtype == torch.bool
            else mask
        )
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    ctx = torch.einsum("bhln,bnhd->blhd", scores.softmax(-1), v).flatten(-2)
    return mha.out_proj(ctx)


def hooked(mha, *args, **kwargs):
    site = MultiheadAttentionSite("attn", mha)
    handles = site.install(lambda tokens: True, perturbation)
    try:
        with torch.no_grad():
            return mha(*args, **kwargs)[0]
    finally:
        for h in handles:
            h.remove()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, L, E, generator=g), torch.randn(B, S, 24, generator=g), torch.randn(B, S, E, generator=g)


@pytest.mark.parametrize("need_weights", [False, True])
def test_packed_and_separate_projections(data, need_weights):
    query, key24, key16 = data
    for mha, key in ((make_mha(), key16), (make_mha(kdim=24), key24)):
        got = hooked(mha, query, key, key, need_weights=need_weights)
        with torch.no_grad():
            assert (got - plain(mha, query, key)).abs().max() <= 1e-5


def test_sequence_first_and_unbatched(data):
    query, _, key = data
    mha = make_mha(batch_first=False)
    got = hooked(mha, query.transpose(0, 1), key.transpose(0, 1), key.transpose(0, 1))
    with torch.no_grad():
        assert (got.transpose(0, 1) - plain(mha, query, key)).abs().max() <= 1e-5
        got = hooked(mha, query[0], key[0], value=key[0])
        assert (got - plain(mha, query[:1], key[:1])[0]).abs().max() <= 1e-5


def test_user_masks_are_kept(data):
    query, _, key = data
    mha = make_mha()
    bool_mask = torch.zeros(L, S, dtype=torch.bool)
    bool_mask[0, 1] = True
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, -2:] = True
    float_mask = torch.randn(B * H, L, S, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = hooked(mha, query, key, key, attn_mask=bool_mask, key_padding_mask=padding)
        assert (got - plain(mha, query, key, bool_mask, padding)).abs().max() <= 1e-5
        got = hooked(mha, query, key, key, None, True, float_mask)  # attn_mask passed positionally
        assert (got - plain(mha, query, key, float_mask)).abs().max() <= 1e-5


def test_unsupported_calls_are_clear_errors(data):
    query, _, key = data
    with pytest.raises(UnsupportedModelError, match="add_bias_kv"):
        MultiheadAttentionSite("attn", nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(UnsupportedModelError, match="causal"):
        hooked(make_mha(), query, key, key, attn_mask=torch.zeros(L, S), is_causal=True)
