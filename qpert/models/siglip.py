"""SigLIP / SigLIP 2 (fixed resolution) in transformers: Q-Pert on the vision pooling head.

``SiglipMultiheadAttentionPoolingHead`` lets one learned probe attend to the ViT's patch tokens
through an ``nn.MultiheadAttention`` (see ``qpert.adapters.mha``). The fixed-resolution SigLIP 2
checkpoints are ``SiglipModel``s; NaFlex ``Siglip2Model``s give every image its own patch grid,
which a single token layout cannot describe, so they are not supported.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..adapters import MultiheadAttentionSite, find_multihead_attentions
from ..core import TokenLayout
from ..errors import UnsupportedModelError
from .family import ModelFamily


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
            raise ValueError(f"a {self.grid} grid of {self.patch} patches does not fit a stretch to {self.resized_to}")

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
    return GridInResizedImage(grid=(grid, grid), patch=(patch, patch), num_prefix_tokens=0, resize="stretch",
                              resized_to=(vision.image_size, vision.image_size))


SIGLIP = ModelFamily(name="siglip", class_names=("SiglipModel", "SiglipVisionModel"), sites=siglip_sites,
                     token_layout=siglip_token_layout)
