"""``qpert search``: a text query against an index, ranked by ITC, optionally re-ranked by ITM + ITC.

The ITC ranking comes from the FAISS vectors of the chosen variant (Q-Pert or baseline). With
ITM, the best ``candidates`` images are re-scored from their kept vision tokens: Q-Pert's
subspaces are rebuilt from the stored boxes (cheap), so ITM uses the same Q-Pert as the index.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..adapters import ImageObjects
from ..attach import attach
from ..errors import ConfigError, MissingFileError, UnsupportedModelError
from ..eval.cache import FeatureStore
from ..models.registry import load_model, retrieval_heads
from .catalog import Catalog, PhotoRow
from .indexer import CATALOG, IndexSettings, model_key, read_manifest, tokens_key
from .vectors import VectorIndex


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    score: float               # what the ranking used: ITC, or ITM + ITC with re-ranking
    itc: float
    itm: Optional[float]
    width: int
    height: int
    boxes: list[dict]          # [{box: [x0, y0, x1, y1], score, label}], in the photo's pixels

    def to_json(self) -> dict:
        return asdict(self)


class PhotoIndex:
    """An index opened for searching: the model, the catalog in memory and both FAISS indexes."""

    def __init__(self, index_dir: Path, device: str = "auto"):
        self.index_dir = Path(index_dir)
        manifest = read_manifest(self.index_dir)
        if manifest is None:
            raise MissingFileError(f"{self.index_dir} is not a qpert index (no index.json); build one with "
                                    "`qpert index PHOTOS_DIR`")
        self.photos_dir = Path(manifest["photos"])
        self.settings = IndexSettings.from_json(manifest["settings"])
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        catalog = Catalog(self.index_dir / CATALOG)
        try:
            self.rows: dict[int, PhotoRow] = {r.id: r for r in catalog.photos().values()}
            self.vectors = {v: self._vectors(catalog, v) for v in ("baseline", "qpert")}
        finally:
            catalog.close()
        self.loaded = load_model(self.settings.model, device=self.device, dtype=self.settings.dtype,
                                 trust_remote_code=self.settings.trust_remote_code)
        self.retriever = retrieval_heads(self.loaded.model)
        self.handle = attach(self.loaded.model, self.settings.qpert)
        self.features = FeatureStore(self.index_dir / "features", writer=False)
        self.model_key = model_key(self.loaded, self.settings)

    def _vectors(self, catalog: Catalog, variant: str) -> VectorIndex:
        """The saved FAISS index, rebuilt from the catalog when an interrupted update left it stale."""
        generation = catalog.generation
        index = VectorIndex.load(self.index_dir, variant, generation)
        if index is None:
            ids, vectors = catalog.vectors(variant)
            index = VectorIndex.build(ids, vectors, self.settings.faiss)
        return index

    def __len__(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        self.handle.detach()

    @torch.no_grad()
    def search(self, query: str, k: int = 10, qpert: bool = True, itm: bool = False,
               candidates: int = 32) -> list[Hit]:
        """The ``k`` best photos for ``query``; ``itm`` re-ranks the best ``max(k, candidates)`` by ITM + ITC."""
        if not query.strip():
            raise ConfigError("the search query is empty")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        model, processor = self.loaded.model, self.loaded.processor
        ids, mask = self.retriever.tokenize(model, processor, [query])
        text = self.retriever.text_embeddings(model, ids, mask).float().cpu().numpy()
        pool = max(k, candidates) if itm else k
        photo_ids, itc = (a[0] for a in self.vectors["qpert" if qpert else "baseline"].search(text, pool))
        rows = [self.rows[int(i)] for i in photo_ids]
        itm_scores = self._itm(rows, ids, mask, qpert) if itm and rows else None
        order = np.argsort(-(itm_scores + itc), kind="stable") if itm_scores is not None else np.arange(len(rows))
        hits = []
        for rank, j in enumerate(order[:k]):
            row = rows[j]
            itm_j = None if itm_scores is None else float(itm_scores[j])
            hits.append(Hit(rank + 1, row.id, row.path, float(itc[j]) + (itm_j or 0.0), float(itc[j]), itm_j,
                            row.width, row.height, row.detections.to_json()))
        return hits

    def _itm(self, rows: list[PhotoRow], ids: torch.Tensor, mask: torch.Tensor, qpert: bool) -> np.ndarray:
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
        boxes = [r.detections.boxes for r in rows]
        sizes = [(r.height, r.width) for r in rows]
        with ImageObjects.from_boxes(self.handle, tokens, boxes, sizes).perturb():
            return self.retriever.itm_scores(model, tokens, ids, mask).cpu().numpy()

    def _tokens(self, row: PhotoRow) -> torch.Tensor:
        key = tokens_key(row.sha256, self.model_key)
        try:
            return self.features.load("tokens", key)["tokens"]
        except (KeyError, FileNotFoundError) as e:
            raise ConfigError(f"the vision tokens of {row.path} are missing from the index; run `qpert index` "
                             "again to repair it") from e

    def photo_path(self, photo_id: int) -> Path:
        """The indexed photo's file; only paths inside the indexed folder ever come out."""
        row = self.rows.get(photo_id)
        if row is None:
            raise KeyError(photo_id)
        path = (self.photos_dir / row.path).resolve()
        if not path.is_relative_to(self.photos_dir.resolve()):
            raise KeyError(photo_id)
        return path

