"""The members of an archive, read one by one from wherever it lies, without the rest of it.

A zip on a server that answers range requests is read in place: the standard library's
``zipfile`` parses it through :class:`RemoteFile`, a seekable file object whose reads are range
requests, so only the end record, the central directory and the needed members cross the network
(one request each: a member's bytes are fetched in one range before ``zipfile`` reads them from
memory, and ``zipfile`` checks each member's CRC-32). A local zip is read in place the same way, and a
folder of images (``--flickr30k-images DIR``) serves its files as members.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

from .errors import FetchError, WrongBytes
from .transfer import Http, Location, Progress

#: Bytes read past a member's data as a central directory predicts it: a local header's extra field
#: may be longer than the central one (a longer one costs one more request, not an error).
SLACK = 256
#: The end of a zip fetched in one request at opening: the end records, a short comment and, in a small
#: zip, the directory (a longer comment or a larger directory costs one more request).
TAIL = 1 << 13


@dataclass(frozen=True)
class Member:
    """One file of an archive: its name there, its size unpacked, and what reading it transfers."""

    name: str
    size: int
    packed: int
    crc: Optional[int] = None  # CRC-32 from the zip's directory (None for a folder's files)
    info: Optional[zipfile.ZipInfo] = None


class RemoteFile(io.RawIOBase):
    """A read-only, seekable view of a file on a server that answers range requests.

    Reads inside a prefetched span come from memory; others are one range request each.
    """

    def __init__(self, http: Http, location: Location, size: int) -> None:
        super().__init__()
        self.http, self.location, self.size = http, location, size
        self._pos = 0
        self._spans: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(f"seek before the start of {self.location.where}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        data = self._read(self._pos, min(self._pos + len(buffer), self.size))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        data = self._read(self._pos, self.size)
        self._pos += len(data)
        return data

    def prefetch(self, start: int, end: int, progress: Optional[Progress] = None) -> None:
        """Fetch bytes ``[start, end)`` in one request; reads inside them come from memory until released."""
        data = self.http.read(self.location, start, min(end, self.size), progress)
        with self._lock:
            self._spans[start] = data

    def release(self, start: int) -> None:
        with self._lock:
            self._spans.pop(start, None)

    def _read(self, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        head = b""
        with self._lock:
            for first, data in self._spans.items():
                if first <= start < first + len(data):
                    head = data[start - first : end - first]
                    break
        if start + len(head) < end:
            head += self.http.read(self.location, start + len(head), end)
        return head


class Archive:
    """Members read one at a time, from any thread; ``find`` matches them by their last path components,
    so an archive with or without a top folder (``Annotations/1.xml`` or ``x/Annotations/1.xml``) serves."""

    def __init__(self, members: list[Member], where: str) -> None:
        self.members = members
        self.where = where

    def find(self, keys: Iterable[str], depth: int) -> dict[str, Member]:
        """The member whose last ``depth`` path components are each key (the first, if several)."""
        index: dict[str, Member] = {}
        for member in self.members:
            parts = member.name.split("/")
            if len(parts) >= depth and not member.name.startswith("__MACOSX/"):
                index.setdefault("/".join(parts[-depth:]), member)
        return {key: index[key] for key in keys if key in index}

    def read(self, member: Member, progress: Optional[Progress] = None) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release by default."""


class ZipArchive(Archive):
    """A zip read in place: a local file, or a :class:`RemoteFile`."""

    def __init__(self, file: BinaryIO, where: str) -> None:
        self.file = file
        self.remote = file if isinstance(file, RemoteFile) else None
        if self.remote is not None:  # the end record and, in small zips, the directory: one request
            self.remote.prefetch(max(0, self.remote.size - TAIL), self.remote.size)
        try:
            self.zip = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError) as error:
            file.close()
            raise WrongBytes(f"{where}: not a readable zip ({error})") from None
        finally:
            if self.remote is not None:
                self.remote.release(max(0, self.remote.size - TAIL))
        self._lock = threading.Lock()  # zipfile shares one file position among its readers
        members = [
            Member(i.filename, i.file_size, i.compress_size, i.CRC, i) for i in self.zip.infolist() if not i.is_dir()
        ]
        super().__init__(members, where)

    def read(self, member: Member, progress: Optional[Progress] = None) -> bytes:
        """The member's bytes, CRC-checked by zipfile (WrongBytes when they differ or do not decompress)."""
        info = member.info
        start = info.header_offset
        if self.remote is not None:
            end = start + zipfile.sizeFileHeader + len(info.orig_filename.encode()) + len(info.extra)
            self.remote.prefetch(start, end + info.compress_size + SLACK, progress)
        try:
            with self._lock, self.zip.open(info) as f:
                data = f.read()
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise WrongBytes(f"{member.name} in {self.where}: {error}") from None
        finally:
            if self.remote is not None:
                self.remote.release(start)
        if self.remote is None and progress is not None:
            progress(member.packed)
        return data

    def close(self) -> None:
        self.zip.close()
        self.file.close()


class FolderArchive(Archive):
    """A folder's files (and its subfolders' files, one level down) served as members."""

    def __init__(self, folder: Path) -> None:
        files = [p for p in (*folder.glob("*"), *folder.glob("*/*")) if p.is_file()]
        members = [Member(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_size) for p in files]
        super().__init__(members, str(folder))
        self.folder = folder

    def read(self, member: Member, progress: Optional[Progress] = None) -> bytes:
        data = (self.folder / member.name).read_bytes()
        if progress is not None:
            progress(len(data))
        return data


def open_local(location: Location) -> Archive:
    """A local folder or zip, read in place.

    Raises:
        FetchError: the path is neither a folder nor a readable zip.
    """
    path = location.path
    if path.is_dir():
        return FolderArchive(path)
    if not path.is_file():
        raise FetchError(f"{path}: no such file or folder (expected {location.source.file} or a folder)")
    return ZipArchive(open(path, "rb"), str(path))
