"""Score images against texts with and without Q-Pert (the library's one-call use), for any family
with a retrieval interface (``qpert.models.family.Retriever``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image

from .attach import attach
from .config import QPertConfig
from .core.boxes import BoxesLike
from .errors import UnsupportedModelError
from .models.family import Retriever
from .models.registry import LoadedModel, retriever_of
from .object_baseline import object_masks, object_similarities


@dataclass
class Scores:
    """(images, texts) matrices; ``itm`` is ITM + ITC as in the paper's re-ranking, when computed."""

    itc: torch.Tensor
    itm: Optional[torch.Tensor]


def resolve_itm(retriever: Retriever, itm: Optional[bool], model_name: str) -> bool:
    """``None`` means ITM re-ranking whenever the model has an ITM head (BLIP-2, BLIP) and ITC
    alone otherwise (CoCa, SigLIP); asking for ITM from a model without the head is an error."""
    if itm is None:
        return retriever.has_itm
    if itm and not retriever.has_itm:
        raise UnsupportedModelError(f"{model_name} has no image-text matching (ITM) head, so ITM re-ranking is "
                                    "unavailable; score it with ITC only (--no-itm)")
    return itm


@torch.no_grad()
def score(loaded: LoadedModel, images: Sequence[Image.Image], boxes: Sequence[BoxesLike], texts: Sequence[str],
          config: QPertConfig, itm: Optional[bool] = None, object_baseline: bool = False,
          exclude_sites: Sequence[str] = ()) -> dict[str, Scores]:
    """{"baseline": Scores, "qpert": Scores} for every image x text pair.

    Vision tokens and Q-Pert subspaces are computed once per image and reused for every text.
    ``itm=None`` adds ITM + ITC when the model has an ITM head. ``object_baseline`` adds
    "object-embedding": the baseline's scores plus the best object's similarity to the text
    (the paper's Table F ablation, ``qpert.object_baseline``). ``exclude_sites`` as ``qpert.attach``'s ``exclude``.
    """
    model, processor = loaded.model, loaded.processor
    retriever = retriever_of(model)
    itm = resolve_itm(retriever, itm, loaded.name)
    sizes = [(im.height, im.width) for im in images]
    tokens = retriever.image_tokens(model, retriever.preprocess(model, processor, images))
    ids, mask = retriever.tokenize(model, processor, texts)
    text_emb = retriever.text_embeddings(model, ids, mask)

    def itc() -> torch.Tensor:
        return retriever.itc_scores(retriever.image_embeddings(model, tokens), text_emb).cpu()

    handle = attach(model, config, exclude=exclude_sites)
    try:
        subspaces = handle.compute_subspaces(retriever.key_tokens(model, tokens), boxes, sizes)
        results = {"baseline": Scores(itc(), None)}
        with handle.objects(subspaces=subspaces):
            results["qpert"] = Scores(itc(), None)
        if itm:
            img_idx = torch.arange(len(images)).repeat_interleave(len(texts))
            txt_idx = torch.arange(len(texts)).repeat(len(images))
            pair = (model, tokens, ids[txt_idx], mask[txt_idx])
            base = retriever.itm_scores(*pair, image_index=img_idx).cpu().view(len(images), len(texts))
            with handle.objects(subspaces=subspaces.select(img_idx)):
                pert = retriever.itm_scores(*pair, image_index=img_idx).cpu().view(len(images), len(texts))
            results["baseline"].itm = base + results["baseline"].itc
            results["qpert"].itm = pert + results["qpert"].itc
        if object_baseline:
            base = results["baseline"]
            masks = object_masks(handle.layout, boxes, sizes, tokens.shape[1])
            extra = object_similarities(model, retriever, tokens, masks, text_emb, base.itc)
            results["object-embedding"] = Scores(base.itc + extra, None if base.itm is None else base.itm + extra)
        return results
    finally:
        handle.detach()
