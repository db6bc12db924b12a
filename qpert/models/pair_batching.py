"""ITM over many (image, text) pairs: each image's cross-attention keys and values are projected once.

In ITM re-ranking, hundreds of pairs share a handful of images (the pipeline sorts pairs by image),
and projecting N image tokens to keys and values in every cross-attention layer is most of the
Q-Former's work per pair at 364 px. The encoder hidden states are ``tokens[image_index]``, so rows
of one image are equal: the projections run on one row per distinct image and are gathered back.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ..adapters.bert import find_bert_cross_attentions

_PROJECTIONS: weakref.WeakKeyDictionary[nn.Module, list[nn.Linear]] = weakref.WeakKeyDictionary()


def key_value_projections(encoder: nn.Module) -> list[nn.Linear]:
    """The key and value linears of every BERT-style cross-attention under ``encoder`` (looked up once)."""
    if encoder not in _PROJECTIONS:
        _PROJECTIONS[encoder] = [
            p for site in find_bert_cross_attentions(encoder) for p in (site.module.key, site.module.value)
        ]
    return _PROJECTIONS[encoder]


@contextmanager
def projected_once_per_image(projections: list[nn.Linear], image_index: torch.Tensor) -> Iterator[None]:
    """Inside the block, each of ``projections`` applied to a (P, N, C) batch of pairs (row p holds the
    tokens of image ``image_index[p]``) computes one row per distinct image and gathers the result."""
    unique, inverse = torch.unique(image_index.cpu(), return_inverse=True)
    pairs = len(image_index)
    if len(unique) == pairs:
        yield
        return
    first = torch.empty_like(unique).scatter_(0, inverse, torch.arange(pairs))  # a row of each image
    reduced: set[nn.Module] = set()

    def pre_hook(module, args):
        rows = args[0]
        if rows.shape[0] != pairs:  # not the pair batch this block was opened for
            return None
        reduced.add(module)
        return (rows[first.to(rows.device)], *args[1:])

    def post_hook(module, _args, output):
        if module not in reduced:
            return None
        reduced.discard(module)
        return output[inverse.to(output.device)]

    handles = [
        h for p in projections for h in (p.register_forward_pre_hook(pre_hook), p.register_forward_hook(post_hook))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def pairs_of_images(
    encoder: nn.Module, tokens: torch.Tensor, image_index: Optional[torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Yields the (P, N, C) image tokens of P pairs, ``tokens[image_index]`` (``tokens`` itself when
    ``image_index`` is None), while ``encoder``'s cross-attentions project keys and values once per image."""
    if image_index is None:
        yield tokens
        return
    with projected_once_per_image(key_value_projections(encoder), image_index):
        yield tokens[image_index.to(tokens.device)]
