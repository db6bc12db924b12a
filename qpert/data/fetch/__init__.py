"""``qpert data fetch`` / ``verify`` in Python: the benchmarks from their published sources into the
layout ``qpert eval`` reads, checked at every step, resumable, with a manifest to verify later.

Modules: :mod:`.catalog` (the sources and their published facts: a registry), :mod:`.transfer`
(mirrors, the Hub, resumable ranged HTTP), :mod:`.remote_zip` (an archive's members without the rest),
:mod:`.checks` (checksums and content), :mod:`.manifest` (the record and ``verify_data``),
:mod:`.fetcher` (plan, disk check, transfers) and :mod:`.recipes` (what each name fetches).
"""

from .catalog import DATASET_NAMES, DEFAULT_DATA_ROOT, SOURCES, Source, load_catalog, register_source
from .errors import FetchError, SourceMissing, VerifyError, WrongBytes
from .fetcher import FetchReport, Planned
from .manifest import VerifyReport, verify_data
from .recipes import RECIPES, fetch_data
from .transfer import MIRROR_ENV

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_DATA_ROOT",
    "MIRROR_ENV",
    "RECIPES",
    "SOURCES",
    "FetchError",
    "FetchReport",
    "Planned",
    "Source",
    "SourceMissing",
    "VerifyError",
    "VerifyReport",
    "WrongBytes",
    "fetch_data",
    "load_catalog",
    "register_source",
    "verify_data",
]
