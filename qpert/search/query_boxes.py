"""Query-aware Q-Pert: boxes for what a search query names, from OWLv2 features stored at index time.

OWLv2's image side (per-patch boxes, objectness, class embeddings and the logit shift / scale of its
class head) does not depend on the text, so ``qpert index --query-boxes`` runs it once per photo and
keeps the top-N patches by objectness (:class:`QueryBoxDetector`). At search time a query is embedded
by OWLv2's text tower and scored against the stored class embeddings with one matrix product, exactly
as ``Owlv2ForObjectDetection.class_predictor`` + ``post_process_object_detection`` score them
(:class:`QueryBoxScorer`); the boxes above the threshold perturb the best candidates' Q-Pert
embeddings, recomputed from their stored vision tokens (:func:`rescore`): the vision encoder never runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from PIL import Image

from ..adapters import ImageObjects
from ..errors import ConfigError
from ..eval.cache import FeatureStore, content_key
from ..models.checkpoints import tensor_only_pickles
from .detectors import Detections, DetectorOptions, keep, processor_side

if TYPE_CHECKING:
    from .catalog import PhotoRow
    from .searcher import PhotoIndex

log = logging.getLogger(__name__)

#: The feature store's kind (``features/query-boxes/<key>.safetensors``).
KIND = "query-boxes"
DEFAULT_DETECTOR = "hf:google/owlv2-base-patch16-ensemble"
MODES = ("add", "replace")
#: ``qpert index --query-boxes none``: drop the stored features.
NONE = "none"


def identity(spec: Optional[str], count: int) -> tuple:
    """What the stored features depend on; () without query boxes, so older index keys stay unchanged."""
    return () if spec is None else (KIND, spec, count)


def feature_key(sha: str, spec: str, count: int) -> str:
    return content_key(KIND, sha, spec, count)


def check_settings(spec: Optional[str], count: int, itm_features: bool) -> None:
    """Index settings that cannot work, as one ``error:`` line."""
    if spec is None:
        return
    if count < 1:
        raise ConfigError(f"--query-box-count must be at least 1, got {count}")
    if not itm_features:
        raise ConfigError("--query-boxes re-scores photos from their stored vision tokens: leave out --no-itm-features")


def resolve(value: Optional[str], count: Optional[int], index_dir: Path) -> tuple[Optional[str], int]:
    """``qpert index --query-boxes / --query-box-count``: unset, the index's own (a re-run that adds photos
    keeps the features); ``none`` drops them."""
    from .indexer import read_manifest

    manifest = read_manifest(index_dir)
    previous = manifest["settings"] if manifest else {}
    spec = previous.get("query_boxes") if value is None else None if value.strip().lower() == NONE else value
    return spec, count if count is not None else previous.get("query_box_count", 64)


def _load_owlv2(spec: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The OWLv2 model and processor of ``hf:<hub id>`` or a folder; its own classes, no re-implementation."""
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

    source = spec[3:] if spec.startswith("hf:") else spec
    with tensor_only_pickles(Path(source)):
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type != "owlv2":  # OWL-ViT has no objectness head to choose candidates without a text
            raise ConfigError(
                f"--query-boxes needs an OWLv2 detector (objectness picks each photo's candidates), "
                f"{spec!r} is {model_type!r}; try {DEFAULT_DETECTOR}"
            )
        model = AutoModelForZeroShotObjectDetection.from_pretrained(source)
        processor = AutoProcessor.from_pretrained(source)
    return model.eval().to(device), processor


class QueryBoxDetector:
    """Index time: OWLv2's image side for each photo, its top ``count`` patches by objectness kept."""

    def __init__(self, spec: str, count: int, store: FeatureStore, device: torch.device):
        self.spec, self.count, self.store, self.device = spec, count, store, device
        self.model, self.processor = _load_owlv2(spec, device)

    @property
    def input_side(self) -> int:
        return processor_side(self.processor)

    def key(self, sha: str) -> str:
        return feature_key(sha, self.spec, self.count)

    def kept(self, sha: str) -> bool:
        return self.store.has(KIND, self.key(sha))

    def store_missing(
        self, shas: Sequence[str], images: Sequence[Image.Image], sizes: Optional[Sequence[tuple[int, int]]] = None
    ) -> None:
        """Run the detector on the photos whose features are not stored yet, and store them (atomically);
        ``sizes``: (height, width) of the photos themselves, when ``images`` were decoded smaller."""
        todo = [i for i, sha in enumerate(shas) if not self.kept(sha)]
        if todo:
            found = self.features([images[i] for i in todo], [sizes[i] for i in todo] if sizes else None)
            for i, features in zip(todo, found):
                self.store.save(KIND, self.key(shas[i]), features)

    @torch.no_grad()
    def features(
        self, images: Sequence[Image.Image], sizes: Optional[Sequence[tuple[int, int]]] = None
    ) -> list[dict[str, torch.Tensor]]:
        """Per photo: ``boxes`` (N, 4) xyxy pixels, ``objectness`` (N,), ``class_embeds`` (N, D) fp16,
        normalized as the class head normalizes them, and the head's ``logit_shift`` / ``logit_scale`` (N,)."""
        from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

        model = self.model
        images = [im.convert("RGB") for im in images]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        feature_map = model.image_embedder(pixel_values=pixels)[0]
        b, h, w, d = feature_map.shape
        feats = feature_map.reshape(b, h * w, d)
        objectness = model.objectness_predictor(feats)
        pred_boxes = model.box_predictor(feats, feature_map)
        class_embeds = model.class_predictor(feats)[1]
        class_embeds = class_embeds / (torch.linalg.norm(class_embeds, dim=-1, keepdim=True) + 1e-6)
        head = model.class_head
        shift = head.logit_shift(feats)[..., 0]
        scale = head.elu(head.logit_scale(feats))[..., 0] + 1
        # the processor's own geometry (OWLv2 pads to a square): every box, whatever its (dummy) score
        dummy = Owlv2ObjectDetectionOutput(logits=torch.zeros_like(objectness)[..., None], pred_boxes=pred_boxes)
        sizes = list(sizes) if sizes is not None else [(im.height, im.width) for im in images]
        boxes = self.processor.image_processor.post_process_object_detection(dummy, threshold=-1.0, target_sizes=sizes)
        out = []
        for i in range(b):
            top = objectness[i].topk(min(self.count, h * w)).indices
            out.append(
                {
                    "boxes": boxes[i]["boxes"][top].float(),
                    "objectness": objectness[i, top].float(),
                    "class_embeds": class_embeds[i, top].half(),
                    "logit_shift": shift[i, top].float(),
                    "logit_scale": scale[i, top].float(),
                }
            )
        return out


def collect_garbage(features_root: Path, kept: set[str]) -> None:
    """Remove the stored features of photos no longer indexed (all of them when ``kept`` is empty)."""
    for path in (Path(features_root) / KIND).glob("*.safetensors"):
        if path.stem not in kept:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class QueryBoxOptions:
    """Search-time choices: OWLv2 score threshold, at most ``max_boxes`` per photo, and whether the query's
    boxes are added to the stored ones or replace them."""

    threshold: float = 0.1
    max_boxes: int = 3
    mode: str = "add"

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"--query-box-threshold is a probability in [0, 1], got {self.threshold}")
        if self.max_boxes < 1:
            raise ConfigError(f"--max-query-boxes must be at least 1, got {self.max_boxes}")
        if self.mode not in MODES:
            raise ConfigError(f"--query-boxes-mode is add or replace, got {self.mode!r}")


def phrases(query: str) -> list[str]:
    """The texts a query is detected with: the whole query, and each comma-separated part when there are several
    (a noun-chunk parser would add a large dependency for little; commas are what users type)."""
    parts = [p.strip() for p in query.split(",") if p.strip()]
    return [query.strip()] + (parts if len(parts) > 1 else [])


class QueryBoxScorer:
    """Search time: OWLv2's text tower (loaded on first use) against the stored class embeddings."""

    def __init__(self, spec: str, device: torch.device):
        self.spec, self.device = spec, device
        self._model: Optional[torch.nn.Module] = None
        self._processor: Any = None
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(P, D) query embeddings, normalized as ``Owlv2Model`` and then the class head normalize them."""
        key = tuple(texts)
        if key not in self._cache:
            if self._model is None:
                self._model, self._processor = _load_owlv2(self.spec, self.device)
            tokenizer = self._processor.tokenizer
            length = self._model.config.text_config.max_position_embeddings
            tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt").to(
                self.device
            )
            emb = self._model.owlv2.get_text_features(**tokens).pooler_output
            emb = emb / torch.linalg.norm(emb, ord=2, dim=-1, keepdim=True)
            self._cache = {key: emb / (torch.linalg.norm(emb, dim=-1, keepdim=True) + 1e-6)}  # one query at a time
        return self._cache[key]

    def choose(
        self,
        features: dict[str, torch.Tensor],
        texts: Sequence[str],
        options: QueryBoxOptions,
        size: tuple[int, int],
    ) -> Detections:
        """The stored candidates scoring above the threshold for any of ``texts`` (sigmoid of the best
        text's logit, as ``post_process_object_detection``), clipped to the photo, best first."""
        query = self.text_embeddings(texts).float().cpu()
        logits = features["class_embeds"].float() @ query.T
        logits = (logits + features["logit_shift"][:, None]) * features["logit_scale"][:, None]
        best, which = logits.max(dim=-1)
        scores = torch.sigmoid(best)
        above = scores > options.threshold  # strictly, as the post-processing's threshold
        labels = [texts[int(i)] for i in which[above]]
        return keep(features["boxes"][above], scores[above], labels, DetectorOptions(0.0, options.max_boxes), size)


@dataclass
class Rescored:
    """What :func:`rescore` found: the candidates' ITC (re-scored where the query had boxes) and, per
    candidate, the query's boxes (None: none above the threshold) and the boxes Q-Pert used."""

    itc: np.ndarray
    query_boxes: list[Optional[Detections]]
    boxes: list[np.ndarray]


def require_features(index: PhotoIndex) -> str:
    """The index's query-box detector, or the one-line error saying how to add its features."""
    spec = index.settings.query_boxes
    if spec is None:
        raise ConfigError(
            "this index has no query-box features: add them with `qpert index PHOTOS --query-boxes "
            f"{DEFAULT_DETECTOR}` (runs only the detector; the stored vision tokens are reused)"
        )
    return spec


@torch.no_grad()
def rescore(
    index: PhotoIndex,
    rows: Sequence[PhotoRow],
    query: str,
    text_emb: torch.Tensor,
    itc: np.ndarray,
    options: QueryBoxOptions,
) -> Rescored:
    """Q-Pert ITC of the candidates on the query's boxes (with or instead of the stored ones), from
    their stored vision tokens; candidates without a box above the threshold keep their score."""
    spec = require_features(index)
    scorer = getattr(index, "_query_box_scorer", None)
    if scorer is None or scorer.spec != spec:
        scorer = index._query_box_scorer = QueryBoxScorer(spec, index.device)
    texts = phrases(query)
    chosen: list[Optional[Detections]] = []
    for row in rows:
        key = feature_key(row.sha256, spec, index.settings.query_box_count)
        features = index.features.get(KIND, key)
        if features is None:
            log.warning("no query-box features for %s: run `qpert index` to store them", row.path)
            chosen.append(None)
            continue
        found = scorer.choose(features, texts, options, (row.height, row.width))
        chosen.append(found if len(found.boxes) else None)
    boxes = [
        r.detections.boxes
        if c is None
        else (c.boxes if options.mode == "replace" else np.concatenate([r.detections.boxes, c.boxes]))
        for r, c in zip(rows, chosen)
    ]
    itc = np.asarray(itc, dtype=np.float32).copy()
    todo = [i for i, c in enumerate(chosen) if c is not None]
    if todo:
        model, retriever = index.loaded.model, index.retriever
        dtype = next(model.parameters()).dtype
        tokens = torch.stack([index._tokens(rows[i]) for i in todo]).to(index.device, dtype)
        sizes = [(rows[i].height, rows[i].width) for i in todo]
        objects = ImageObjects.from_boxes(index.handle, tokens, [boxes[i] for i in todo], sizes)
        with objects.perturb():
            emb = retriever.image_embeddings(model, tokens)
        scores = retriever.itc_scores(emb, text_emb.to(emb.device)).float().cpu().numpy()[:, 0]
        if not np.isfinite(scores).all():
            raise ConfigError(
                f"Q-Pert with alpha={index.settings.qpert.alpha:g} on the query's boxes gave non-finite scores; "
                "search without --query-boxes or re-index with a smaller --alpha"
            )
        itc[todo] = scores
    return Rescored(itc, chosen, boxes)
