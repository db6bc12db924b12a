"""A disk that fills up: ``fsync`` of chosen files raises ENOSPC, as a full disk makes it do."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def full_disk_for(monkeypatch: pytest.MonkeyPatch, writing: Callable[[str], bool]) -> Iterator[None]:
    """Inside the block, ``os.fsync`` of every open file whose path ``writing(path)`` accepts fails with ENOSPC."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if writing(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        yield
    finally:
        monkeypatch.setattr(os, "fsync", real_fsync)
