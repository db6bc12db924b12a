"""Texts and images into tensors through a transformers processor (BLIP-2, BLIP, SigLIP)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import transformers
from PIL import Image
from torch import nn

#: BLIP and BLIP-2's retrieval evaluations truncate captions to this many tokens.
MAX_TEXT_TOKENS = 35

#: How transformers is asked for the PIL implementation of an image processor: ``backend="pil"`` since it
#: split implementations into backends (``PilBackend``); ``use_fast=False`` before, and deprecated since.
_PIL_BACKEND: dict[str, Any] = {"backend": "pil"} if hasattr(transformers, "PilBackend") else {"use_fast": False}


def pil_image_processor_class(name: str) -> type:
    """The PIL implementation of transformers' image processor ``name`` (``BlipImageProcessor`` ->
    ``BlipImageProcessorPil``; before the backend split the plain class was the PIL one)."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def load_processor(source: str, trust_remote_code: bool = False) -> Any:
    """``AutoProcessor.from_pretrained(source)`` with the PIL image processor wherever transformers has one.

    The checkpoints were trained and evaluated on images resized by PIL (LAVIS's and BLIP's bicubic
    resize, then ToTensor and Normalize); the PIL image processors reproduce that bit for bit, while
    the torchvision ones that transformers 5 picks by default resize differently (up to 2/255 on about
    0.5% of the values of a 384 px image). Only the image processor changes: the tokenizer is as saved
    (asking ``AutoProcessor`` for the PIL backend would pass it to the tokenizer too).
    """
    processor = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    if getattr(processor, "image_processor", None) is not None:
        processor.image_processor = transformers.AutoImageProcessor.from_pretrained(
            source, trust_remote_code=trust_remote_code, **_PIL_BACKEND
        )
    return processor


def bert_tokenize(model: nn.Module, processor: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded to the longest text and cut at 35 tokens, as BLIP and BLIP-2 evaluate retrieval."""
    tok = processor.tokenizer(
        list(texts), padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
    )
    return tok.input_ids, tok.attention_mask


def pixel_values(model: nn.Module, processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """The processor's own resize and normalization (the token layout assumes exactly this)."""
    return processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values


@torch.no_grad()
def vision_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N, C) output of ``model.vision_model`` (BLIP, BLIP-2, SigLIP): what Q-Pert's attention reads."""
    weight = model.vision_model.embeddings.patch_embedding.weight
    return model.vision_model(pixel_values=pixel_values.to(weight.device, weight.dtype)).last_hidden_state
