"""Texts and images into tensors through a transformers processor (BLIP-2, BLIP, SigLIP)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

#: BLIP and BLIP-2's retrieval evaluations truncate captions to this many tokens.
MAX_TEXT_TOKENS = 35


def bert_tokenize(model: nn.Module, processor: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded to the longest text and cut at 35 tokens, as BLIP and BLIP-2 evaluate retrieval."""
    tok = processor.tokenizer(list(texts), padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                              return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def pixel_values(model: nn.Module, processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """The processor's own resize and normalization (the token layout assumes exactly this)."""
    return processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values


@torch.no_grad()
def vision_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N, C) output of ``model.vision_model`` (BLIP, BLIP-2, SigLIP): what Q-Pert's attention reads."""
    weight = model.vision_model.embeddings.patch_embedding.weight
    return model.vision_model(pixel_values=pixel_values.to(weight.device, weight.dtype)).last_hidden_state
