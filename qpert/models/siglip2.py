"""SigLIP 2 NaFlex (``Siglip2Model``): Q-Pert on the vision pooling head, one patch grid per image.

``Siglip2ImageProcessor`` stretches every image to the patch-multiple size that best keeps its
aspect ratio within ``max_num_patches`` patches, cuts it into patches row by row and pads the
sequence to ``max_num_patches``; ``spatial_shapes`` holds each grid, ``pixel_attention_mask`` the
padding. Boxes go through the same geometry: :class:`NaFlexLayout` asks the processor's own
``get_image_size_for_max_num_patches`` for each image's grid, with ``max_num_patches`` read off
the token sequence's length (the processor always pads to exactly that), so padding tokens get
weight 0. The pooling head masks them, and Q-Pert's score offsets leave the mask in place.

Retrieval: the cached tokens carry the padding mask as one extra, last channel (1 = patch,
0 = padding), so that one tensor per image goes through the feature cache and the head can
mask again; ``key_tokens`` drops it. Scores are SigLIP's cosine (see ``qpert.models.siglip``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

from ..core import TokenLayout
from ..errors import ConfigError
from .family import POOLER_ALPHAS, ModelFamily, RetrievalHeads, cosine_scores, keys_restricted
from .siglip import siglip_sites, text_embeddings, tokenize


@dataclass(frozen=True)
class NaFlexLayout:
    """Each image's own patch grid, as ``Siglip2ImageProcessor`` chooses it; patches first, padding after."""

    patch: int

    def for_image(self, height: int, width: int, num_tokens: int) -> TokenLayout:
        resized_h, resized_w = get_image_size_for_max_num_patches(height, width, self.patch, num_tokens)
        rows, cols = resized_h // self.patch, resized_w // self.patch
        return TokenLayout(
            grid=(rows, cols),
            patch=(self.patch, self.patch),
            num_prefix_tokens=0,
            num_suffix_tokens=num_tokens - rows * cols,
            resize="stretch",
        )


def _vision(model: nn.Module) -> nn.Module:
    return getattr(model, "vision_model", model)


def naflex_token_layout(model: nn.Module) -> NaFlexLayout:
    vision = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
    return NaFlexLayout(patch=vision.patch_size)


def preprocess(model: nn.Module, processor: Any, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """The processor's patches, padding mask and grids; checks its grids are the ones boxes are mapped to."""
    images = [im.convert("RGB") for im in images]
    out = processor.image_processor(images, return_tensors="pt")
    layout, num_tokens = naflex_token_layout(model), out["pixel_values"].shape[1]
    expected = [layout.for_image(im.height, im.width, num_tokens).grid for im in images]
    if out["spatial_shapes"].tolist() != [list(g) for g in expected]:
        raise ConfigError(
            f"the image processor chose patch grids {out['spatial_shapes'].tolist()}, Q-Pert's box "
            f"mapping expects {expected}: use Siglip2ImageProcessor with do_resize=True"
        )
    return {k: out[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


@torch.no_grad()
def image_tokens(model: nn.Module, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, N, C + 1): the vision tower's tokens, then its padding mask as a last channel."""
    vision = _vision(model)
    weight = vision.embeddings.patch_embedding.weight
    mask = pixels["pixel_attention_mask"].to(weight.device)
    # positional: the mask argument is ``pixel_attention_mask`` here, ``attention_mask`` in older transformers
    tokens = vision(
        pixels["pixel_values"].to(weight.device, weight.dtype), mask, pixels["spatial_shapes"].to(weight.device)
    ).last_hidden_state
    return torch.cat([tokens, mask[..., None].to(tokens.dtype)], dim=-1)


def key_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The tokens the pooling head attends to, without the mask channel."""
    return tokens[..., :-1]


@torch.no_grad()
def image_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, D) normalized pooling-head output over the patches, padding masked (Q-Pert applies here)."""
    return F.normalize(_vision(model).head(tokens[..., :-1], tokens[..., -1].round().long()), dim=-1)


@torch.no_grad()
def roi_embeddings(model: nn.Module, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, D) pooling-head embeddings with the probe attending to the ``keep`` (B, N) tokens only."""
    with keys_restricted(_vision(model).head.attention, keep):
        return image_embeddings(model, tokens)


SIGLIP2_NAFLEX = ModelFamily(
    name="siglip2-naflex",
    classes=("transformers.Siglip2Model", "transformers.Siglip2VisionModel"),
    sites=siglip_sites,
    token_layout=naflex_token_layout,
    alpha_grid=POOLER_ALPHAS,
    key_tokens=key_tokens,
    retrieval=RetrievalHeads(
        image_tokens=image_tokens,
        image_embeddings=image_embeddings,
        text_embeddings=text_embeddings,
        itc_scores=cosine_scores,
        tokenize=tokenize,
        preprocess=preprocess,
        roi_embeddings=roi_embeddings,
        vision_encoder=lambda model: _vision(model).encoder,
    ),
    retrieval_classes=("transformers.Siglip2Model",),
)
