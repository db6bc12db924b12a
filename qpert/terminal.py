"""Text from outside (file names, labels) made safe to print on a terminal."""

from __future__ import annotations

import unicodedata

#: Control, format (bidi overrides), surrogate and separator characters: a file name holding them
#: could move the cursor, recolour or rewrite the terminal, or fail to encode at all.
_UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def printable(text: str) -> str:
    """``text`` with every unsafe character written as an escape (``\\x1b``, ``\\u202e``); bytes a
    file name holds that are not UTF-8 (decoded by Python as lone surrogates) show as ``\\xe9``."""
    if text.isprintable():
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _UNSAFE else c for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"
