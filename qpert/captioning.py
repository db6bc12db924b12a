"""Captions from BLIP-2 (``Blip2ForConditionalGeneration``) with and without Q-Pert.

Generation runs the Q-Former once on the image and hands its query outputs to the language
model; Q-Pert perturbs that Q-Former pass, so the objects' boxes steer what the caption is about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .attach import attach
from .config import QPertConfig
from .core.geometry import BoxesLike
from .errors import UnsupportedModelError
from .models.family import is_instance
from .models.registry import LoadedModel

CAPTION_CLASSES = ("transformers.Blip2ForConditionalGeneration",)


@dataclass(frozen=True)
class Captions:
    baseline: str
    qpert: str


@torch.no_grad()
def caption(
    loaded: LoadedModel,
    image: Image.Image,
    boxes: BoxesLike,
    config: QPertConfig,
    max_new_tokens: int = 30,
    **generate_kwargs: Any,
) -> Captions:
    """The caption of ``image`` without and with Q-Pert on its objects (the paper's Fig. 8).

    Args:
        loaded: a BLIP-2 captioner (``blip2-opt-2.7b``, ``blip2-flant5-xl`` or a saved folder).
        image: a PIL image; boxes: its objects, ``x0, y0, x1, y1`` in its pixels.
        config: the Q-Pert setting; max_new_tokens: the longest caption.
        generate_kwargs: for ``model.generate`` (greedy unless they say otherwise; the BLIP-2 paper
            uses ``num_beams=5``).

    Returns:
        :class:`Captions` (``baseline``, ``qpert``).

    Raises:
        UnsupportedModelError: the model is not a ``Blip2ForConditionalGeneration``.
    """
    model, processor = loaded.model, loaded.processor
    if not any(is_instance(model, name) for name in CAPTION_CLASSES):
        raise UnsupportedModelError(
            f"captioning needs {' or '.join(CAPTION_CLASSES)} (e.g. blip2-opt-2.7b); "
            f"{loaded.name} is a {type(model).__name__}"
        )
    weight = model.vision_model.embeddings.patch_embedding.weight
    pixels = processor.image_processor([image.convert("RGB")], return_tensors="pt").pixel_values
    pixels = pixels.to(weight.device, weight.dtype)
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, **generate_kwargs}
    with attach(model, config) as handle:
        base = model.generate(pixel_values=pixels, **options)
        with handle.objects([boxes], [(image.height, image.width)]):
            pert = model.generate(pixel_values=pixels, **options)
    # Decoder-only language models return the image and BOS tokens too: special, so skipped here.
    base_text, pert_text = (processor.batch_decode(ids, skip_special_tokens=True)[0].strip() for ids in (base, pert))
    return Captions(base_text, pert_text)
