"""Object-aware search over your own photos: detector boxes, a persistent index, search and a web page.

    from qpert.search import IndexSettings, PhotoIndex, build_index
    build_index("~/Pictures", settings=IndexSettings(model="blip2-coco"))
    hits = PhotoIndex("~/Pictures/.qpert-index").search("a dog with a red frisbee", k=10, itm=True)

Needs the ``search`` extra (FAISS): ``pip install 'qpert[search]'``. The names below load on first
use, so ``qpert`` and its command line start without it.
"""

from importlib import import_module

_EXPORTS = {
    "DetectorOptions": "detectors",
    "load_detector": "detectors",
    "IndexReport": "indexer",
    "IndexSettings": "indexer",
    "build_index": "indexer",
    "Hit": "searcher",
    "PhotoIndex": "searcher",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
