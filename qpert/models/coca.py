"""OpenCLIP CoCa: Q-Pert on the attentional pooler, whose learned queries attend to the ViT's tokens.

The pooler is an ``nn.MultiheadAttention`` (see ``qpert.adapters.mha``); its keys are the ViT's
CLS + patch tokens after the pooler's own LayerNorm, which is exactly the MHA's key input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn

from ..adapters import MultiheadAttentionSite, find_multihead_attentions
from ..core import TokenLayout
from ..errors import UnsupportedModelError
from .family import ModelFamily

#: OpenCLIP's image resize modes; "longest" pads, which a patch grid layout does not model.
_RESIZE = {"shortest": "shortest_edge", "squash": "stretch"}


def _visual(model: nn.Module) -> nn.Module:
    visual = model.visual
    if getattr(visual, "attn_pool", None) is None:
        raise UnsupportedModelError("this OpenCLIP model has no attentional pooler for Q-Pert to perturb")
    if getattr(visual, "attn_pool_contrastive", None) is not None:
        raise UnsupportedModelError("Q-Pert supports OpenCLIP's original CoCa pooler (attentional_pool=true), "
                                    "not the parallel/cascade contrastive poolers")
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
    return TokenLayout(grid=tuple(visual.grid_size), patch=tuple(visual.patch_size), num_prefix_tokens=1,
                       resize=_RESIZE[mode])


COCA = ModelFamily(name="coca", class_names=("CoCa",), sites=coca_sites, token_layout=coca_token_layout)


@dataclass
class OpenClipProcessor:
    """What OpenCLIP gives instead of a transformers processor."""

    image_transform: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W)
    tokenizer: Callable[..., torch.Tensor]


def load_open_clip(model_name: str, pretrained: Union[None, str], device: Union[str, torch.device],
                   dtype: Union[None, torch.dtype]) -> tuple[nn.Module, OpenClipProcessor]:
    """``open_clip.create_model_and_transforms`` (a name + pretrained tag, or ``local-dir:FOLDER``)."""
    try:
        import open_clip
    except ImportError:
        raise ImportError("OpenCLIP models need the open_clip_torch package: pip install 'qpert[openclip]'") from None
    model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.to(device=device, dtype=dtype).eval()
    return model, OpenClipProcessor(transform, open_clip.get_tokenizer(model_name))
