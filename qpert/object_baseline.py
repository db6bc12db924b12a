"""The object-embedding baseline of the paper's Table F: the ablation Q-Pert is compared against.

score(I, T) = model score(I, T) + max over objects i of I of sim(T, object embedding i).

Object embedding i is the model's own ITC image embedding with its pooling over the vision tokens
restricted to the tokens box i covers (token weight > 0; CLS and other prefix tokens left out):
ROI pooling through the trained head, nothing retrained. BLIP-2: the Q-Former ITC pass with its
encoder attention mask set to those tokens (masking the vision tokens themselves would still let
the queries attend to them, with zero values but non-zero keys, so the mask is the closer
reading); CoCa, SigLIP: the attentional pooler with a key padding mask. Masking a token out of
attention is the same as removing it, so a box covering the whole image gives the embedding of the
patch tokens alone: the image embedding without CLS (exactly the image embedding for SigLIP, which
has none). sim is the family's ITC score (BLIP-2: best of the 32 query embeddings). An image
without boxes, or whose boxes cover no token, adds its own ITC score: the whole image is its only
object. BLIP is not supported: its ITC embeds the ViT's CLS token and pools nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .core import Layout, prepare_boxes, token_weights
from .core.geometry import BoxesLike
from .errors import UnsupportedModelError
from .models.family import RetrievalHeads

#: Objects per forward pass of the pooling head.
OBJECTS_PER_BATCH = 64


def object_masks(
    layout: Layout, boxes: Sequence[BoxesLike], image_sizes: Sequence[Sequence[float]], num_tokens: Optional[int] = None
) -> torch.Tensor:
    """(B, M, N) bool: the vision tokens each object's box covers (any fraction of the patch);
    ``num_tokens`` (the token sequence's length) is needed for per-image layouts."""
    return token_weights(prepare_boxes(boxes, image_sizes), layout, num_tokens=num_tokens) > 0


@torch.no_grad()
def object_similarities(
    model: nn.Module,
    heads: RetrievalHeads,
    tokens: torch.Tensor,
    masks: torch.Tensor,
    text_emb: torch.Tensor,
    image_scores: torch.Tensor,
) -> torch.Tensor:
    """(B, T) max over each image's objects of the ITC score of the object embedding and each text.

    ``image_scores`` (B, T), the model's own ITC, stands in for images without a usable object.
    """
    if heads.roi_embeddings is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no pooling over image tokens to restrict to an "
            "object, so the object-embedding baseline is unavailable"
        )
    images, objects = masks.any(-1).nonzero(as_tuple=True)
    best = torch.full(image_scores.shape, -torch.inf)
    text_emb = text_emb.to(tokens.device)
    for s in range(0, len(images), OBJECTS_PER_BATCH):
        b, m = images[s : s + OBJECTS_PER_BATCH], objects[s : s + OBJECTS_PER_BATCH]
        emb = heads.roi_embeddings(model, tokens[b.to(tokens.device)], masks[b, m].to(tokens.device))
        scores = heads.itc_scores(emb, text_emb).float().cpu()
        best.scatter_reduce_(0, b[:, None].expand_as(scores), scores, "amax")
    return torch.where(masks.any(-1).any(-1)[:, None], best, image_scores.float().cpu())
