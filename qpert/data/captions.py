"""Caption preprocessing identical to BLIP / BLIP-2 (LAVIS) retrieval evaluation.

Retrieval numbers are only comparable with the papers when the texts fed to the tokenizer
are the same strings LAVIS feeds it, so this mirrors LAVIS's ``blip_caption`` text
processor (its ``pre_caption``) rule for rule, quirks included.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

# LAVIS's blip_caption default; the BLIP-2 retrieval eval configs do not override it.
DEFAULT_MAX_WORDS = 50

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = DEFAULT_MAX_WORDS) -> str:
    """Normalize one caption the way LAVIS does before BLIP-2 retrieval evaluation.

    Lower-case; replace each of ``. ! " ( ) * # : ; ~`` by a space; replace runs of two or
    more whitespace characters by one space; drop a trailing newline and surrounding
    spaces; keep the first ``max_words`` space-separated words. Other punctuation
    (commas, apostrophes, ``?``, ``$``, hyphens) is kept, and so is a lone tab or newline
    inside the text, exactly as in LAVIS.
    """
    if max_words < 1:
        raise ConfigError(f"max_words must be >= 1, got {max_words}")
    caption = _PUNCTUATION.sub(" ", caption.lower())
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
