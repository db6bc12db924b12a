"""On-disk feature cache: one safetensors file per (kind, key), written atomically and checksummed.

A run killed at any point leaves only complete files under their final names (each is
written to a temporary name, flushed, then renamed: ``qpert.atomic``), so a resumed run skips
what is done and never reads a half-written file. A run starting removes the temporaries of
killed runs, never those of another run still writing to the same cache. Keys are content
hashes of everything the value depends on.

Every file carries the SHA-256 of its tensors in its metadata, checked the first time a process
reads it: a file damaged since (a bad sector, a partial copy) is a miss, logged once, removed and
recomputed, never data. Files without a checksum (written before qpert checked them) are misses
too, recomputed with one warning per store. Readers (``writer=False``) never write: they leave a
damaged file where it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..atomic import atomic_write, remove_stale_temporaries
from ..errors import CacheError

log = logging.getLogger(__name__)

#: Bumped whenever qpert computes features differently for the same model and inputs (0.2: PIL image
#: processors, BLIP's [ENC]): caches written by another version are never read.
FEATURES_VERSION = 2

#: The safetensors metadata entry holding a file's :func:`checksum`.
CHECKSUM = "qpert-sha256"


def model_fingerprint(model: torch.nn.Module) -> Any:
    """What identifies a model's features in a cache besides its name: the transformers config,
    or (OpenCLIP, which has none) the name and shape of every weight."""
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        return [FEATURES_VERSION, config.to_dict()]
    return [FEATURES_VERSION, type(model).__name__] + [[name, list(t.shape)] for name, t in model.state_dict().items()]


def content_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (numbers, strings, lists, dicts)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of contiguous CPU tensors, whatever their order
    in the file (SHA-256: the fastest of hashlib's on CPUs with SHA instructions)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class FeatureStore:
    """``root/<kind>/<key>.safetensors``; a missing ``root`` means no caching (memory only)."""

    def __init__(self, root: Optional[Path], writer: bool = True):
        """``writer=False`` for readers beside a running writer: they must not remove its temporary files
        (and need no write access)."""
        self.root = Path(root) if root is not None else None
        self._memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.writer = writer
        self._verified: dict[Path, tuple[int, ...]] = {}  # file -> identity when its checksum last matched
        self._told_unchecked = False
        if self.root is not None and writer:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.root, "*/*.tmp*")  # left by killed runs: never read, now removed

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        """Whether a sound entry is stored; a damaged one is a miss (logged and removed)."""
        if self.root is None:
            return (kind, key) in self._memory
        path = self._path(kind, key)
        try:
            if self._verified.get(path) == _identity(path):
                return True
        except FileNotFoundError:
            return False
        return self._read(path) is not None

    def get(self, kind: str, key: str) -> Optional[dict[str, torch.Tensor]]:
        """The stored tensors, or None when the entry is missing or damaged: one read where ``has`` then
        ``load`` would read an unverified file twice."""
        if self.root is None:
            return self._memory.get((kind, key))
        return self._read(self._path(kind, key))

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors; ``CacheError`` (a ``KeyError``) when the entry is missing or damaged."""
        if self.root is None:
            return self._memory[(kind, key)]
        path = self._path(kind, key)
        tensors = self._read(path)
        if tensors is None:
            raise CacheError(f"cache file {path} is missing or was damaged: run again to recompute it")
        return tensors

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.root is None:
            self._memory[(kind, key)] = tensors
            return
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(save(tensors, metadata={CHECKSUM: checksum(tensors)}))
        self._verified[path] = _identity(path)

    def _read(self, path: Path) -> Optional[dict[str, torch.Tensor]]:
        """The file's tensors if its checksum matches (checked once per process and file version), else
        None: missing, or damaged (then logged and removed, so that it is recomputed)."""
        try:
            identity = _identity(path)
            with safe_open(path, "pt") as f:  # memory-mapped: the hash reads the bytes once
                stored = (f.metadata() or {}).get(CHECKSUM)
                names = f.keys()
                tensors = {name: f.get_tensor(name) for name in names}
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError) as e:
            problem = f"unreadable: {e}"
        else:
            if self._verified.get(path) == identity or (stored is not None and stored == checksum(tensors)):
                self._verified[path] = identity
                return tensors
            if stored is None:  # written by an older qpert: recomputed, and said once
                if not self._told_unchecked:
                    log.warning("cache files under %s have no checksum (older qpert): recomputing them", self.root)
                    self._told_unchecked = True
                return None
            problem = "checksum mismatch"
        log.warning("cache file %s is damaged (%s): recomputing it", path, problem)
        self._verified.pop(path, None)
        if self.writer:
            with contextlib.suppress(OSError):  # read-only storage: it stays, and is never read as data
                path.unlink(missing_ok=True)
        return None


def _identity(path: Path) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
