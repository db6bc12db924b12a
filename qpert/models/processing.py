"""Texts and images into tensors through a transformers processor (BLIP-2, BLIP, SigLIP)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

#: BLIP and BLIP-2's retrieval evaluations truncate captions to this many tokens.
MAX_TEXT_TOKENS = 35

try:  # transformers >= 5: the PIL backend of BLIP's image processor has a class of its own
    from transformers import BlipImageProcessorPil as PilBlipImageProcessor
except ImportError:  # transformers 4: the slow BlipImageProcessor is the PIL one
    from transformers import BlipImageProcessor as PilBlipImageProcessor


def pil_image_processor() -> dict[str, Any]:
    """``from_pretrained`` keywords that load the PIL ("slow") image processor.

    LAVIS and the original BLIP / BLIP-2 / SigLIP evaluations resize with PIL bicubic; the
    torchvision backend, the default since transformers 5, differs from it (up to 0.015 after
    normalization on ~0.6% of BLIP's values; tests/test_preprocessing.py).
    """
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


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
