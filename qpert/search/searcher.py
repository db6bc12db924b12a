"""``qpert search``: a text query against an index, ranked by ITC, optionally re-ranked by ITM + ITC.

The ITC ranking comes from the FAISS vectors of the chosen variant (Q-Pert or baseline). With
ITM, the best ``candidates`` images are re-scored from their kept vision tokens: Q-Pert's
subspaces are rebuilt from the stored boxes (cheap), so ITM uses the same Q-Pert as the index.
An open index follows ``qpert index`` runs made meanwhile (``refresh``), as the search page does.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np
import torch

from ..adapters import ImageObjects
from ..attach import attach
from ..errors import ConfigError, MissingFileError, UnsupportedModelError
from ..eval.cache import FeatureStore
from ..models.registry import load_model, retrieval_heads
from ..terminal import printable
from .catalog import Catalog, PhotoRow
from .indexer import (
    CATALOG,
    IndexSettings,
    model_key,
    read_manifest,
    settings_from_json,
    storage_dtype,
    tokens_key,
)
from .photos import UnreadablePhotoError, decode_photo, open_inside
from .query_boxes import QueryBoxOptions, rescore
from .vectors import VectorIndex

log = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    score: float  # what the ranking used: ITC, or ITM + ITC with re-ranking
    itc: float
    itm: Optional[float]
    width: int
    height: int
    boxes: list[dict]  # [{box: [x0, y0, x1, y1], score, label}], in the photo's pixels
    query_boxes: Optional[list[dict]] = None  # with query_boxes: the query's boxes Q-Pert used (label: the phrase)

    def to_json(self) -> dict:
        return asdict(self)


class PhotoIndex:
    """An index opened for searching: the model, the catalog in memory and both FAISS indexes."""

    def __init__(self, index_dir: Path, device: str = "auto"):
        self.index_dir = Path(index_dir)
        manifest = read_manifest(self.index_dir)
        if manifest is None:
            raise MissingFileError(
                f"{self.index_dir} is not a qpert index (no index.json); build one with `qpert index PHOTOS_DIR`"
            )
        self.device = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
        )
        self.catalog = Catalog(self.index_dir / CATALOG, readonly=True)
        self.features = FeatureStore(self.index_dir / "features", writer=False)
        self._reloading = threading.Lock()
        self.handle = None
        self.settings: Optional[IndexSettings] = None
        try:
            self._load(manifest)
        except BaseException:
            self.close()
            raise

    def _load(self, manifest: dict) -> None:
        """Read the catalog, the FAISS indexes and (when they changed) the model and Q-Pert settings."""
        with self.catalog.snapshot():
            generation = self.catalog.generation
            stored = self.catalog.settings()  # committed with the vectors (older catalogs: the manifest's)
            settings = (
                settings_from_json(stored, self.catalog.path)
                if stored
                else IndexSettings.from_json(manifest["settings"])
            )
            rows = {r.id: r for r in self.catalog.photos().values()}
            vectors = {v: self._vectors(v, generation, settings) for v in ("baseline", "qpert")}
        same_model = self.settings is not None and _model_identity(self.settings) == _model_identity(settings)
        if self.handle is not None and not (same_model and self.settings.qpert == settings.qpert):
            self.handle.detach()
            self.handle = None
        if not same_model:
            self.loaded = load_model(
                settings.model, device=self.device, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code
            )
            self.retriever = retrieval_heads(self.loaded.model)
            self.model_key = model_key(self.loaded, settings)
        if self.handle is None:
            self.handle = attach(self.loaded.model, settings.qpert)
        self.settings, self.rows, self.vectors, self.generation = settings, rows, vectors, generation
        self.photos_dir = Path(manifest["photos"])

    def _vectors(self, variant: str, generation: int, settings: IndexSettings) -> VectorIndex:
        """The saved FAISS index, rebuilt from the catalog when an interrupted update left it stale."""
        index = VectorIndex.load(self.index_dir, variant, generation)
        if index is None:
            ids, vectors = self.catalog.vectors(variant)
            index = VectorIndex.build(ids, vectors, settings.faiss)
        return index

    def refresh(self) -> bool:
        """Load the index again if ``qpert index`` has committed an update since; True when it did.
        Cheap when nothing changed (one query), so servers call it before every search."""
        with self._reloading:
            if self.catalog.generation == self.generation:
                return False
            manifest = read_manifest(self.index_dir)
            if manifest is None:  # the index folder was deleted: keep answering from memory
                return False
            self._load(manifest)
            return True

    def __len__(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.detach()
        self.catalog.close()

    @torch.no_grad()
    def search(
        self,
        query: str,
        k: int = 10,
        qpert: bool = True,
        itm: bool = False,
        candidates: int = 32,
        query_boxes: Optional[QueryBoxOptions] = None,
    ) -> list[Hit]:
        """The ``k`` best photos for ``query``; ``itm`` re-ranks the best ``max(k, candidates)`` by ITM + ITC;
        ``query_boxes`` re-scores them with Q-Pert on the boxes the query names (``qpert.search.query_boxes``)."""
        if query_boxes is not None and not qpert:
            raise ConfigError("--query-boxes re-scores with Q-Pert: leave out --no-qpert")
        if not query.strip():
            raise ConfigError("the search query is empty")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        model, processor = self.loaded.model, self.loaded.processor
        ids, mask = self.retriever.tokenize(model, processor, [query])
        text = self.retriever.text_embeddings(model, ids, mask).float().cpu().numpy()
        pool = max(k, candidates) if itm or query_boxes else k
        photo_ids, itc = (a[0] for a in self.vectors["qpert" if qpert else "baseline"].search(text, pool))
        rows = [self.rows[int(i)] for i in photo_ids]
        found = rescore(self, rows, query, torch.from_numpy(text), itc, query_boxes) if query_boxes else None
        if found is not None:
            itc = found.itc
        itm_scores = self._itm(rows, ids, mask, qpert, None if found is None else found.boxes) if itm and rows else None
        if itm_scores is not None and not np.isfinite(itm_scores).all():
            raise ConfigError(
                f"ITM re-ranking gave non-finite scores (Q-Pert alpha={self.settings.qpert.alpha:g} "
                "overflows this model); search without --itm or re-index with a smaller --alpha"
            )
        if itm_scores is not None:
            order = np.argsort(-(itm_scores + itc), kind="stable")
        elif found is not None:  # re-scored: the first stage's order no longer holds
            order = np.argsort(-itc, kind="stable")
        else:
            order = np.arange(len(rows))
        hits = []
        for rank, j in enumerate(order[:k]):
            row = rows[j]
            itm_j = None if itm_scores is None else float(itm_scores[j])
            hits.append(
                Hit(
                    rank + 1,
                    row.id,
                    row.path,
                    float(itc[j]) + (itm_j or 0.0),
                    float(itc[j]),
                    itm_j,
                    row.width,
                    row.height,
                    row.detections.to_json(),
                    None if found is None else (found.query_boxes[j].to_json() if found.query_boxes[j] else []),
                )
            )
        return hits

    def _itm(
        self,
        rows: list[PhotoRow],
        ids: torch.Tensor,
        mask: torch.Tensor,
        qpert: bool,
        boxes: Optional[list[np.ndarray]] = None,
    ) -> np.ndarray:
        """ITM logits of the rows, Q-Pert on ``boxes`` (default: each photo's stored boxes)."""
        if not self.retriever.has_itm:
            raise UnsupportedModelError(f"{self.settings.model} has no ITM head: search without --itm")
        if not self.settings.itm_features:
            raise ConfigError("this index was built with --no-itm-features: rebuild it with vision tokens for --itm")
        model = self.loaded.model
        dtype = next(model.parameters()).dtype
        tokens = torch.stack([self._tokens(row) for row in rows]).to(self.device, dtype)
        ids, mask = ids.expand(len(rows), -1), mask.expand(len(rows), -1)
        if not qpert:
            return self.retriever.itm_scores(model, tokens, ids, mask).cpu().numpy()
        boxes = boxes if boxes is not None else [r.detections.boxes for r in rows]
        sizes = [(r.height, r.width) for r in rows]
        with ImageObjects.from_boxes(self.handle, tokens, boxes, sizes).perturb():
            return self.retriever.itm_scores(model, tokens, ids, mask).cpu().numpy()

    def _tokens(self, row: PhotoRow) -> torch.Tensor:
        """The photo's kept vision tokens; when they are missing or damaged (failing their checksum), encoded
        again from the photo, as the indexer did, without writing to the index."""
        key = tokens_key(row.sha256, self.model_key)
        kept = self.features.get("tokens", key)
        if kept is not None:
            return kept["tokens"]
        log.warning(
            "the vision tokens of %s are missing or damaged in the index: encoding them from the photo "
            "(`qpert index --rehash` stores them again)",
            printable(row.path),
        )
        repair = f"run `qpert index --rehash` to repair the index for {printable(row.path)}"
        try:
            with open_inside(self.photos_dir, row.path) as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != row.sha256:
                raise ConfigError(f"the photo changed since it was indexed: {repair}")
            image, _ = decode_photo(io.BytesIO(data), self.photos_dir / row.path)
        except (OSError, UnreadablePhotoError) as e:
            raise ConfigError(f"the photo cannot be read to encode its vision tokens ({e}): {repair}") from e
        model = self.loaded.model
        pixels = self.retriever.preprocess(model, self.loaded.processor, [image])  # each family moves its inputs
        tokens = self.retriever.image_tokens(model, pixels)[0]
        return tokens.to(storage_dtype(tokens))

    def photo_path(self, photo_id: int) -> Path:
        """The indexed photo's file; only paths inside the indexed folder ever come out. To read it,
        use ``open_photo``: a path checked now may be a link to elsewhere by the time it is opened."""
        row = self.rows.get(photo_id)
        if row is None:
            raise KeyError(photo_id)
        path = (self.photos_dir / row.path).resolve()
        if not path.is_relative_to(self.photos_dir.resolve()):
            raise KeyError(photo_id)
        return path

    def open_photo(self, photo_id: int) -> tuple[BinaryIO, PhotoRow]:
        """The indexed photo opened for reading, and its row: ``KeyError`` for an unknown id,
        ``OSError`` when the file is gone or what was opened is not a file inside the folder."""
        row = self.rows[photo_id]
        return open_inside(self.photos_dir, row.path), row


def _model_identity(settings: IndexSettings) -> tuple:
    """What a loaded model depends on: an update changing only Q-Pert settings keeps the model."""
    return settings.model, settings.dtype, settings.trust_remote_code
