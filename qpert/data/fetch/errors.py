"""What can go wrong while fetching, as user-facing errors (one ``error:`` line on the command line)."""

from __future__ import annotations

from ...errors import DataError


class FetchError(DataError):
    """A file could not be fetched, or its bytes are wrong: the message says what to do instead."""


class SourceMissing(FetchError):
    """A source has no copy where it was looked for (no public URL, absent from a mirror, HTTP 404)."""


class WrongBytes(FetchError):
    """Bytes that fail their check (checksum, count, CRC, decoding); never kept."""


class VerifyError(DataError):
    """Files of a data root differ from its manifest (missing, or other bytes)."""
