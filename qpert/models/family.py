"""What the attach step, scoring and evaluation need to know about a family of models."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from ..adapters import CrossAttentionSite
from ..core import Layout

Tensor = torch.Tensor


def _same_tokens(model: nn.Module, tokens: Tensor) -> Tensor:
    return tokens


def cosine_scores(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """(B, T) ITC of one normalized embedding per image and per text."""
    return image_emb.float() @ text_emb.float().T


@contextmanager
def keys_restricted(attention: nn.MultiheadAttention, keep: Tensor) -> Iterator[None]:
    """Inside the block, ``attention`` ignores every key where ``keep`` (B, N) is False (its
    ``key_padding_mask``): a pooler that attends to a region of the image only."""
    def pre_hook(_module, args, kwargs):
        ignore, attn_mask = ~keep, kwargs.get("attn_mask")
        if attn_mask is not None and attn_mask.is_floating_point():  # MHA wants both masks of one type
            ignore = torch.zeros_like(ignore, dtype=attn_mask.dtype).masked_fill_(ignore, -torch.inf)
        return args, {**kwargs, "key_padding_mask": ignore}

    hook = attention.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


@dataclass(frozen=True)
class Retriever:
    """How scoring and evaluation drive a family's retrieval heads from cached vision tokens.

    Splitting the image side at the tokens lets an evaluation encode every image once and
    score it under any number of Q-Pert settings; all functions run under ``torch.no_grad``.

    image_tokens(model, pixels) -> (B, N, C): what the feature cache stores and what
        Q-Pert's cross-attention reads (through ``key_tokens``).
    image_embeddings(model, tokens) -> normalized ITC image embeddings, (B, D) or (B, Q, D);
        Q-Pert acts here when the family's cross-attention is in the image path.
    text_embeddings(model, input_ids, attention_mask) -> (T, D) normalized ITC text embeddings.
    itc_scores(image_emb, text_emb) -> (B, T) float scores; only their order per query matters.
    itm_scores(model, tokens, input_ids, attention_mask, image_index=None) -> (P,) matching logits of
        P pairs (text p with image ``image_index[p]`` of ``tokens``, default row p; pairs sharing an image
        share its key / value projections), or None when the family has no ITM head (no re-ranking then).
    tokenize(model, processor, texts) -> (input_ids, attention_mask).
    preprocess(model, processor, images) -> pixels for ``image_tokens``: pixel_values, or whatever else the
        vision tower takes (SigLIP 2 NaFlex: the processor's patches, padding mask and grid shapes).
    key_tokens(model, tokens) -> what the cross-attention's key projection reads, for
        ``QPertHandle.compute_subspaces`` (the tokens themselves unless the family normalizes first).
    roi_embeddings(model, tokens, keep) -> ``image_embeddings`` with the head's pooling over the image
        tokens restricted to ``keep`` (B, N) bool: the object embeddings of the object-embedding
        baseline (``qpert.object_baseline``); None when the ITC embedding pools nothing (BLIP's CLS).
    load_processor(source) -> the processor ``tokenize`` and ``preprocess`` take, where
        ``AutoProcessor.from_pretrained(source)`` is not it (InternVL-G).
    vision_encoder(model) -> the transformer stack inside ``image_tokens``: most of the encoding
        time and none of Q-Pert's hooks, so ``qpert.compile_vision_encoder`` can compile it.
    class_names: the family's classes that carry these heads.
    """

    class_names: tuple[str, ...]
    image_tokens: Callable[[nn.Module, Any], Tensor]
    image_embeddings: Callable[[nn.Module, Tensor], Tensor]
    text_embeddings: Callable[[nn.Module, Tensor, Tensor], Tensor]
    itc_scores: Callable[[Tensor, Tensor], Tensor]
    tokenize: Callable[[nn.Module, Any, Sequence[str]], tuple[Tensor, Tensor]]
    preprocess: Callable[[nn.Module, Any, Sequence[Image.Image]], Any]
    vision_encoder: Callable[[nn.Module], nn.Module]
    itm_scores: Optional[Callable[..., Tensor]] = None
    key_tokens: Callable[[nn.Module, Tensor], Tensor] = _same_tokens
    roi_embeddings: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None
    load_processor: Optional[Callable[[str], Any]] = None

    @property
    def has_itm(self) -> bool:
        return self.itm_scores is not None


@dataclass(frozen=True)
class ModelFamily:
    """A family of model classes sharing one adapter and one way to place boxes on tokens."""

    name: str
    class_names: tuple[str, ...]
    sites: Callable[[nn.Module], list[CrossAttentionSite]]
    token_layout: Callable[[nn.Module], Layout]
    retriever: Optional[Retriever] = None

    def supports(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.class_names
