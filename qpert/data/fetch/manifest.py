"""``DATA/qpert-data.json``: per dataset, every fetched file's source, size and SHA-256.

``qpert data fetch`` skips a listed file whose size is unchanged (without hashing it again), so a
re-run transfers nothing; ``qpert data verify`` hashes every listed file, here or on another
machine the folder was copied to. Paths are relative to the data root, so the folder can move.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ...atomic import atomic_write
from ..layout import DataLayout, PathLike
from .catalog import dataset_names
from .errors import VerifyError

FORMAT = 1
#: Seconds between two saves while many files are written (a Ctrl-C keeps what was recorded).
SAVE_EVERY = 5.0


@dataclass(frozen=True)
class Entry:
    """One fetched file: where its bytes came from (``member`` of the archive at ``url``), size and SHA-256."""

    url: str
    size: int
    sha256: str
    member: Optional[str] = None


class Manifest:
    """The manifest of one data root, safe to update from several threads."""

    def __init__(self, layout: DataLayout, datasets: Optional[dict[str, dict[str, Entry]]] = None) -> None:
        self.layout = layout
        self.datasets: dict[str, dict[str, Entry]] = datasets or {}
        self._lock = threading.Lock()
        self._saved = time.monotonic()
        self.dirty = False  # recorded since the last save

    @classmethod
    def load(cls, layout: DataLayout, *, required: bool = False) -> Manifest:
        """The manifest, or an empty one when there is none (or, unless ``required``, it is damaged:
        fetching then checks the files in place again).

        Raises:
            VerifyError: ``required`` and the manifest is missing or damaged.
        """
        path = layout.manifest
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            datasets = {
                name: {rel: Entry(**entry) for rel, entry in files.items()} for name, files in data["datasets"].items()
            }
        except FileNotFoundError:
            if required:
                raise VerifyError(f"no manifest {path}: `qpert data fetch` writes it") from None
            return cls(layout)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            if required:
                raise VerifyError(f"{path}: damaged ({error}); run `qpert data fetch` again to rebuild it") from None
            return cls(layout)
        return cls(layout, datasets)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.layout.root).as_posix()

    def current(self, dataset: str, path: Path, rehash: bool = False) -> bool:
        """Whether ``path`` is listed with its present size (and, with ``rehash``, its SHA-256)."""
        entry = self.datasets.get(dataset, {}).get(self.rel(path))
        try:
            if entry is None or path.stat().st_size != entry.size:
                return False
        except OSError:
            return False
        return not rehash or sha256_file(path) == entry.sha256

    def record(self, dataset: str, path: Path, entry: Entry) -> None:
        with self._lock:
            self.datasets.setdefault(dataset, {})[self.rel(path)] = entry
            self.dirty = True

    def listed(self, dataset: str, path: Path) -> bool:
        return self.rel(path) in self.datasets.get(dataset, {})

    def save(self, *, if_due: bool = False) -> None:
        """Write what was recorded, atomically (with ``if_due``, only when the last save is SAVE_EVERY old)."""
        if not self.dirty or (if_due and time.monotonic() - self._saved < SAVE_EVERY):
            return
        with self._lock:
            data = {
                "format": FORMAT,
                "datasets": {
                    name: {rel: _compact(entry) for rel, entry in sorted(files.items())}
                    for name, files in sorted(self.datasets.items())
                },
            }
            self.layout.root.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.layout.manifest) as f:
                f.write(json.dumps(data, indent=1).encode())
            self._saved = time.monotonic()
            self.dirty = False


def _compact(entry: Entry) -> dict:
    return {k: v for k, v in asdict(entry).items() if v is not None}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class VerifyReport:
    """What ``verify_data`` found: files hashed, and those missing or changed (paths relative to the root)."""

    root: Path
    datasets: list[str]
    checked: int = 0
    bytes: int = 0
    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    not_fetched: list[str] = field(default_factory=list)  # datasets asked for that the manifest does not list

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.not_fetched)

    def summary(self) -> str:
        return (
            f"verified {self.checked} files ({self.bytes / 1e6:.1f} MB) of {', '.join(self.datasets) or 'nothing'} "
            f"against {self.root / DataLayout(self.root).manifest.name}"
        )

    def check(self) -> VerifyReport:
        """This report, or a VerifyError naming what is wrong and how to repair it."""
        if self.ok:
            return self
        problems = [f"{name}: not fetched" for name in self.not_fetched]
        problems += [f"changed {rel}" for rel in self.changed] + [f"missing {rel}" for rel in self.missing]
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        names = " ".join(self.datasets)
        raise VerifyError(
            f"{len(problems)} problems in {self.root}: {shown} (repair: qpert data fetch {names} --rehash "
            f"--data-root {self.root})"
        )


def verify_data(data_root: PathLike, names: Optional[Iterable[str]] = None, workers: int = 4) -> VerifyReport:
    """Hash every file the manifest lists (for ``names``, default all it lists) and compare.

    Returns the report; ``report.check()`` raises when anything is missing or changed.

    Raises:
        VerifyError: the data root has no manifest, or a damaged one.
        ConfigError: an unknown dataset name.
    """
    layout = DataLayout(data_root)
    manifest = Manifest.load(layout, required=True)
    wanted = dataset_names(list(names)) if names else sorted(manifest.datasets)
    report = VerifyReport(layout.root, wanted, not_fetched=[n for n in wanted if n not in manifest.datasets])
    entries = [(rel, entry) for name in wanted for rel, entry in sorted(manifest.datasets.get(name, {}).items())]

    def verdict(item: tuple[str, Entry]) -> Optional[str]:
        rel, entry = item
        path = layout.root / rel
        if not path.is_file():
            return "missing"
        if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            return "changed"
        return None

    with ThreadPoolExecutor(workers) as pool:
        for (rel, entry), problem in zip(entries, pool.map(verdict, entries)):
            if problem is None:
                report.checked += 1
                report.bytes += entry.size
            else:
                getattr(report, problem).append(rel)
    return report
