"""Atomic file writes whose temporaries tell a live writer from a dead one.

A file is written under a temporary name beside its final one, flushed, then renamed over it,
so readers only ever see complete files. While it is written, its writer holds an ``flock`` on
the temporary (and writes through that same open file: libraries that write by name may replace
the file, and the lock with it); the kernel drops the lock when the writer exits, however it
exits (kill -9 included). A cleaner that can take the lock knows the writer is gone and removes the file; one
that cannot leaves it alone, so two processes sharing a folder never delete each other's work.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import DiskFullError

#: What a write says when the disk (or the user's quota) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

#: Marks temporaries: ``name.tmp<pid>-<random>`` (no longer ending as the file does, so globs skip them).
TMP_MARK = ".tmp"


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Yields a binary file to write ``path``'s new content to; on success it is flushed to disk and
    renamed over ``path``, on an exception removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    with naming_a_full_disk(path):
        fd = _create_locked(tmp)
        try:
            with open(fd, "wb", closefd=False) as f:
                yield f
                f.flush()
                os.fsync(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)


@contextmanager
def naming_a_full_disk(path: Path) -> Iterator[None]:
    """A full disk while writing ``path`` becomes a :class:`DiskFullError` that names it (``[Errno 28]``
    alone says neither what nor where)."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise DiskFullError(f"no space left on the device while writing {path}") from e


def _create_locked(tmp: Path) -> int:
    """Create ``tmp`` and lock it; a cleaner may remove it between the two steps, then start over."""
    while True:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_stale_temporaries(folder: Path, pattern: str = f"*{TMP_MARK}*") -> list[Path]:
    """Remove the temporaries under ``folder`` (matching ``pattern``) whose writer is gone; those
    still being written are kept. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(pattern):
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # renamed into place meanwhile, or not a plain file
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            os.close(fd)
            continue
        try:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except OSError:  # a folder, or a read-only place: not ours to tidy
            pass
        finally:
            os.close(fd)
    return removed
