"""BLIP (Hugging Face ``BlipForImageTextRetrieval``): Q-Pert on the ITM text encoder's cross-attentions.

In BLIP's ITM pass every text token cross-attends to the ViT's tokens, so the text tokens are the
queries that Q-Pert perturbs; the ITC pass has no cross-attention and is left as it is.
"""
from __future__ import annotations

from ..adapters import find_bert_cross_attentions
from .blip2 import blip2_token_layout
from .family import ModelFamily

BLIP = ModelFamily(
    name="blip",
    class_names=("BlipForImageTextRetrieval",),
    sites=lambda model: find_bert_cross_attentions(model.text_encoder),
    # The same ViT (CLS + square grid) and the same stretching BlipImageProcessor as BLIP-2.
    token_layout=blip2_token_layout,
)
