"""The index's metadata in SQLite: one row per indexed photo, the skipped files, and a generation.

SQLite is the index's source of truth. Every update is one transaction, so a crash or Ctrl-C
leaves the previous catalog whole; the FAISS files are derived from it and rebuilt when their
generation does not match (``qpert.search.vectors``).
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import ConfigError
from .detectors import Detections

SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,      -- relative to the photo folder, forward slashes
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    detections TEXT NOT NULL,       -- JSON list of {box, score, label}
    settings TEXT NOT NULL,         -- key of the model + detector + Q-Pert settings the vectors belong to
    baseline BLOB NOT NULL,         -- float32 (Q, D) ITC image embeddings without Q-Pert
    qpert BLOB NOT NULL             -- float32 (Q, D) with Q-Pert on the detections
);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class PhotoRecord:
    """What the catalog knows of one photo besides its vectors."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int
    height: int
    detections: Detections
    settings: str


@dataclass
class PhotoRow(PhotoRecord):
    """An indexed photo, as read back."""

    id: int


@dataclass
class NewPhoto(PhotoRecord):
    """What the indexer found for one photo, ready to be written."""

    baseline: np.ndarray   # float32 (Q, D) ITC image embeddings without Q-Pert
    qpert: np.ndarray      # and with Q-Pert on the detections


class Catalog:
    """``catalog.sqlite`` of an index folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    @property
    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def photos(self) -> dict[str, PhotoRow]:
        rows = self.db.execute("SELECT id, path, size, mtime_ns, sha256, width, height, detections, settings "
                               "FROM photos ORDER BY id").fetchall()
        return {r[1]: PhotoRow(*r[1:7], Detections.from_json(json.loads(r[7])), r[8], id=r[0]) for r in rows}

    def skipped(self) -> dict[str, tuple[int, int, str]]:
        return {p: (s, m, why) for p, s, m, why in self.db.execute("SELECT path, size, mtime_ns, reason FROM skipped")}

    def vectors(self, variant: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vectors (n, Q, D)) of every photo, ``variant`` "baseline" or "qpert"."""
        if variant not in ("baseline", "qpert"):
            raise ConfigError(f"unknown vector variant {variant!r}")
        ids, blobs = [], []
        for photo_id, blob in self.db.execute(f"SELECT id, {variant} FROM photos ORDER BY id"):
            ids.append(photo_id)
            blobs.append(blob)
        shape = self.vector_shape()
        if not ids or shape is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 1, 1), dtype=np.float32)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), *shape)
        return np.array(ids, dtype=np.int64), vecs

    def vector_shape(self) -> Optional[tuple[int, int]]:
        row = self.db.execute("SELECT value FROM meta WHERE key='vector_shape'").fetchone()
        return tuple(json.loads(row[0])) if row else None

    @contextmanager
    def update(self) -> Iterator["CatalogUpdate"]:
        """One transaction: everything inside lands together, or (on any exception) nothing does."""
        with self.db:  # commits on success, rolls back on an exception
            update = CatalogUpdate(self.db)
            yield update
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(self.generation + 1),))


class CatalogUpdate:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def put(self, photo: NewPhoto) -> None:
        shape = list(photo.baseline.shape)
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('vector_shape', ?)", (json.dumps(shape),))
        self.db.execute("DELETE FROM skipped WHERE path=?", (photo.path,))
        self.db.execute(
            "INSERT INTO photos (path, size, mtime_ns, sha256, width, height, detections, settings, baseline, qpert) "
            "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
            "mtime_ns=excluded.mtime_ns, sha256=excluded.sha256, width=excluded.width, height=excluded.height, "
            "detections=excluded.detections, settings=excluded.settings, baseline=excluded.baseline, "
            "qpert=excluded.qpert",
            (photo.path, photo.size, photo.mtime_ns, photo.sha256, photo.width, photo.height,
             json.dumps(photo.detections.to_json()), photo.settings, _blob(photo.baseline), _blob(photo.qpert)))

    def touch(self, path: str, size: int, mtime_ns: int) -> None:
        """Same content, new file stat (copied, touched): nothing to recompute."""
        self.db.execute("UPDATE photos SET size=?, mtime_ns=? WHERE path=?", (size, mtime_ns, path))

    def skip(self, path: str, size: int, mtime_ns: int, reason: str) -> None:
        self.db.execute("DELETE FROM photos WHERE path=?", (path,))
        self.db.execute("INSERT OR REPLACE INTO skipped VALUES (?,?,?,?)", (path, size, mtime_ns, reason))

    def remove(self, path: str) -> None:
        self.db.execute("DELETE FROM photos WHERE path=?", (path,))
        self.db.execute("DELETE FROM skipped WHERE path=?", (path,))


def _blob(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()
