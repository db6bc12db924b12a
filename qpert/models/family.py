"""What the attach step, scoring and evaluation need to know about a family of models."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from PIL import Image
from torch import nn

from ..adapters import CrossAttentionSite, KeyTokens, same_tokens
from ..core import Layout

Tensor = torch.Tensor


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


#: The paper's alpha grids: BLIP-2's cross-attention (and BLIP's, of the same shape) and the pooling
#: heads' (CoCa; SigLIP and InternVL-G start from it).
QFORMER_ALPHAS: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0, 10.0)
POOLER_ALPHAS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class RetrievalHeads:
    """How scoring, evaluation and search drive a family's retrieval heads from cached image tokens.

    Splitting the image side at the tokens lets an evaluation encode every image once and score it
    under any number of Q-Pert settings; all functions run under ``torch.no_grad``.

    The required core:
        image_tokens(model, pixels) -> (B, N, C): what the feature cache stores; Q-Pert's
            ``QPertHandle.compute_subspaces`` takes them (the family's ``key_tokens`` applied).
        image_embeddings(model, tokens) -> normalized ITC image embeddings, (B, D) or (B, Q, D);
            Q-Pert acts here when the family's cross-attention is in the image path.
        text_embeddings(model, input_ids, attention_mask) -> (T, D) normalized ITC text embeddings.
        itc_scores(image_emb, text_emb) -> (B, T) float scores; only their order per query matters.
        tokenize(model, processor, texts) -> (input_ids, attention_mask).
        preprocess(model, processor, images) -> pixels for ``image_tokens``: pixel_values, or whatever
            else the vision tower takes (SigLIP 2 NaFlex: the processor's patches, mask and grid shapes).

    Optional capabilities (None: the family does not have it):
        itm_scores(model, tokens, input_ids, attention_mask, image_index=None) -> (P,) matching logits
            of P pairs (text p with image ``image_index[p]`` of ``tokens``, default row p; pairs sharing
            an image share its key / value projections): ITM re-ranking.
        roi_embeddings(model, tokens, keep) -> ``image_embeddings`` with the head's pooling restricted to
            ``keep`` (B, N) bool: the object-embedding baseline (``qpert.object_baseline``).
        vision_encoder(model) -> the transformer stack inside ``image_tokens``, most of the encoding time
            and none of Q-Pert's hooks: what ``qpert.compile_vision_encoder`` compiles.
        load_processor(source) -> the processor ``tokenize`` and ``preprocess`` take, where
            ``AutoProcessor.from_pretrained(source)`` is not it (InternVL-G).
    """

    image_tokens: Callable[[nn.Module, Any], Tensor]
    image_embeddings: Callable[[nn.Module, Tensor], Tensor]
    text_embeddings: Callable[[nn.Module, Tensor, Tensor], Tensor]
    itc_scores: Callable[[Tensor, Tensor], Tensor]
    tokenize: Callable[[nn.Module, Any, Sequence[str]], tuple[Tensor, Tensor]]
    preprocess: Callable[[nn.Module, Any, Sequence[Image.Image]], Any]
    itm_scores: Optional[Callable[..., Tensor]] = None
    roi_embeddings: Optional[Callable[[nn.Module, Tensor, Tensor], Tensor]] = None
    vision_encoder: Optional[Callable[[nn.Module], nn.Module]] = None
    load_processor: Optional[Callable[[str], Any]] = None

    @property
    def has_itm(self) -> bool:
        return self.itm_scores is not None


def is_instance(model: nn.Module, qualified_name: str) -> bool:
    """Whether ``model`` is an instance of ``"package.Class"`` (subclasses too); a bare ``"Class"``
    (remote code, which has no importable module) matches by class name along the model's MRO."""
    module_name, _, class_name = qualified_name.rpartition(".")
    if not module_name:
        return any(cls.__name__ == class_name for cls in type(model).__mro__)
    module = sys.modules.get(module_name.partition(".")[0])
    if module is None:  # never imported, so the model cannot be one of its classes
        return False
    cls = getattr(importlib.import_module(module_name), class_name, None)
    return isinstance(cls, type) and isinstance(model, cls)


@dataclass(frozen=True)
class ModelFamily:
    """A family of model classes sharing one adapter and one way to place boxes on tokens.

    name: unique (``qpert.register_family``); classes: ``"package.Class"`` names, matched with
    ``isinstance`` so subclasses work, or bare class names for remote code; sites(model) -> the
    cross-attentions to hook; token_layout(model) -> where image tokens sit on the patch grid;
    alpha_grid: the alpha values ``qpert tune`` searches; key_tokens(model, tokens) -> what the
    sites' key projections read, given ``retrieval.image_tokens``'s output (the tokens themselves
    unless the family normalizes first); retrieval: its retrieval heads, carried by
    ``retrieval_classes`` (default: all of ``classes``); load_remote(source, dtype) -> the model of a
    checkpoint that ships its own code, where ``AutoModel.from_pretrained(trust_remote_code=True)``
    does not load it as is (InternVL-G's code on transformers 5).
    """

    name: str
    classes: tuple[str, ...]
    sites: Callable[[nn.Module], list[CrossAttentionSite]]
    token_layout: Callable[[nn.Module], Layout]
    alpha_grid: tuple[float, ...] = QFORMER_ALPHAS
    key_tokens: KeyTokens = same_tokens
    retrieval: Optional[RetrievalHeads] = None
    retrieval_classes: tuple[str, ...] = ()
    load_remote: Optional[Callable[[str, Optional[torch.dtype]], nn.Module]] = None

    def supports(self, model: nn.Module) -> bool:
        return any(is_instance(model, name) for name in self.classes)

    def retrieval_of(self, model: nn.Module) -> Optional[RetrievalHeads]:
        """The retrieval heads, if ``model`` is one of the classes that carry them."""
        if self.retrieval is None:
            return None
        carriers = self.retrieval_classes or self.classes
        return self.retrieval if any(is_instance(model, name) for name in carriers) else None

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes' bare names, for messages and saved folders' ``architectures``."""
        return tuple(name.rpartition(".")[2] for name in self.classes)
