"""InternVL-G (``OpenGVLab/InternVL-14B-224px``, remote code): Q-Pert on every QLLaMA cross-attention.

The checkpoint's ``InternVLModel`` holds an InternViT-6B (``vision_model``: CLS + 16 x 16 patches
of 14 px at 224 px) and QLLaMA (``qllama``), whose 96 learned queries cross-attend to all of the
ViT's output tokens in every other decoder layer (see ``qpert.adapters.qllama``). Boxes are placed
for InternVL's own retrieval transform (``clip_benchmark`` ``build_transform('retrieval')``):
a bicubic stretch to image_size x image_size, no crop.

No retrieval interface yet: attach with ``qpert.attach(model, config)`` and call the model's own
``encode_image(pixel_values, mode="InternVL-G")`` inside ``handle.objects(...)``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..adapters import LlamaCrossAttentionSite, find_llama_cross_attentions
from ..core import TokenLayout
from ..errors import UnsupportedModelError
from .family import ModelFamily


def internvl_sites(model: nn.Module) -> list[LlamaCrossAttentionSite]:
    return find_llama_cross_attentions(model.qllama)


def internvl_token_layout(model: nn.Module) -> TokenLayout:
    """CLS + a square patch grid at ``force_image_size`` (when set) or the ViT's own size, stretched."""
    vision = model.config.vision_config
    size = getattr(model.config, "force_image_size", None) or vision.image_size
    grid = size // vision.patch_size
    return TokenLayout(grid=(grid, grid), patch=(vision.patch_size, vision.patch_size), num_prefix_tokens=1,
                       resize="stretch")


@dataclass(frozen=True)
class _QLLaMAFamily(ModelFamily):
    """Matched by class name *and* a ``qllama`` module: transformers' own ``InternVLModel``
    (the InternVL 2/3 chat models) shares the class name but has no cross-attention."""

    def supports(self, model: nn.Module) -> bool:
        if not super().supports(model):
            return False
        if not isinstance(getattr(model, "qllama", None), nn.Module):
            raise UnsupportedModelError(f"this {type(model).__name__} has no QLLaMA (qllama) with cross-attention: "
                                        "Q-Pert supports InternVL-G (OpenGVLab/InternVL-14B-224px), not the "
                                        "InternVL chat models")
        return True


INTERNVL = _QLLaMAFamily(name="internvl", class_names=("InternVLModel", "InternVL_G"), sites=internvl_sites,
                         token_layout=internvl_token_layout)
