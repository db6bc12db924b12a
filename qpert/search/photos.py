"""The photo folder side of an index: which files are photos, whether they changed, how to read them."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError, MissingFileError
from ..terminal import printable

log = logging.getLogger(__name__)

#: What ``qpert index`` picks up (case-insensitive).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: What decoding a file that is not a readable image may raise (Pillow's own kinds included).
EXIF_ORIENTATION = 0x0112
DECODE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


class UnreadablePhotoError(DataError):
    """A file with a photo suffix that does not decode: reported and skipped, never indexed."""


class OutsideFolderError(PermissionError):
    """An opened file that turned out to live outside the photo folder (a link planted or swapped in)."""


@dataclass(frozen=True)
class PhotoFile:
    """A photo as found on disk: its path relative to the folder plus what tells a change cheaply."""

    path: str  # relative, with forward slashes
    size: int
    mtime_ns: int
    ctime_ns: int  # set by the system on every write, rename or utime: tools that keep mtime cannot keep it
    inode: int

    @property
    def stat_key(self) -> tuple[int, int, int, int]:
        """When any of these differ from the catalog's, the file is hashed again."""
        return self.size, self.mtime_ns, self.ctime_ns, self.inode


@dataclass
class FolderScan:
    """The photos found, and what could not be read (relative folder or file path, reason)."""

    photos: list[PhotoFile] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def unreadable_folders(self) -> list[str]:
        return [path for path, _ in self.unreadable if path.endswith("/")]


def scan_photos(root: Path, exclude: Path | None = None) -> FolderScan:
    """Every photo under ``root``, sorted by path; hidden folders and ``exclude`` (the index) are skipped,
    and so are links to files outside ``root`` (the search page serves nothing from outside it).
    A folder or file that cannot be read is reported in ``unreadable`` and the rest is still scanned."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"photo folder {root} does not exist or is not a folder")
    real_root = root.resolve()
    skip = _identity(exclude) if exclude is not None else None
    scan = FolderScan()
    for entry in _walk(root, skip, scan):
        relative = Path(entry.path).relative_to(root).as_posix()
        try:
            if entry.is_symlink() and not Path(os.path.realpath(entry.path)).is_relative_to(real_root):
                log.warning(
                    "skipping %s: a link to %s, outside the photo folder",
                    printable(entry.path),
                    printable(os.path.realpath(entry.path)),
                )
                continue
            st = entry.stat()
        except FileNotFoundError:  # deleted while scanning
            continue
        except OSError as e:
            _unreadable(scan, relative, e)
            continue
        scan.photos.append(PhotoFile(relative, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    scan.photos.sort(key=lambda p: p.path)
    return scan


def _walk(root: Path, skip: tuple[int, int] | None, scan: FolderScan) -> Iterator[os.DirEntry]:
    """Photo files under ``root``, folder by folder without recursion (any depth works); folder links
    are not followed."""
    folders = [str(root)]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as e:
            if folder == str(root):  # nothing to index, and no reason to drop what is indexed
                raise OSError(f"cannot read the photo folder {root} ({e.strerror or e})") from e
            _unreadable(scan, Path(folder).relative_to(root).as_posix() + "/", e)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if skip is None or _identity(entry) != skip:
                        folders.append(entry.path)
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in PHOTO_SUFFIXES:
                    yield entry
            except OSError as e:
                _unreadable(scan, Path(entry.path).relative_to(root).as_posix(), e)


def _identity(place: Union[Path, os.DirEntry]) -> tuple[int, int] | None:
    try:
        st = place.stat(follow_symlinks=False) if isinstance(place, os.DirEntry) else os.stat(place)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unreadable(scan: FolderScan, relative: str, error: OSError) -> None:
    reason = f"unreadable {'folder' if relative.endswith('/') else 'file'} ({error.strerror or error})"
    log.warning("skipping %s: %s", printable(relative), reason)
    scan.unreadable.append((relative, reason))


def read_photo(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their SHA-256, in one read (the indexer decodes the same bytes): a modified
    photo is a new photo, a touched one is not."""
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def file_hash(f: BinaryIO) -> str:
    """SHA-256 of an open file's bytes from where it stands to the end."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def load_photo(path: Path) -> Image.Image:
    """The photo as RGB, turned upright by its EXIF orientation (boxes and display use these pixels)."""
    return decode_photo(path, path)[0]


def decode_photo(
    source: Union[Path, BinaryIO], path: Path, longest_side: Optional[int] = None
) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB pixels of a file or of bytes already read (``path`` names it in errors), and the
    (height, width) of the upright photo itself, read from the same open file.

    With ``longest_side``, a larger JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8, done by the
    decoder itself, several times faster) that keeps its longest side at least that long; the size
    returned is still the photo's, which boxes refer to."""
    try:
        with Image.open(source) as im:
            width, height = im.size
            turned = im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            if longest_side is not None and max(im.size) > longest_side:
                ratio = longest_side / max(im.size)
                im.draft("RGB", (round(width * ratio), round(height * ratio)))
            im.load()
            image = ImageOps.exif_transpose(im).convert("RGB")
    except DECODE_ERRORS as e:
        raise UnreadablePhotoError(f"{path}: not a readable image ({e})") from e
    return image, (width, height) if turned else (height, width)


def open_inside(root: Path, relative: str) -> BinaryIO:
    """``root / relative`` opened for reading, if the opened file is a regular file inside ``root``.

    The check is made on the open descriptor, not on the path: a link swapped in between a check
    and a read cannot make it read a file outside the folder. Raises ``OutsideFolderError``
    (or another ``OSError``) otherwise."""
    fd = os.open(Path(root) / relative, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutsideFolderError(f"{relative} is not a regular file")
        if not _opened_path(fd).is_relative_to(Path(root).resolve()):
            raise OutsideFolderError(f"{relative} leads outside the photo folder")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int) -> Path:
    """The real path of an open file: macOS says it through fcntl, Linux through /proc."""
    if hasattr(fcntl, "F_GETPATH"):
        return Path(os.fsdecode(fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0")))
    return Path(os.readlink(f"/proc/self/fd/{fd}"))
