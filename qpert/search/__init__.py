"""Object-aware search over your own photos: detector boxes, a persistent index, search and a web page.

    from qpert.search import IndexSettings, PhotoIndex, build_index
    build_index("~/Pictures", settings=IndexSettings(model="blip2-coco"))
    hits = PhotoIndex("~/Pictures/.qpert-index").search("a dog with a red frisbee", k=10, itm=True)
"""
from .detectors import DetectorOptions, load_detector
from .indexer import IndexReport, IndexSettings, build_index
from .searcher import Hit, PhotoIndex

__all__ = ["DetectorOptions", "Hit", "IndexReport", "IndexSettings", "PhotoIndex", "build_index", "load_detector"]
