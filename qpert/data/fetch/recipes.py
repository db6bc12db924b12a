"""What each ``qpert data fetch`` name fetches, into the layout of :class:`qpert.data.layout.DataLayout`.

* ``flickr30k``: the BLIP/LAVIS test and val annotations (Karpathy split: 1,000 + 1,014 images), those
  images from ``flickr30k-images.zip`` (the Hugging Face dataset ``nlphuji/flickr30k``, or
  ``--flickr30k-images``), and their Flickr30K Entities XML and Sentences from ``annotations.zip``.
* ``coco``: the BLIP/LAVIS Karpathy test and val annotations (5,000 + 5,000 images) and those images
  from ``val2014.zip``.
* ``coco-entities``: ``coco_entities_release.json``.
* ``fg``: the MSCOCO-FG and Flickr30K-FG captions from their authors' repository.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from ...errors import DiskFullError
from ..layout import BENCHMARKS, SPLITS, DataLayout, PathLike
from .catalog import DEFAULT_DATA_ROOT, dataset_names, load_catalog
from .checks import check_entities, check_image
from .errors import FetchError
from .fetcher import Fetcher, FetchReport
from .transfer import Locator


def _images(fetcher: Fetcher, benchmark: str, archive: str) -> list[str]:
    """Fetch the test and val annotations, then the images they name; the images' stems."""
    layout = fetcher.layout
    names = [name for split in SPLITS for name in fetcher.annotation(benchmark, benchmark, split)]
    fetcher.members(
        benchmark, archive, {n.rpartition("/")[2]: layout.images_dir(benchmark) / n for n in names}, 1, check_image
    )
    return [Path(n).stem for n in names]


def _flickr30k(fetcher: Fetcher) -> None:
    layout = fetcher.layout
    ids = _images(fetcher, "flickr30k", "flickr30k-images.zip")
    wanted = {}
    for i in ids:
        wanted[f"Annotations/{i}.xml"] = layout.entities_annotations / f"{i}.xml"
        wanted[f"Sentences/{i}.txt"] = layout.entities_sentences / f"{i}.txt"
    fetcher.members("flickr30k", "annotations.zip", wanted, 2, check_entities)


def _coco(fetcher: Fetcher) -> None:
    _images(fetcher, "coco", "val2014.zip")


def _coco_entities(fetcher: Fetcher) -> None:
    fetcher.file("coco-entities", fetcher.layout.coco_entities)


def _fg(fetcher: Fetcher) -> None:
    for benchmark in BENCHMARKS:
        fetcher.file("fg", fetcher.layout.fg_file(benchmark))


#: Each name's recipe: how it uses the fetcher's annotation / members / file steps. Add one to fetch more.
RECIPES: dict[str, Callable[[Fetcher], None]] = {
    "flickr30k": _flickr30k,
    "coco": _coco,
    "coco-entities": _coco_entities,
    "fg": _fg,
}


def fetch_data(
    names: Union[str, Sequence[str]],
    data_root: PathLike = DEFAULT_DATA_ROOT,
    *,
    mirror: Optional[str] = None,
    catalog: Union[PathLike, Mapping[str, Any], None] = None,
    flickr30k_images: Optional[PathLike] = None,
    dry_run: bool = False,
    progress: bool = True,
    rehash: bool = False,
    echo: Optional[Callable[[str], None]] = None,
) -> FetchReport:
    """Fetch the datasets ``names`` (``flickr30k``, ``coco``, ``coco-entities``, ``fg``, ``all``) into
    ``data_root`` in the layout ``qpert eval`` reads, checking every file and recording it in the manifest.

    Args:
        mirror: a folder or http(s) URL holding the sources under their published file names (default:
            the ``QPERT_DATA_MIRROR`` environment variable), read instead of their origins.
        catalog: a ``--catalog`` JSON file, or its dict, overriding the catalogue's facts per file.
        flickr30k_images: a copy of ``flickr30k-images.zip``, or a folder of the images, used instead of the Hub.
        dry_run: list what would be fetched and its size; write nothing.
        rehash: hash the files the manifest lists instead of trusting their size (fetching changed ones again).
        echo: where notices (terms of use, files without a source) go; default standard error.

    Returns:
        What was fetched, what was already in place, and (``dry_run``) the plan.

    Raises:
        FetchError: a source is unreachable or missing, its bytes stay wrong, or the disk is too small.
        ConfigError: an unknown name or a bad ``catalog``.
    """
    datasets = dataset_names(names)
    overrides = {}
    if flickr30k_images is not None:
        path = Path(flickr30k_images).expanduser()
        if not path.exists():
            raise FetchError(f"--flickr30k-images {path}: no such zip or folder")
        overrides["flickr30k-images.zip"] = path
    fetcher = Fetcher(
        DataLayout(data_root),
        load_catalog(catalog),
        Locator(mirror, overrides),
        dry_run=dry_run,
        progress=progress,
        rehash=rehash,
        echo=echo,
    )
    try:
        try:
            for name in datasets:
                RECIPES[name](fetcher)
            report = fetcher.run()
        finally:
            fetcher.close()
    except DiskFullError as e:  # raised by the fetch, or by saving the manifest after it
        raise DiskFullError(
            f"{e}; every file checked before it is kept, and the download so far too: free some space "
            "and run the same command again, it resumes"
        ) from e
    return report
