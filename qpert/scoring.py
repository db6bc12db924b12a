"""Score images against texts with and without Q-Pert (the library's one-call use), for any family
with retrieval heads (``qpert.models.family.RetrievalHeads``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image

from .adapters import ImageObjects
from .attach import attach
from .config import QPertConfig
from .core.geometry import BoxesLike
from .errors import ConfigError, UnsupportedModelError
from .models.family import RetrievalHeads
from .models.registry import LoadedModel, retrieval_heads
from .object_baseline import object_masks, object_similarities


@dataclass
class Scores:
    """(images, texts) matrices; ``itm`` is ITM + ITC as in the paper's re-ranking, when computed."""

    itc: torch.Tensor
    itm: Optional[torch.Tensor]


def resolve_itm(heads: RetrievalHeads, itm: Optional[bool], model_name: str) -> bool:
    """``None`` means ITM re-ranking whenever the model has an ITM head (BLIP-2, BLIP) and ITC
    alone otherwise (CoCa, SigLIP); asking for ITM from a model without the head is an error."""
    if itm is None:
        return heads.has_itm
    if itm and not heads.has_itm:
        raise UnsupportedModelError(
            f"{model_name} has no image-text matching (ITM) head, so ITM re-ranking is "
            "unavailable; score it with ITC only (--no-itm)"
        )
    return itm


@torch.no_grad()
def score(
    loaded: LoadedModel,
    images: Sequence[Image.Image],
    boxes: Sequence[BoxesLike],
    texts: Sequence[str],
    config: QPertConfig,
    itm: Optional[bool] = None,
    object_baseline: bool = False,
    exclude_sites: Sequence[str] = (),
) -> dict[str, Scores]:
    """Score every image against every text, with and without Q-Pert.

    Vision tokens and Q-Pert subspaces are computed once per image and reused for every text.

    Args:
        loaded: from :func:`qpert.load_model`; its family must have retrieval heads.
        images: PIL images.
        boxes: one (M_i, 4) ``x0, y0, x1, y1`` array of pixel boxes per image (empty: no objects).
        texts: the captions.
        config: the Q-Pert setting.
        itm: also compute ITM + ITC (the re-ranking score); None: whenever the model has an ITM head.
        object_baseline: add "object-embedding": the baseline's scores plus the best object's
            similarity to the text (the paper's Table F ablation, ``qpert.object_baseline``).
        exclude_sites: cross-attentions to leave alone, as ``qpert.attach``'s ``exclude``.

    Returns:
        ``{"baseline": Scores, "qpert": Scores}`` (and "object-embedding"), each holding (images, texts)
        matrices: ``itc``, and ``itm`` = ITM + ITC when computed.

    Raises:
        UnsupportedModelError: no retrieval heads, or ``itm=True`` without an ITM head.
        QPertError: boxes that do not match the images.
    """
    model, processor = loaded.model, loaded.processor
    heads = retrieval_heads(model)
    itm = resolve_itm(heads, itm, loaded.name)
    sizes = [(im.height, im.width) for im in images]
    tokens = heads.image_tokens(model, heads.preprocess(model, processor, images))
    ids, mask = heads.tokenize(model, processor, texts)
    text_emb = heads.text_embeddings(model, ids, mask)

    def itc() -> torch.Tensor:
        return heads.itc_scores(heads.image_embeddings(model, tokens), text_emb).cpu()

    with attach(model, config, exclude=exclude_sites) as handle:
        objects = ImageObjects.from_boxes(handle, tokens, boxes, sizes)
        results = {"baseline": Scores(itc(), None)}
        with objects.perturb():
            results["qpert"] = Scores(itc(), None)
        if itm:
            img_idx = torch.arange(len(images)).repeat_interleave(len(texts))
            txt_idx = torch.arange(len(texts)).repeat(len(images))
            pair = (model, tokens, ids[txt_idx], mask[txt_idx])
            base = heads.itm_scores(*pair, image_index=img_idx).cpu().view(len(images), len(texts))
            with objects.perturb(img_idx):
                pert = heads.itm_scores(*pair, image_index=img_idx).cpu().view(len(images), len(texts))
            results["baseline"].itm = base + results["baseline"].itc
            results["qpert"].itm = pert + results["qpert"].itc
        if object_baseline:
            base = results["baseline"]
            masks = object_masks(handle.layout, boxes, sizes, tokens.shape[1])
            extra = object_similarities(model, heads, tokens, masks, text_emb, base.itc)
            results["object-embedding"] = Scores(base.itc + extra, None if base.itm is None else base.itm + extra)
    _check_finite(results, config)
    return results


def _check_finite(results: dict[str, Scores], config: QPertConfig) -> None:
    """NaN or inf scores rank nothing: say so instead of printing or ranking them."""
    for name, scores in results.items():
        if any(t is not None and not torch.isfinite(t).all() for t in (scores.itc, scores.itm)):
            raise non_finite_scores(name, config if name == "qpert" else None)


def non_finite_scores(name: str, config: Optional[QPertConfig]) -> ConfigError:
    """The error for scores that are NaN or inf (an overflow; with Q-Pert on, of its alpha), wherever scored."""
    cause = (
        f" (Q-Pert with alpha={config.alpha:g} overflows this model; choose a smaller --alpha)"
        if config is not None and config.enabled
        else ""
    )
    return ConfigError(f"the {name} scores are not finite{cause}")
