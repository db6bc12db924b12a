"""SigLIP / SigLIP 2 (fixed resolution) in transformers: Q-Pert on the vision pooling head.

``SiglipMultiheadAttentionPoolingHead`` lets one learned probe attend to the ViT's patch tokens
through an ``nn.MultiheadAttention`` (see ``qpert.adapters.mha``). The fixed-resolution SigLIP 2
checkpoints are ``SiglipModel``s; NaFlex ``Siglip2Model``s, with a patch grid per image, are in
``qpert.models.siglip2``.

Retrieval: SigLIP's score is the sigmoid logit ``t * cos(image, text) + b`` with a learned
t > 0; ranking needs only the cosine, which is what ``itc_scores`` returns. SigLIP has no ITM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..adapters import MultiheadAttentionSite, find_multihead_attentions
from ..core import TokenLayout
from ..errors import ConfigError, UnsupportedModelError
from .family import POOLER_ALPHAS, ModelFamily, RetrievalHeads, cosine_scores, keys_restricted
from .processing import pixel_values as preprocess
from .processing import vision_tokens


@dataclass(frozen=True)
class GridInResizedImage(TokenLayout):
    """A stretch-resized image whose patch grid covers only its top-left part.

    SigLIP so400m/14 at 384 px: the processor stretches to 384 x 384, the stride-14 patch
    embedding keeps 27 x 27 patches (378 px) and drops the last 6 pixel rows and columns.
    """

    resized_to: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resize != "stretch" or any(r < g * p for r, g, p in zip(self.resized_to, self.grid, self.patch)):
            raise ConfigError(f"a {self.grid} grid of {self.patch} patches does not fit a stretch to {self.resized_to}")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.resized_to


def _vision(model: nn.Module) -> nn.Module:
    """The vision transformer: ``SiglipModel.vision_model``, or a ``SiglipVisionModel`` itself."""
    vision = getattr(model, "vision_model", model)
    if getattr(vision, "head", None) is None:
        raise UnsupportedModelError("this SigLIP vision tower has no attention pooling head (vision_use_head=False)")
    return vision


def siglip_sites(model: nn.Module) -> list[MultiheadAttentionSite]:
    return find_multihead_attentions(_vision(model), ("head.attention",))


def siglip_token_layout(model: nn.Module) -> TokenLayout:
    """Patch tokens only (no CLS); SiglipImageProcessor stretches to image_size x image_size."""
    vision = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
    grid, patch = vision.image_size // vision.patch_size, vision.patch_size
    return GridInResizedImage(
        grid=(grid, grid),
        patch=(patch, patch),
        num_prefix_tokens=0,
        resize="stretch",
        resized_to=(vision.image_size, vision.image_size),
    )


@torch.no_grad()
def image_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, D) normalized pooling-head output (Q-Pert applies here)."""
    return F.normalize(model.vision_model.head(tokens), dim=-1)


@torch.no_grad()
def roi_embeddings(model: nn.Module, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, D) pooling-head embeddings with the probe attending to the ``keep`` (B, N) tokens only."""
    with keys_restricted(model.vision_model.head.attention, keep):
        return image_embeddings(model, tokens)


@torch.no_grad()
def text_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(T, D) normalized text embeddings. SigLIP was trained on max-length padded texts without
    an attention mask (its tokenizer returns none), so the mask is not passed."""
    return F.normalize(model.text_model(input_ids=input_ids.to(model.logit_scale.device)).pooler_output, dim=-1)


def tokenize(model: nn.Module, processor: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded to the text tower's full length, as SigLIP was trained (it pools the last position)."""
    length = model.config.text_config.max_position_embeddings
    tok = processor.tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    return tok["input_ids"], tok.get("attention_mask", torch.ones_like(tok["input_ids"]))


SIGLIP = ModelFamily(
    name="siglip",
    classes=("transformers.SiglipModel", "transformers.SiglipVisionModel"),
    sites=siglip_sites,
    token_layout=siglip_token_layout,
    alpha_grid=POOLER_ALPHAS,  # not in the paper: a pooling head like CoCa's, so CoCa's grid
    retrieval=RetrievalHeads(
        image_tokens=vision_tokens,
        image_embeddings=image_embeddings,
        text_embeddings=text_embeddings,
        itc_scores=cosine_scores,
        tokenize=tokenize,
        preprocess=preprocess,
        roi_embeddings=roi_embeddings,
        vision_encoder=lambda model: _vision(model).encoder,
    ),
    retrieval_classes=("transformers.SiglipModel",),
)
