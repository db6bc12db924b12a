"""BLIP (Hugging Face ``BlipForImageTextRetrieval``): Q-Pert on the ITM text encoder's cross-attentions.

In BLIP's ITM pass every text token cross-attends to the ViT's tokens, so the text tokens are the
queries that Q-Pert perturbs; the ITC pass has no cross-attention and is left as it is (Q-Pert
changes BLIP's retrieval only through ITM re-ranking). The retrieval functions compute what
``BlipForImageTextRetrieval.forward`` computes with ``use_itm_head=False`` (ITC) and ``True`` (ITM).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..adapters import find_bert_cross_attentions
from .blip2 import blip2_token_layout
from .family import QFORMER_ALPHAS, ModelFamily, RetrievalHeads, cosine_scores
from .pair_batching import pairs_of_images
from .processing import bert_tokenize, vision_tokens
from .processing import pixel_values as preprocess


@torch.no_grad()
def image_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, D) normalized ITC embeddings of the ViT's CLS token."""
    return F.normalize(model.vision_proj(tokens[:, 0, :]), dim=-1)


@torch.no_grad()
def text_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(T, D) normalized ITC embeddings of the texts' [CLS] token (text encoder without the image)."""
    device = model.text_proj.weight.device
    out = model.text_encoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).last_hidden_state
    return F.normalize(model.text_proj(out[:, 0, :]), dim=-1)


def enc_token_id(model: nn.Module) -> Optional[int]:
    """The ``[ENC]`` token BLIP was trained to put first in its ITM input, or None.

    BLIP's tokenizer is BERT's vocabulary plus ``[DEC]`` (the decoder's bos) and ``[ENC]``, in that
    order: the released checkpoints have ``bos_token_id`` 30522 and 30524 embedding rows, so
    ``[ENC]`` is the last one. Hugging Face's tokenizers for them do not list ``[ENC]``.
    """
    text = model.config.text_config
    bos = getattr(text, "bos_token_id", None)
    return bos + 1 if bos is not None and bos + 2 == text.vocab_size else None


@torch.no_grad()
def itm_scores(
    model: nn.Module,
    tokens: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(P,) ITM positive-class logit of the first token for P (image, text) pairs (Q-Pert applies here):
    text p with image ``image_index[p]`` of ``tokens`` (default: row p).

    As BLIP's and LAVIS's retrieval evaluations (and BLIP's training) do, the text's ``[CLS]`` is
    replaced by ``[ENC]`` (:func:`enc_token_id`); ``BlipForImageTextRetrieval.forward`` feeds the
    ids unchanged (huggingface/transformers#25629). A model without ``[ENC]`` keeps ``[CLS]``.
    """
    device = model.itm_head.weight.device
    enc = enc_token_id(model)
    if enc is not None:
        input_ids = input_ids.clone()
        input_ids[:, 0] = enc
    with pairs_of_images(model.text_encoder, tokens, image_index) as pair_tokens:
        image_mask = torch.ones(pair_tokens.shape[:-1], dtype=torch.long, device=pair_tokens.device)
        out = model.text_encoder(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            encoder_hidden_states=pair_tokens,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
    return model.itm_head(out[:, 0, :])[:, 1].float()


BLIP = ModelFamily(
    name="blip",
    classes=("transformers.BlipForImageTextRetrieval",),
    sites=lambda model: find_bert_cross_attentions(model.text_encoder),
    # The same ViT (CLS + square grid) and the same stretching BlipImageProcessor as BLIP-2.
    token_layout=blip2_token_layout,
    # Not in the paper: its ITM cross-attentions have the Q-Former's shape (12 heads x 64), so BLIP-2's grid.
    alpha_grid=QFORMER_ALPHAS,
    retrieval=RetrievalHeads(
        image_tokens=vision_tokens,
        image_embeddings=image_embeddings,
        text_embeddings=text_embeddings,
        itc_scores=cosine_scores,
        tokenize=bert_tokenize,
        preprocess=preprocess,
        itm_scores=itm_scores,
        vision_encoder=lambda model: model.vision_model,
    ),
)
