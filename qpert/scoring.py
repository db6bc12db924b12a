"""Score images against texts with and without Q-Pert (the library's one-call use)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image

from .attach import attach
from .config import QPertConfig
from .core.boxes import BoxesLike
from .models import blip2
from .errors import UnsupportedModelError
from .models.registry import LoadedModel, family_of

#: BLIP-2's retrieval evaluation truncates captions to this many tokens.
MAX_TEXT_TOKENS = 35


def check_scorable(loaded: LoadedModel) -> None:
    """The retrieval scoring below drives BLIP-2's ITC/ITM heads; other families attach from Python."""
    if family_of(loaded.model) is not blip2.BLIP2:
        raise UnsupportedModelError(
            f"scoring and evaluation run BLIP-2 retrieval models for now; {type(loaded.model).__name__} "
            "is supported through qpert.attach(model, config) in Python")


@dataclass
class Scores:
    """(images, texts) matrices; ``itm`` is ITM + ITC as in the paper's re-ranking, when asked for."""

    itc: torch.Tensor
    itm: Optional[torch.Tensor]


def tokenize(loaded: LoadedModel, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = loaded.processor.tokenizer(list(texts), padding="longest", truncation=True, max_length=MAX_TEXT_TOKENS,
                                     return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def pixel_values(loaded: LoadedModel, images: Sequence[Image.Image]) -> torch.Tensor:
    return loaded.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values


@torch.no_grad()
def score(loaded: LoadedModel, images: Sequence[Image.Image], boxes: Sequence[BoxesLike], texts: Sequence[str],
          config: QPertConfig, itm: bool = True) -> dict[str, Scores]:
    """{"baseline": Scores, "qpert": Scores} for every image x text pair.

    Vision tokens and Q-Pert subspaces are computed once per image and reused for every text.
    """
    check_scorable(loaded)
    model = loaded.model
    sizes = [(im.height, im.width) for im in images]
    tokens = blip2.image_tokens(model, pixel_values(loaded, images))
    ids, mask = tokenize(loaded, texts)
    text_emb = blip2.text_embeddings(model, ids, mask)
    n_img, n_txt = len(images), len(texts)
    img_idx = torch.arange(n_img).repeat_interleave(n_txt)
    txt_idx = torch.arange(n_txt).repeat(n_img)
    handle = attach(model, config)
    try:
        subspaces = handle.compute_subspaces(tokens, boxes, sizes)
        results = {"baseline": Scores(blip2.itc_scores(blip2.image_embeddings(model, tokens), text_emb).cpu(), None)}
        with handle.objects(subspaces=subspaces):
            results["qpert"] = Scores(blip2.itc_scores(blip2.image_embeddings(model, tokens), text_emb).cpu(), None)
        if itm:
            img_idx = torch.arange(len(images)).repeat_interleave(len(texts))
            txt_idx = torch.arange(len(texts)).repeat(len(images))
            pair = (model, tokens[img_idx], ids[txt_idx], mask[txt_idx])
            base = blip2.itm_scores(*pair).cpu().view(len(images), len(texts))
            with handle.objects(subspaces=subspaces.select(img_idx)):
                pert = blip2.itm_scores(*pair).cpu().view(len(images), len(texts))
            results["baseline"].itm = base + results["baseline"].itc
            results["qpert"].itm = pert + results["qpert"].itc
        return results
    finally:
        handle.detach()
