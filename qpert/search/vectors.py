"""FAISS over the index's image embeddings, with one vector per query token (BLIP-2 has 32).

An image's ITC score is its best query token's inner product with the text (as BLIP-2 scores
ITC), so a search takes the k x Q nearest vectors and keeps each image's first (best) hit:
with the exact ``flat`` index that is exactly the top k images. ``hnsw`` and ``ivf`` trade a
little recall for speed on large collections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import ConfigError, MissingDependencyError

try:
    import faiss
except ImportError:  # the ``search`` extra
    raise MissingDependencyError("photo search needs FAISS: pip install 'qpert[search]'") from None

KINDS = ("flat", "hnsw", "ivf")


@dataclass
class VectorIndex:
    """A FAISS index over (n x Q) vectors plus the photo id that owns each vector."""

    index: faiss.Index
    owners: np.ndarray  # (n * Q,) photo ids
    per_image: int  # Q

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, kind: str = "flat") -> VectorIndex:
        """``vectors`` (n, Q, D) float32, L2-normalized (ITC embeddings are)."""
        if kind not in KINDS:
            raise ConfigError(f"unknown FAISS index kind {kind!r}; choose one of {', '.join(KINDS)}")
        n, q, d = vectors.shape
        flat = np.ascontiguousarray(vectors.reshape(n * q, d), dtype=np.float32)
        index = _empty(kind, d, len(flat))
        if not index.is_trained:
            index.train(flat)
        index.add(flat)
        return cls(index, np.repeat(ids.astype(np.int64), q), q)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(photo ids, scores) of the k best images for each of the (T, D) queries: lists of arrays."""
        query = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        total = self.index.ntotal
        if total == 0:
            return [np.zeros(0, np.int64)] * len(query), [np.zeros(0, np.float32)] * len(query)
        scores, rows = self.index.search(query, min(total, k * self.per_image))
        out_ids, out_scores = [], []
        for s, r in zip(scores, rows):
            valid = r >= 0
            owners, s = self.owners[r[valid]], s[valid]
            _, first = np.unique(owners, return_index=True)  # rows are best-first: first hit is the max
            first = np.sort(first)[:k]
            out_ids.append(owners[first])
            out_scores.append(s[first])
        return out_ids, out_scores

    def save(self, folder: Path, name: str, generation: int) -> None:
        """``name.faiss`` + ``name.owners.npy`` + ``name.json``; each written atomically, the stamp last."""
        folder = Path(folder)
        with atomic_write(folder / f"{name}.faiss") as f:
            writer = faiss.PyCallbackIOWriter(f.write)  # streamed: a large index is never copied in memory
            faiss.write_index(self.index, writer)
            del writer  # flushes FAISS's buffer into f
        with atomic_write(folder / f"{name}.owners.npy") as f:
            np.save(f, self.owners, allow_pickle=False)
        stamp = {"generation": generation, "per_image": self.per_image, "vectors": int(self.index.ntotal)}
        with atomic_write(folder / f"{name}.json") as f:
            f.write(json.dumps(stamp).encode())

    @classmethod
    def load(cls, folder: Path, name: str, generation: int) -> VectorIndex | None:
        """The saved index, or None when it is missing or belongs to another catalog generation."""
        folder = Path(folder)
        try:
            stamp = json.loads((folder / f"{name}.json").read_text())
            if stamp["generation"] != generation:
                return None
            index = faiss.read_index(str(folder / f"{name}.faiss"))
            owners = np.load(folder / f"{name}.owners.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError, RuntimeError):
            return None
        if index.ntotal != len(owners) or index.ntotal != stamp["vectors"]:
            return None
        return cls(index, owners, stamp["per_image"])


def _empty(kind: str, dim: int, count: int) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
        return index
    nlist = max(1, min(4096, int(4 * np.sqrt(count)), count // 39))  # FAISS wants >= 39 points per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(nlist, 16)
    return index
