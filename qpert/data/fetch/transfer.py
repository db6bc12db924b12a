"""Where a source's bytes come from (origin, Hugging Face Hub, mirror) and resumable HTTP transfers.

Every request goes through one :class:`Http` session: retries on connection and server errors,
timeouts, ``Accept-Encoding: identity`` (byte offsets must be those of the file), and errors that
name the URL and the way around it. A transfer that drops mid-body resumes with a ``Range``
request from the byte it reached; a server that ignores ranges is read from the start again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ...atomic import naming_a_full_disk
from .catalog import Source
from .errors import FetchError, SourceMissing

#: The environment variable that sets ``--mirror``.
MIRROR_ENV = "QPERT_DATA_MIRROR"
CHUNK = 1 << 16
#: Mid-body drops in a row (without a byte of progress between them) before a transfer gives up.
DROPS = 5
TIMEOUT = (10, 60)  # seconds to connect, and between two reads

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Location:
    """Where one source is read from: a local file (``path``) or an HTTP(S) URL (``where``)."""

    source: Source
    where: str  # the URL, or the local path: what messages and the manifest show
    path: Optional[Path] = None
    headers: dict[str, str] = field(default_factory=dict)
    #: What a user without a network does instead, for the error that says it cannot be reached.
    manual: str = ""

    @property
    def is_local(self) -> bool:
        return self.path is not None


class Locator:
    """Where each source is read from: an override file (``--flickr30k-images``), else ``MIRROR/<file>``,
    else its URL (the catalogue's, maybe overridden), else the Hugging Face Hub."""

    def __init__(self, mirror: Optional[str] = None, overrides: Optional[dict[str, Path]] = None) -> None:
        mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
        self.overrides = overrides or {}
        self.mirror_url: Optional[str] = None
        self.mirror_dir: Optional[Path] = None
        if mirror is not None and urlsplit(mirror).scheme in ("http", "https"):
            self.mirror_url = mirror.rstrip("/") + "/"
        elif mirror is not None:
            folder = Path(mirror.removeprefix("file://")).expanduser()
            if not folder.is_dir():
                raise FetchError(f"--mirror {mirror}: no such folder (give a folder or an http(s):// URL)")
            self.mirror_dir = folder

    def locate(self, source: Source, dest: Optional[Path] = None) -> Location:
        """Raises SourceMissing when the source has no copy here or anywhere public."""
        put = f" or put it at {dest} yourself" if dest is not None else ""
        if source.file in self.overrides:
            return Location(source, str(self.overrides[source.file]), path=self.overrides[source.file])
        if self.mirror_dir is not None:
            path = self.mirror_dir / source.file
            if not path.is_file():
                raise SourceMissing(f"the mirror {self.mirror_dir} has no {source.file}: copy it there{put}")
            return Location(source, str(path), path=path)
        manual = f"download {source.file} elsewhere and pass --mirror FOLDER holding it{put}"
        if self.mirror_url is not None:
            return Location(source, self.mirror_url + quote(source.file), manual=manual)
        if source.url is not None:
            return Location(source, source.url, manual=manual)
        if source.hub is not None:
            from huggingface_hub import hf_hub_url
            from huggingface_hub.utils import build_hf_headers

            repo, file = source.hub
            endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
            url = hf_hub_url(repo, file, repo_type="dataset", endpoint=endpoint)
            return Location(source, url, headers=dict(build_hf_headers()), manual=manual)
        raise SourceMissing(f"{source.file} has no public download: pass --mirror FOLDER holding it{put}")


@dataclass(frozen=True)
class Remote:
    """What a server says about a file: its size and whether it answers range requests."""

    size: Optional[int]
    ranges: bool


class Http:
    """The session every transfer shares (``workers`` connections per host), and what it received."""

    def __init__(self, workers: int = 8) -> None:
        self.session = requests.Session()
        retry = Retry(
            total=4, connect=2, read=2, status=3, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504)
        )
        adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=workers)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Accept-Encoding"] = "identity"
        self._resolved: dict[str, str] = {}  # a URL -> where its redirects led (a CDN's signed URL)
        self._lock = threading.Lock()
        self.received = 0

    def probe(self, location: Location) -> Remote:
        """Size and range support, from a one-byte range request (the 206 is the proof, not a header)."""
        with self._get(location, {"Range": "bytes=0-0"}) as response:
            if response.status_code == 206:
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                return Remote(int(total) if total.isdigit() else None, True)
            length = response.headers.get("Content-Length", "")
            return Remote(int(length) if length.isdigit() else None, False)

    def stream(
        self,
        location: Location,
        sink: Callable[[bytes], None],
        start: int = 0,
        end: Optional[int] = None,
        progress: Optional[Progress] = None,
    ) -> None:
        """Bytes ``[start, end)`` of the file (``end`` None: to its end) to ``sink``, in order, each once.

        A drop mid-body asks again for the rest only; a server that answers 200 instead of 206 is
        read from the start and the bytes before the wanted ones are skipped.
        """
        pos, drops = start, 0
        while end is None or pos < end:
            headers = {"Range": f"bytes={pos}-{'' if end is None else end - 1}"} if pos or end is not None else {}
            response = self._get(location, headers)
            try:
                skip = pos if response.status_code == 200 else 0
                if response.status_code == 206 and not response.headers.get("Content-Range", "").startswith(
                    f"bytes {pos}-"
                ):
                    raise FetchError(f"{location.where}: the server answered another range than bytes {pos}-")
                while end is None or pos < end:
                    try:  # the raw stream: a drop keeps every byte received before it
                        chunk = response.raw.read(CHUNK, decode_content=False)
                    except (urllib3.exceptions.HTTPError, OSError) as error:
                        raise _Dropped(str(error)) from None
                    if not chunk:
                        if end is None:
                            return
                        raise _Dropped("the body ended early")
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut : cut + (len(chunk) if end is None else end - pos)], skip - cut
                    if chunk:
                        sink(chunk)
                        pos += len(chunk)
                        drops = 0
                        self._count(len(chunk))
                        if progress is not None:
                            progress(len(chunk))
            except _Dropped as error:
                drops += 1
                if drops > DROPS:
                    raise FetchError(
                        f"{location.where}: the connection kept dropping ({error}); run the same command "
                        "again to resume"
                    ) from None
                time.sleep(min(0.1 * 2**drops, 5.0))
            finally:
                response.close()

    def read(
        self, location: Location, start: int = 0, end: Optional[int] = None, progress: Optional[Progress] = None
    ) -> bytes:
        """Bytes ``[start, end)`` into memory (a small file, a zip's directory or one member)."""
        if location.is_local:
            with open(location.path, "rb") as f:
                f.seek(start)
                return f.read(-1 if end is None else end - start)
        parts: list[bytes] = []
        self.stream(location, parts.append, start, end, progress)
        return b"".join(parts)

    def download(
        self, location: Location, part: Path, size: Optional[int] = None, progress: Optional[Progress] = None
    ) -> None:
        """The whole file (``size`` bytes, when known) into ``part``, after what an interrupted run left there.

        Raises:
            FetchError: another process is writing ``part``, or the transfer cannot complete.
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        with naming_a_full_disk(part), open(part, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FetchError(f"{part}: another `qpert data fetch` is writing it; wait for it to end") from None
            if location.is_local:
                f.truncate(0)
                with open(location.path, "rb") as source:
                    _copy(source, f, progress)
            else:
                have = f.tell()
                if size is not None and have > size:  # not a prefix of this file: start again
                    f.truncate(0)
                    have = 0
                if have and progress is not None:
                    progress(have)
                if size is None or have < size:
                    self.stream(location, f.write, start=have, progress=progress)
            f.flush()
            os.fsync(f.fileno())

    def _get(self, location: Location, headers: dict[str, str]) -> requests.Response:
        """A streamed GET: from where the URL last redirected to (a CDN), else the URL itself."""
        url = self._resolved.get(location.where, location.where)
        send = {**location.headers, **headers} if url == location.where else headers  # no tokens to a CDN
        try:
            response = self.session.get(url, headers=send, stream=True, timeout=TIMEOUT)
        except requests.exceptions.RequestException as error:
            raise FetchError(
                f"cannot reach {url} ({_reason(error)}); without a network, {location.manual or 'use --mirror FOLDER'}"
            ) from None
        if response.status_code in (401, 403, 404, 410) and url != location.where:
            response.close()  # a signed redirect that expired: ask the URL itself again
            self._resolved.pop(location.where, None)
            return self._get(location, headers)
        if response.status_code >= 400:
            response.close()
            raise _http_error(location, response.status_code)
        if response.url != url:
            self._resolved[location.where] = response.url
        return response

    def _count(self, n: int) -> None:
        with self._lock:
            self.received += n


class _Dropped(Exception):
    """A connection that ended mid-body (resumed from the byte it reached)."""


def _copy(source, target, progress: Optional[Progress]) -> None:
    while chunk := source.read(CHUNK * 16):
        target.write(chunk)
        if progress is not None:
            progress(len(chunk))


def _http_error(location: Location, status: int) -> FetchError:
    file = location.source.file
    if status == 404:
        return SourceMissing(f"{location.where}: not found (HTTP 404); {location.manual or f'copy {file} there'}")
    if status in (401, 403) and location.source.hub is not None and location.headers:
        return FetchError(
            f"{location.where}: HTTP {status}; log in (`hf auth login` or HF_TOKEN) and accept the dataset's "
            f"terms on the Hub, or {location.manual}"
        )
    return FetchError(f"{location.where}: HTTP {status}; try again later, or {location.manual or 'use --mirror'}")


def _reason(error: Exception) -> str:
    """The innermost cause of a connection error, without urllib3's object reprs."""
    text = str(error)
    for marker in ("Failed to resolve", "Connection refused", "timed out", "Name or service not known"):
        if marker in text:
            return marker.lower()
    return type(error).__name__


def disk_free(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or would, once created)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
