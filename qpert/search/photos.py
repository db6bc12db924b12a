"""The photo folder side of an index: which files are photos, whether they changed, how to read them."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageOps, UnidentifiedImageError
from ..errors import DataError, MissingFileError

log = logging.getLogger(__name__)

#: What ``qpert index`` picks up (case-insensitive).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class UnreadablePhotoError(DataError):
    """A file with a photo suffix that does not decode: reported and skipped, never indexed."""


@dataclass(frozen=True)
class PhotoFile:
    """A photo as found on disk: its path relative to the folder plus what tells a change cheaply."""

    path: str        # relative, with forward slashes
    size: int
    mtime_ns: int


def scan_photos(root: Path, exclude: Path | None = None) -> list[PhotoFile]:
    """Every photo under ``root``, sorted by path; hidden folders and ``exclude`` (the index) are skipped,
    and so are links to files outside ``root`` (the search page serves nothing from outside it)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"photo folder {root} does not exist or is not a folder")
    skip = exclude.resolve() if exclude is not None else None
    found = []
    for path in _walk(root, skip):
        if not path.resolve().is_relative_to(root.resolve()):
            log.warning("skipping %s: a link to %s, outside the photo folder", path, path.resolve())
            continue
        stat = path.stat()
        found.append(PhotoFile(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(found, key=lambda p: p.path)


def _walk(folder: Path, skip: Path | None) -> Iterator[Path]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if skip is None or path.resolve() != skip:
                    yield from _walk(path, skip)
            elif entry.is_file() and path.suffix.lower() in PHOTO_SUFFIXES:
                yield path


def content_hash(path: Path) -> str:
    """SHA-256 of the file's bytes: a modified photo is a new photo, a touched one is not."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_photo(path: Path) -> Image.Image:
    """The photo as RGB, turned upright by its EXIF orientation (boxes and display use these pixels)."""
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise UnreadablePhotoError(f"{path}: not a readable image ({e})") from e
