"""The search page's thumbnails: small upright JPEGs, cheap to make and made once per photo content.

A camera photo decoded whole takes 70-150 MB (24-48 Mpx, RGB); a thumbnail needs a small part of
that. JPEGs are decoded directly at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``), other formats are
reduced while loading, only a few photos are decoded at a time, and every thumbnail is kept on
disk next to the index, named by the photo's SHA-256, so it is made once for all servers and runs.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

from ..atomic import atomic_write, remove_stale_temporaries

log = logging.getLogger(__name__)

SIZE = 384  # longest side, in pixels
CONCURRENT = 2  # photos decoded at once, whatever the number of requests
QUALITY = 85


class Thumbnails:
    """Thumbnails cached in ``folder`` (created when first needed; read-only places are fine)."""

    def __init__(self, folder: Path, size: int = SIZE, concurrent: int = CONCURRENT):
        self.folder = Path(folder)
        self.size = size
        self._decoding = threading.BoundedSemaphore(concurrent)
        if self.folder.is_dir():
            remove_stale_temporaries(self.folder)

    def get(self, photo: BinaryIO, sha256: str) -> bytes:
        """The thumbnail of the open ``photo`` whose content hash is ``sha256``; raises what decoding
        a broken photo raises (``qpert.search.photos.DECODE_ERRORS``)."""
        cached = self.folder / f"{sha256}-{self.size}.jpg"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        with self._decoding:
            body = make_thumbnail(photo, self.size)
        try:
            self.folder.mkdir(exist_ok=True)
            with atomic_write(cached) as f:
                f.write(body)
        except OSError as e:  # a read-only index: serve it anyway, made again next time
            log.debug("thumbnail not cached (%s)", e)
        return body


def make_thumbnail(photo: BinaryIO, size: int = SIZE) -> bytes:
    """A JPEG of ``photo`` at most ``size`` pixels on its longest side, upright by its EXIF orientation."""
    with Image.open(photo) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size (no-op otherwise)
        im.thumbnail((size, size))  # loads, reducing as it goes
        upright = ImageOps.exif_transpose(im).convert("RGB")
    out = io.BytesIO()
    upright.save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()
