"""OpenCLIP CoCa: Q-Pert on the attentional pooler, whose learned queries attend to the ViT's tokens.

The pooler is an ``nn.MultiheadAttention`` (see ``qpert.adapters.mha``); its keys are the ViT's
CLS + patch tokens after the pooler's own LayerNorm, which is exactly the MHA's key input.

Retrieval splits ``VisionTransformer.forward`` at the pooler, calling the tower's own
``_embeds``/``transformer`` and ``_pool``: the cache holds the tokens entering the pooler, and
``key_tokens`` applies the pooler's LayerNorm to them for the subspaces. CoCa has no ITM head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ..adapters import MultiheadAttentionSite, find_multihead_attentions
from ..core import TokenLayout
from ..errors import MissingDependencyError, UnsupportedModelError
from .family import POOLER_ALPHAS, ModelFamily, RetrievalHeads, cosine_scores, keys_restricted

#: OpenCLIP's image resize modes; "longest" pads, which a patch grid layout does not model.
_RESIZE = {"shortest": "shortest_edge", "squash": "stretch"}


def _visual(model: nn.Module) -> nn.Module:
    visual = model.visual
    if getattr(visual, "attn_pool", None) is None:
        raise UnsupportedModelError("this OpenCLIP model has no attentional pooler for Q-Pert to perturb")
    if getattr(visual, "attn_pool_contrastive", None) is not None:
        raise UnsupportedModelError(
            "Q-Pert supports OpenCLIP's original CoCa pooler (attentional_pool=true), "
            "not the parallel/cascade contrastive poolers"
        )
    return visual


def coca_sites(model: nn.Module) -> list[MultiheadAttentionSite]:
    _visual(model)
    return find_multihead_attentions(model, ("visual.attn_pool.attn",))


def coca_token_layout(model: nn.Module) -> TokenLayout:
    """CLS + patch grid; the resize mode comes from the preprocessing the model was created with."""
    visual = _visual(model)
    mode = getattr(visual, "preprocess_cfg", {}).get("resize_mode", "shortest")
    if mode not in _RESIZE:
        raise UnsupportedModelError(f"Q-Pert cannot place boxes for OpenCLIP resize_mode={mode!r}")
    return TokenLayout(
        grid=tuple(visual.grid_size), patch=tuple(visual.patch_size), num_prefix_tokens=1, resize=_RESIZE[mode]
    )


@dataclass
class OpenClipProcessor:
    """What OpenCLIP gives instead of a transformers processor."""

    image_transform: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W)
    tokenizer: Callable[..., torch.Tensor]


def load_open_clip(
    model_name: str, pretrained: Union[str, None], device: Union[str, torch.device], dtype: Union[torch.dtype, None]
) -> tuple[nn.Module, OpenClipProcessor]:
    """``open_clip.create_model_and_transforms`` (a name + pretrained tag, or ``local-dir:FOLDER``)."""
    try:
        import open_clip
    except ImportError:
        raise MissingDependencyError(
            "OpenCLIP models need the open_clip_torch package: pip install 'qpert[openclip]'"
        ) from None
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.to(device=device, dtype=dtype).eval()
    return model, OpenClipProcessor(transform, open_clip.get_tokenizer(model_name))


@torch.no_grad()
def image_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N, C) ViT tokens (CLS + patches) entering the attentional pooler."""
    visual = _visual(model)
    x = pixel_values.to(visual.conv1.weight.device, visual.conv1.weight.dtype)
    return visual.transformer(visual._embeds(x))


@torch.no_grad()
def image_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, D) normalized contrastive embeddings, as ``encode_image`` (Q-Pert applies in the pooler)."""
    visual = _visual(model)
    pooled, _ = visual._pool(tokens)
    return F.normalize(pooled @ visual.proj if visual.proj is not None else pooled, dim=-1)


@torch.no_grad()
def roi_embeddings(model: nn.Module, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, D) contrastive embeddings with the pooler attending to the ``keep`` (B, N) tokens only."""
    with keys_restricted(_visual(model).attn_pool.attn, keep):
        return image_embeddings(model, tokens)


@torch.no_grad()
def text_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(T, D) normalized ``encode_text``; OpenCLIP masks padding from the ids itself."""
    return model.encode_text(input_ids.to(_visual(model).conv1.weight.device), normalize=True)


def key_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The pooler normalizes the tokens before its key projection."""
    return _visual(model).attn_pool.ln_k(tokens)


def tokenize(model: nn.Module, processor: OpenClipProcessor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = processor.tokenizer(list(texts))
    return ids, (ids != 0).long()


def preprocess(model: nn.Module, processor: OpenClipProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([processor.image_transform(im.convert("RGB")) for im in images])


COCA = ModelFamily(
    name="coca",
    classes=("open_clip.CoCa",),
    sites=coca_sites,
    token_layout=coca_token_layout,
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
        vision_encoder=lambda model: _visual(model).transformer,
    ),
)
