"""The index's metadata in SQLite: one row per indexed photo, the skipped files, a generation and
the settings the vectors were made with.

SQLite is the index's source of truth. Every update is one transaction, so a crash or Ctrl-C
leaves the previous catalog whole; the FAISS files are derived from it and rebuilt when their
generation does not match (``qpert.search.vectors``). The database is in WAL mode: searches
and the search page read the last committed catalog while ``qpert index`` writes the next one.
Searching needs no write access: on read-only storage, where SQLite cannot create the WAL's
shared-memory file, the catalog is opened as immutable (nothing can change it there).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import (
    ConfigError,
    DiskFullError,
    IndexBusyError,
    IndexDamagedError,
    IndexReadOnlyError,
    MissingFileError,
)
from .detectors import Detections

#: What the system says when a folder or file cannot be written (permissions, a read-only mount).
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)

#: How long a reader or writer waits for a lock (SQLite retries meanwhile) before saying so.
BUSY_SECONDS = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,      -- relative to the photo folder, forward slashes (a BLOB if not UTF-8)
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    detections TEXT NOT NULL,       -- JSON list of {box, score, label}
    settings TEXT NOT NULL,         -- key of the model + detector + Q-Pert settings the vectors belong to
    baseline BLOB NOT NULL,         -- float32 (Q, D) ITC image embeddings without Q-Pert
    qpert BLOB NOT NULL,            -- float32 (Q, D) with Q-Pert on the detections
    ctime_ns INTEGER NOT NULL DEFAULT 0,
    inode INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: Columns added after the first release; older catalogs get them (zero: their photos are hashed once more).
ADDED_COLUMNS = {"ctime_ns": "INTEGER NOT NULL DEFAULT 0", "inode": "INTEGER NOT NULL DEFAULT 0"}


@dataclass
class PhotoRecord:
    """What the catalog knows of one photo besides its vectors."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha256: str
    width: int
    height: int
    detections: Detections
    settings: str

    @property
    def stat_key(self) -> tuple[int, int, int, int]:
        return self.size, self.mtime_ns, self.ctime_ns, self.inode


@dataclass
class PhotoRow(PhotoRecord):
    """An indexed photo, as read back."""

    id: int


@dataclass
class NewPhoto(PhotoRecord):
    """What the indexer found for one photo, ready to be written."""

    baseline: np.ndarray  # float32 (Q, D) ITC image embeddings without Q-Pert
    qpert: np.ndarray  # and with Q-Pert on the detections


class Catalog:
    """``catalog.sqlite`` of an index folder; ``readonly`` for searching (it then never writes)."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        with self._errors():
            if readonly:
                if not self.path.is_file():
                    raise MissingFileError(f"{self.path} is missing: run `qpert index` to build the index")
                self.db = self._open_readonly()
            else:
                self.db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.executescript(SCHEMA)
                self._add_columns()
                self.db.commit()
            self._columns = {r[1] for r in self.db.execute("PRAGMA table_info(photos)")}

    def _open_readonly(self) -> sqlite3.Connection:
        """``mode=ro`` follows a live writer through its WAL; where SQLite cannot create the WAL's files
        (read-only storage) and there is no WAL to follow, the file cannot change: ``immutable=1`` reads it
        without locks or files beside it."""
        uri = self.path.absolute().as_uri()
        db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=BUSY_SECONDS, check_same_thread=False)
        try:
            db.execute("PRAGMA schema_version").fetchone()  # opens the WAL, if it can
            return db
        except sqlite3.OperationalError as e:
            db.close()
            cannot_write = "readonly" in str(e) or "unable to open" in str(e)  # EACCES / EROFS, or EPERM
            if not cannot_write or self.path.with_name(self.path.name + "-wal").exists():
                raise
        return sqlite3.connect(uri + "?immutable=1", uri=True, check_same_thread=False)

    def _add_columns(self) -> None:
        present = {r[1] for r in self.db.execute("PRAGMA table_info(photos)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in present:
                self.db.execute(f"ALTER TABLE photos ADD COLUMN {name} {kind}")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as the user's: a lock held too long, or a file that is not a catalog."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if "disk is full" in str(e):
                raise DiskFullError(f"no space left on the device while writing the index catalog {self.path}") from e
            if "readonly" in str(e) and not self.readonly:
                raise read_only_index(self.path.parent, "the catalog cannot be written") from e
            if "locked" in str(e) or "busy" in str(e):
                raise IndexBusyError(
                    f"the index catalog {self.path} stayed locked by another process for "
                    f"{BUSY_SECONDS:g} s; try again when it has finished"
                ) from e
            raise IndexDamagedError(f"cannot use the index catalog {self.path} ({e})") from e
        except sqlite3.DatabaseError as e:
            raise IndexDamagedError(
                f"the index catalog {self.path} is damaged ({e}); delete the index folder and run `qpert index` again"
            ) from e

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def snapshot(self) -> Iterator[Catalog]:
        """Reads inside see one committed catalog, whatever ``qpert index`` commits meanwhile."""
        with self._errors():
            self.db.execute("BEGIN")
        try:
            yield self
        finally:
            self.db.rollback()

    @property
    def generation(self) -> int:
        with self._errors():
            row = self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def photos(self) -> dict[str, PhotoRow]:
        stat = ", ".join(c if c in self._columns else "0" for c in ADDED_COLUMNS)
        with self._errors():
            rows = self.db.execute(
                f"SELECT id, path, size, mtime_ns, {stat}, sha256, width, height, detections, "
                "settings FROM photos ORDER BY id"
            ).fetchall()
        return {
            _path(r[1]): PhotoRow(_path(r[1]), *r[2:9], Detections.from_json(json.loads(r[9])), r[10], id=r[0])
            for r in rows
        }

    def skipped(self) -> dict[str, tuple[int, int, str]]:
        with self._errors():
            return {
                _path(p): (s, m, why)
                for p, s, m, why in self.db.execute("SELECT path, size, mtime_ns, reason FROM skipped")
            }

    def vectors(self, variant: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vectors (n, Q, D)) of every photo, ``variant`` "baseline" or "qpert"."""
        if variant not in ("baseline", "qpert"):
            raise ConfigError(f"unknown vector variant {variant!r}")
        ids, blobs = [], []
        with self._errors():
            for photo_id, blob in self.db.execute(f"SELECT id, {variant} FROM photos ORDER BY id"):
                ids.append(photo_id)
                blobs.append(blob)
        shape = self.vector_shape()
        if not ids or shape is None:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 1, 1), dtype=np.float32)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), *shape)
        return np.array(ids, dtype=np.int64), vecs

    def settings(self) -> Optional[dict]:
        """The settings (``IndexSettings.to_json``) of the last update, committed with its vectors."""
        with self._errors():
            row = self.db.execute("SELECT value FROM meta WHERE key='settings'").fetchone()
        return json.loads(row[0]) if row else None

    def vector_shape(self) -> Optional[tuple[int, int]]:
        with self._errors():
            row = self.db.execute("SELECT value FROM meta WHERE key='vector_shape'").fetchone()
        return tuple(json.loads(row[0])) if row else None

    @contextmanager
    def update(self) -> Iterator[CatalogUpdate]:
        """One transaction: everything inside lands together, or (on any exception) nothing does."""
        with self._errors(), self.db:  # commits on success, rolls back on an exception
            update = CatalogUpdate(self.db)
            yield update
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(self.generation + 1),))


class CatalogUpdate:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def put(self, photo: NewPhoto) -> None:
        shape = list(photo.baseline.shape)
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('vector_shape', ?)", (json.dumps(shape),))
        self.db.execute("DELETE FROM skipped WHERE path=?", (_stored(photo.path),))
        self.db.execute(
            "INSERT INTO photos (path, size, mtime_ns, ctime_ns, inode, sha256, width, height, detections, settings, "
            "baseline, qpert) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
            "mtime_ns=excluded.mtime_ns, ctime_ns=excluded.ctime_ns, inode=excluded.inode, sha256=excluded.sha256, "
            "width=excluded.width, height=excluded.height, detections=excluded.detections, "
            "settings=excluded.settings, baseline=excluded.baseline, qpert=excluded.qpert",
            (
                _stored(photo.path),
                photo.size,
                photo.mtime_ns,
                photo.ctime_ns,
                photo.inode,
                photo.sha256,
                photo.width,
                photo.height,
                json.dumps(photo.detections.to_json()),
                photo.settings,
                _blob(photo.baseline),
                _blob(photo.qpert),
            ),
        )

    def set_settings(self, settings: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (json.dumps(settings),))

    def touch(self, path: str, stat_key: tuple[int, int, int, int]) -> None:
        """Same content, new file stat (copied, touched): nothing to recompute."""
        self.db.execute(
            "UPDATE photos SET size=?, mtime_ns=?, ctime_ns=?, inode=? WHERE path=?", (*stat_key, _stored(path))
        )

    def skip(self, path: str, size: int, mtime_ns: int, reason: str) -> None:
        self.db.execute("DELETE FROM photos WHERE path=?", (_stored(path),))
        self.db.execute("INSERT OR REPLACE INTO skipped VALUES (?,?,?,?)", (_stored(path), size, mtime_ns, reason))

    def remove(self, path: str) -> None:
        self.db.execute("DELETE FROM photos WHERE path=?", (_stored(path),))
        self.db.execute("DELETE FROM skipped WHERE path=?", (_stored(path),))


def read_only_index(index_dir: Path, reason: str) -> IndexReadOnlyError:
    """What ``qpert index`` says on an index it may not write: searching it still works."""
    return IndexReadOnlyError(
        f"the index {index_dir} is read-only ({reason}): `qpert index` cannot update it; `qpert search` and "
        "`qpert serve` read it as it is, or index into a writable folder with --index"
    )


def _stored(path: str) -> Union[str, bytes]:
    """A relative path as SQLite keeps it: text, or the file name's raw bytes when they are not
    UTF-8 (Python holds those as lone surrogates, which no SQLite text can)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def _path(stored: Union[str, bytes]) -> str:
    return os.fsdecode(stored) if isinstance(stored, bytes) else stored


def _blob(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=np.float32).tobytes()
