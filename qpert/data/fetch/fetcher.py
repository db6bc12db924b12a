"""One fetch, planned before anything large is written, so a dry run and the disk-space check see
exactly what the run would write.

1. Annotation files (small; they name the images) are fetched and checked -- into memory only, on a
   dry run.
2. Each archive is opened where it lies (a ranged server's directory, a local zip or folder) to size
   the members needed; one on a server without range requests is sized whole, to be downloaded.
   Large single files are sized.
3. After the disk-space check, the members and large files are fetched, each checked before it
   appears under its final name and recorded in the manifest.

Files the manifest lists with their present size are skipped without a request. Files in place that
it does not list are checked (checksums and content, or a member's CRC-32) and adopted, not fetched.
"""

from __future__ import annotations

import os
import sys
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from tqdm.auto import tqdm

from ...atomic import atomic_write, remove_stale_temporaries
from ..layout import DataLayout
from .catalog import TERMS, Source
from .checks import check_content, check_digests, digests
from .errors import FetchError, WrongBytes
from .manifest import Entry, Manifest
from .remote_zip import Archive, Member, RemoteFile, ZipArchive, open_local
from .transfer import Http, Location, Locator, disk_free

#: File-system overhead assumed per file written, on top of its bytes, for the disk-space check.
PER_FILE = 4096
Check = Callable[[bytes, str], None]


@dataclass(frozen=True)
class Planned:
    """One transfer a run makes (what a dry run lists): ``bytes`` it writes, None when unknown."""

    dataset: str
    what: str
    source: str
    bytes: Optional[int]


@dataclass
class FetchReport:
    """What a fetch did: files written and files already in place (or, for a dry run, the plan)."""

    root: Path
    dry_run: bool = False
    fetched: list[Path] = field(default_factory=list)
    present: list[Path] = field(default_factory=list)
    planned: list[Planned] = field(default_factory=list)
    bytes_written: int = 0
    bytes_received: int = 0  # over HTTP
    free: Optional[int] = None

    def summary(self) -> str:
        if self.dry_run:
            lines = [
                f"would fetch {p.what} from {p.source} ({_size(p.bytes)}) [{p.dataset}]" for p in self.planned
            ] or ["nothing to fetch"]
            total = sum(p.bytes or 0 for p in self.planned)
            lines.append(
                f"dry run: about {_size(total)} to write into {self.root} ({_size(self.free)} free), "
                f"{len(self.present)} files already there; nothing written"
            )
        else:
            lines = [
                f"fetched {len(self.fetched)} files ({_size(self.bytes_written)}) into {self.root}; "
                f"{len(self.present)} already there; manifest {DataLayout(self.root).manifest}"
            ]
        return "\n".join(lines)


def _size(n: Optional[int]) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass
class _File:
    dataset: str
    location: Location
    dest: Path
    size: Optional[int]

    def to_write(self) -> int:
        part = self.dest.with_name(self.dest.name + ".part")
        return (self.size or 0) - (part.stat().st_size if part.is_file() else 0)

    def files(self) -> int:
        return 1


@dataclass
class _Members:
    dataset: str
    location: Location
    todo: dict[str, Path]  # a member's last path components -> where it goes
    depth: int
    check: Check
    archive: Optional[Archive] = None  # None: downloaded whole first
    size: Optional[int] = None  # of the whole archive, when it is downloaded
    pairs: list[tuple[Member, Path]] = field(default_factory=list)

    def to_write(self, downloads: Path) -> int:
        """The members' bytes; with a whole download, the archive's and an estimate of the members'."""
        if self.archive is not None:
            return sum(m.size for m, _ in self.pairs)
        part = downloads / (self.location.source.file + ".part")
        size = self.size or 0
        share = len(self.todo) / self.location.source.members if self.location.source.members else 1.0
        return size - (part.stat().st_size if part.is_file() else 0) + int(size * min(share, 1.0))

    def files(self) -> int:
        return len(self.pairs) if self.archive is not None else len(self.todo)


class Fetcher:
    """A fetch: recipes call :meth:`annotation`, :meth:`members` and :meth:`file` to plan, then :meth:`run`."""

    def __init__(
        self,
        layout: DataLayout,
        catalog: dict[str, Source],
        locator: Locator,
        *,
        dry_run: bool = False,
        progress: bool = True,
        rehash: bool = False,
        echo: Optional[Callable[[str], None]] = None,
        workers: int = 8,
    ) -> None:
        self.layout, self.catalog, self.locator = layout, catalog, locator
        self.dry_run, self.progress, self.rehash, self.workers = dry_run, progress, rehash, workers
        self.echo = echo or (lambda message: print(message, file=sys.stderr))
        self.http = Http(workers)
        self.manifest = Manifest.load(layout)
        self.report = FetchReport(layout.root, dry_run)
        self.jobs: list[Union[_File, _Members]] = []
        self._terms_shown: set[str] = set()
        self._lock = threading.Lock()

    # -- planning: what recipes call ---------------------------------------------------------------

    def annotation(self, dataset: str, benchmark: str, split: str) -> list[str]:
        """Fetch (on a dry run: read) and check an annotation file; the image names it lists."""
        dest = self.layout.annotation_file(benchmark, split)
        source = self.catalog[dest.name]
        folder = self.layout.image_folder(benchmark).relative_to(self.layout.images_dir(benchmark)).as_posix()
        if not self._in_place(dataset, source, dest, folder, content=True):
            location = self.locate(source, dest)
            if self.dry_run:
                data = self.http.read(location)
                check_digests(source, data)
                self.report.planned.append(Planned(dataset, source.file, location.where, len(data)))
                return check_content(source, data, folder)
            self._fetch_file(_File(dataset, location, dest, None), folder)
        return check_content(source, dest.read_bytes(), folder)

    def members(self, dataset: str, file: str, wanted: dict[str, Path], depth: int, check: Check) -> None:
        """Plan the members of archive ``file`` whose last ``depth`` path components are ``wanted``'s keys."""
        todo = {}
        for key, dest in wanted.items():
            if self.manifest.current(dataset, dest, self.rehash):
                self.report.present.append(dest)
            else:
                todo[key] = dest
        if not todo:
            return
        location = self.locate(self.catalog[file])
        job = _Members(dataset, location, todo, depth, check)
        if location.is_local:
            job.archive = open_local(location)
        else:
            remote = self.http.probe(location)
            if remote.ranges and remote.size:
                job.archive = ZipArchive(RemoteFile(self.http, location, remote.size), location.where)
            else:
                job.size = remote.size
        self.jobs.append(job)
        if job.archive is not None:
            self._resolve(job)
            how = "ranged reads" if isinstance(job.archive, ZipArchive) and job.archive.remote else "read in place"
            what = f"{file}: {len(job.pairs)} of its {len(job.archive.members)} files ({how})"
        else:
            what = f"{file} whole ({_size(job.size)}; the server refuses range requests), then {len(todo)} of its files"
        self.report.planned.append(Planned(dataset, what, location.where, job.to_write(self.layout.downloads)))

    def file(self, dataset: str, dest: Path) -> None:
        """Plan a single file, named as it is published (raises SourceMissing when it has no source)."""
        source = self.catalog[dest.name]
        if self._in_place(dataset, source, dest, content=False):
            return
        location = self.locate(source, dest)
        size = location.path.stat().st_size if location.is_local else self.http.probe(location).size
        self.jobs.append(_File(dataset, location, dest, size))
        self.report.planned.append(Planned(dataset, source.file, location.where, size))

    def locate(self, source: Source, dest: Optional[Path] = None) -> Location:
        """Where ``source`` is read from; its terms of use are shown before its first transfer."""
        location = self.locator.locate(source, dest)
        if source.terms is not None and source.terms not in self._terms_shown:
            self._terms_shown.add(source.terms)
            self.echo(f"{source.terms}: fetching it means accepting its terms of use: {TERMS[source.terms]}")
        return location

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> FetchReport:
        """Check the disk space for the plan, then fetch it (a dry run stops after the check)."""
        need = sum(j.to_write() if isinstance(j, _File) else j.to_write(self.layout.downloads) for j in self.jobs)
        need += PER_FILE * sum(j.files() for j in self.jobs)
        self.report.free = disk_free(self.layout.root)
        if not self.dry_run and need > self.report.free:
            raise FetchError(
                f"{self.layout.root}: this fetch writes about {_size(need)} but {_size(self.report.free)} "
                "are free; free some space, or fetch to another --data-root"
            )
        if not self.dry_run:
            for job in self.jobs:
                if isinstance(job, _File):
                    self._fetch_file(job)
                else:
                    self._unpack(job)
        self.report.bytes_received = self.http.received
        return self.report

    def close(self) -> None:
        """Save what was recorded (also after an error or Ctrl-C: the next run resumes from it)."""
        if not self.dry_run:
            self.manifest.save()
        for job in self.jobs:
            if isinstance(job, _Members) and job.archive is not None:
                job.archive.close()

    def _in_place(self, dataset: str, source: Source, dest: Path, folder: str = "", *, content: bool) -> bool:
        """Whether ``dest`` is right as it is: listed in the manifest (``content``: and still parses as
        this catalogue expects), or not listed but passing every check (then it is adopted)."""
        if self.manifest.current(dataset, dest, self.rehash):
            try:
                if content:
                    check_content(source, dest.read_bytes(), folder)
            except WrongBytes:
                return False
            self.report.present.append(dest)
            return True
        if self.manifest.listed(dataset, dest) or not dest.is_file():
            return False  # listed with other bytes: fetched again
        data = dest.read_bytes()
        try:
            sha256 = check_digests(source, data)
            check_content(source, data, folder)
        except WrongBytes:
            return False
        self.manifest.record(dataset, dest, Entry(source.url or "", len(data), sha256))
        self.report.present.append(dest)
        return True

    def _resolve(self, job: _Members) -> None:
        """Match the wanted files to the archive's members; adopt unlisted files in place whose CRC-32 matches."""
        found = job.archive.find(job.todo, job.depth)
        absent = [key for key in job.todo if key not in found]
        if absent:
            raise FetchError(
                f"{job.location.where} lacks {len(absent)} of the {len(job.todo)} files needed, e.g. "
                f"{', '.join(absent[:3])}: is it {job.location.source.file} as published?"
            )
        for key, dest in job.todo.items():
            member = found[key]
            if not self.manifest.listed(job.dataset, dest) and member.crc is not None and _same(dest, member):
                sha256, _ = digests(dest)
                self.manifest.record(job.dataset, dest, Entry(job.location.where, member.size, sha256, member.name))
                self.report.present.append(dest)
            else:
                job.pairs.append((member, dest))

    def _fetch_file(self, job: _File, folder: str = "") -> None:
        """Download to ``<dest>.part`` (resuming), check, and only then rename; wrong bytes are fetched once more."""
        source, dest = job.location.source, job.dest
        part = dest.with_name(dest.name + ".part")
        for attempt in (1, 2):
            with self._bar(source.file, job.size) as bar:
                self.http.download(job.location, part, job.size, bar.update)
            data = part.read_bytes()
            try:
                sha256 = check_digests(source, data)
                check_content(source, data, folder)
            except WrongBytes as error:
                part.unlink(missing_ok=True)
                if attempt == 2:
                    raise _refused(error, job.location) from None
                continue
            os.replace(part, dest)
            self._wrote(job.dataset, dest, Entry(job.location.where, len(data), sha256))
            return

    def _unpack(self, job: _Members) -> None:
        downloaded = None
        if job.archive is None:
            job.archive, downloaded = self._download_archive(job)
            self._resolve(job)
        self._extract(job)
        if downloaded is not None:  # every member it was fetched for is out: it takes space for nothing
            job.archive.close()
            downloaded.unlink()
            if not any(self.layout.downloads.iterdir()):
                self.layout.downloads.rmdir()

    def _download_archive(self, job: _Members) -> tuple[Archive, Path]:
        """The whole archive into the downloads folder (resuming), checksummed where published, opened."""
        source = job.location.source
        path = self.layout.downloads / source.file
        part = path.with_name(path.name + ".part")
        for attempt in (1, 2):
            try:
                if not path.is_file():
                    with self._bar(source.file, job.size) as bar:
                        self.http.download(job.location, part, job.size, bar.update)
                    check_digests(source, part)
                    os.replace(part, path)
                return ZipArchive(open(path, "rb"), str(path)), path
            except WrongBytes as error:
                part.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                if attempt == 2:
                    raise _refused(error, job.location) from None
        raise AssertionError("unreachable")

    def _extract(self, job: _Members) -> None:
        """The needed members, ``workers`` at a time: each checked, written atomically and recorded."""
        if not job.pairs:
            return
        for folder in {dest.parent for _, dest in job.pairs}:
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
        pool = ThreadPoolExecutor(self.workers)
        interrupted = False
        try:
            total = sum(m.packed for m, _ in job.pairs)
            with self._bar(f"{job.location.source.file} ({len(job.pairs)} files)", total) as bar:
                futures = [pool.submit(self._member, job, m, dest, bar.update) for m, dest in job.pairs]
                for future in as_completed(futures):
                    future.result()
                    self.manifest.save(if_due=True)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            pool.shutdown(wait=not interrupted, cancel_futures=True)

    def _member(self, job: _Members, member: Member, dest: Path, progress: Callable[[int], None]) -> None:
        for attempt in (1, 2):
            try:
                data = job.archive.read(member, progress)
                job.check(data, member.name)
                break
            except WrongBytes as error:
                if attempt == 2:
                    raise _refused(error, job.location) from None
        with atomic_write(dest) as f:
            f.write(data)
        sha256, _ = digests(data)
        self._wrote(job.dataset, dest, Entry(job.location.where, len(data), sha256, member.name))

    def _wrote(self, dataset: str, dest: Path, entry: Entry) -> None:
        self.manifest.record(dataset, dest, entry)
        with self._lock:
            self.report.fetched.append(dest)
            self.report.bytes_written += entry.size

    def _bar(self, description: str, total: Optional[int]) -> tqdm:
        return tqdm(
            total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, disable=not self.progress
        )


def _same(dest: Path, member: Member) -> bool:
    """Whether ``dest`` holds ``member``'s bytes, by size and CRC-32."""
    try:
        if dest.stat().st_size != member.size:
            return False
        return zlib.crc32(dest.read_bytes()) == member.crc
    except OSError:
        return False


def _refused(error: WrongBytes, location: Location) -> FetchError:
    return FetchError(
        f"{error}; fetched twice from {location.where} and not kept (a mirror of another version of the "
        "file gives its checksums and counts with --catalog)"
    )
