"""BLIP-2 (Hugging Face): Q-Pert on the Q-Former's cross-attentions, plus retrieval scoring.

The scoring functions take cached vision tokens, so an evaluation encodes every image once
and matches it against any number of texts; they compute exactly what
``Blip2ForImageTextRetrieval.forward`` computes for ITC and ITM.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..adapters import find_bert_cross_attentions
from ..core import TokenLayout
from .family import QFORMER_ALPHAS, ModelFamily, RetrievalHeads
from .pair_batching import pairs_of_images
from .processing import bert_tokenize
from .processing import pixel_values as preprocess
from .processing import vision_tokens as image_tokens  # (B, N, C): what the Q-Former cross-attends to


def blip2_token_layout(model: nn.Module) -> TokenLayout:
    """CLS + a square patch grid; BLIP-2's processor stretches images to the input size."""
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    return TokenLayout(
        grid=(grid, grid), patch=(vision.patch_size, vision.patch_size), num_prefix_tokens=1, resize="stretch"
    )


@torch.no_grad()
def image_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, Q, D) normalized ITC embeddings of the learned queries (Q-Pert applies here)."""
    return roi_embeddings(model, tokens, torch.ones(tokens.shape[:-1], dtype=torch.bool, device=tokens.device))


@torch.no_grad()
def roi_embeddings(model: nn.Module, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, Q, D) ITC embeddings with the Q-Former's cross-attention restricted to the ``keep`` (B, N) tokens."""
    queries = model.query_tokens.expand(tokens.shape[0], -1, -1)
    mask = keep.to(device=tokens.device, dtype=torch.long)
    out = model.qformer(
        query_embeds=queries, encoder_hidden_states=tokens, encoder_attention_mask=mask, return_dict=True
    ).last_hidden_state
    return F.normalize(model.vision_projection(out.to(model.vision_projection.weight.dtype)), dim=-1)


@torch.no_grad()
def text_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(T, D) normalized ITC embeddings of the texts' [CLS] token."""
    device = model.query_tokens.device
    embeds = model.embeddings(input_ids=input_ids.to(device))
    out = model.qformer(
        query_embeds=embeds, query_length=0, attention_mask=attention_mask.to(device), return_dict=True
    ).last_hidden_state
    return F.normalize(model.text_projection(out[:, 0, :].to(model.text_projection.weight.dtype)), dim=-1)


def itc_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(B, T) ITC score: the best of the Q query embeddings for each text."""
    return torch.einsum("bqd,td->bqt", image_emb.float(), text_emb.float()).amax(dim=1)


@torch.no_grad()
def itm_scores(
    model: nn.Module,
    tokens: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(P,) ITM positive-class logit, averaged over query tokens, for P (image, text) pairs: text p with
    image ``image_index[p]`` of ``tokens`` (default: row p)."""
    device = model.query_tokens.device
    with pairs_of_images(model.qformer, tokens, image_index) as pair_tokens:
        queries = model.query_tokens.expand(pair_tokens.shape[0], -1, -1)
        mask = torch.cat(
            [torch.ones(queries.shape[:-1], dtype=torch.long, device=device), attention_mask.to(device)], 1
        )
        embeds = model.embeddings(input_ids=input_ids.to(device), query_embeds=queries)
        image_mask = torch.ones(pair_tokens.shape[:-1], dtype=torch.long, device=pair_tokens.device)
        out = model.qformer(
            query_embeds=embeds,
            query_length=queries.shape[1],
            attention_mask=mask,
            encoder_hidden_states=pair_tokens,
            encoder_attention_mask=image_mask,
            return_dict=True,
        ).last_hidden_state
    logits = model.itm_head(out[:, : queries.shape[1], :].to(model.itm_head.weight.dtype))
    return logits.mean(dim=1)[:, 1].float()


BLIP2 = ModelFamily(
    name="blip2",
    classes=(
        "transformers.Blip2ForImageTextRetrieval",
        "transformers.Blip2Model",
        "transformers.Blip2ForConditionalGeneration",
    ),
    sites=lambda model: find_bert_cross_attentions(model.qformer),
    token_layout=blip2_token_layout,
    alpha_grid=QFORMER_ALPHAS,
    retrieval=RetrievalHeads(
        image_tokens=image_tokens,
        image_embeddings=image_embeddings,
        text_embeddings=text_embeddings,
        itc_scores=itc_scores,
        tokenize=bert_tokenize,
        preprocess=preprocess,
        itm_scores=itm_scores,
        roi_embeddings=roi_embeddings,
        vision_encoder=lambda model: model.vision_model,
    ),
    retrieval_classes=("transformers.Blip2ForImageTextRetrieval",),
)
