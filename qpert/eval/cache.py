"""On-disk feature cache: one safetensors file per (kind, key), written atomically.

A run killed at any point leaves only complete files under their final names (each is
written to a temporary name, flushed, then renamed: ``qpert.atomic``), so a resumed run skips
what is done and never reads a half-written file. A run starting removes the temporaries of
killed runs, never those of another run still writing to the same cache. Keys are content
hashes of everything the value depends on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..atomic import atomic_write, remove_stale_temporaries
from ..errors import CacheError

#: Bumped whenever qpert computes features differently for the same model and inputs (0.2: PIL image
#: processors, BLIP's [ENC]): caches written by another version are never read.
FEATURES_VERSION = 2


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


class FeatureStore:
    """``root/<kind>/<key>.safetensors``; a missing ``root`` means no caching (memory only)."""

    def __init__(self, root: Optional[Path], writer: bool = True):
        """``writer=False`` for readers beside a running writer: they must not remove its temporary files."""
        self.root = Path(root) if root is not None else None
        self._memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        if self.root is not None and writer:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.root, "*/*.tmp*")  # left by killed runs: never read, now removed

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        if self.root is None:
            return (kind, key) in self._memory
        return self._path(kind, key).is_file()

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        if self.root is None:
            return self._memory[(kind, key)]
        path = self._path(kind, key)
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:  # damaged outside our control: drop it, recompute
            path.unlink(missing_ok=True)
            raise CacheError(
                f"cache file {path} was unreadable ({e}) and has been removed: run again to recompute it"
            ) from e

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.root is None:
            self._memory[(kind, key)] = tensors
            return
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(save(tensors))
