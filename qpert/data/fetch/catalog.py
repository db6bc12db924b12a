"""What ``qpert data fetch`` downloads: every published file, where it lives and what makes it right.

The facts (URLs, checksums, image counts, terms of use) are data, not code: :data:`SOURCES` is a
registry keyed by each file's published name, :func:`register_source` adds or replaces an entry,
and a ``--catalog`` JSON file (``{"<file name>": {"url", "md5", "sha256", "images", "members"}}``)
overrides them for one run -- for a mirror that holds other versions of the files, such as the
offline stand-ins of :mod:`qpert.synthetic.mirror`. A file whose checksum or image count differs
from these facts is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ...errors import ConfigError

PathLike = Union[str, Path]

#: Where ``qpert data fetch`` writes when no ``--data-root`` is given.
DEFAULT_DATA_ROOT = Path("~/.cache/qpert/data")

#: The names ``qpert data fetch`` takes, in the order ``all`` fetches them.
DATASET_NAMES: tuple[str, ...] = ("flickr30k", "coco", "coco-entities", "fg")

#: Terms of use shown once before a source's first download, by the name of the data they cover.
TERMS: dict[str, str] = {
    "Flickr30K": "https://shannon.cs.illinois.edu/DenotationGraph/",
    "Flickr30K Entities": "https://github.com/BryanPlummer/flickr30k_entities",
    "COCO": "https://cocodataset.org/#termsofuse",
    "COCO Entities": "https://github.com/aimagelab/show-control-and-tell",
    "MSCOCO-FG / Flickr30K-FG": "https://github.com/cwj1412/MSCOCO-Flikcr30K_FG",
}

Kind = Literal["annotations", "archive", "json", "captions"]

_LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"
#: The FG captions (Chen, Yao, Jin, SIGIR 2023) at the authors' repository, pinned to the commit checked.
_FG = "https://raw.githubusercontent.com/cwj1412/MSCOCO-Flikcr30K_FG/6d98d41a40b5e3e95739b40452d1c5b16f542b16/Annotations/"


@dataclass(frozen=True)
class Source:
    """One published file and what makes a copy of it right.

    ``kind`` says how its content is checked: ``annotations`` (a BLIP/LAVIS retrieval file naming
    ``images`` images), ``captions`` (FG captions of ``images`` images), ``json`` (parses) or
    ``archive`` (a zip whose members are checked one by one).
    """

    file: str  # the published file name: its name in a mirror (MIRROR/<file>) and its key in --catalog
    dataset: str  # the `qpert data fetch` name that fetches it
    kind: Kind
    url: Optional[str] = None  # None: no public URL (the Hub, a mirror or --catalog must say where)
    hub: Optional[tuple[str, str]] = None  # (dataset repo, file) on the Hugging Face Hub, used without url
    md5: Optional[str] = None
    sha256: Optional[str] = None
    images: Optional[int] = None  # annotations / captions: how many images the file names
    members: Optional[int] = None  # archives: how many files they hold (estimates what unpacking writes)
    terms: Optional[str] = None  # a key of TERMS


def register_source(source: Source) -> None:
    """Add a source to the registry, or replace the one of the same file name."""
    SOURCES[source.file] = source


SOURCES: dict[str, Source] = {}
for _source in (
    Source(
        "flickr30k_test.json",
        "flickr30k",
        "annotations",
        _LAVIS + "flickr30k_test.json",
        images=1000,
        terms="Flickr30K",
    ),
    Source(
        "flickr30k_val.json", "flickr30k", "annotations", _LAVIS + "flickr30k_val.json", images=1014, terms="Flickr30K"
    ),
    Source(
        "flickr30k-images.zip",
        "flickr30k",
        "archive",
        hub=("nlphuji/flickr30k", "flickr30k-images.zip"),
        members=31783,
        terms="Flickr30K",
    ),
    Source(
        "annotations.zip",
        "flickr30k",
        "archive",
        "https://github.com/BryanPlummer/flickr30k_entities/raw/master/annotations.zip",
        terms="Flickr30K Entities",
    ),
    Source(
        "coco_karpathy_test.json",
        "coco",
        "annotations",
        _LAVIS + "coco_karpathy_test.json",
        md5="3ff34b0ef2db02d01c37399f6a2a6cd1",
        images=5000,
        terms="COCO",
    ),
    Source(
        "coco_karpathy_val.json",
        "coco",
        "annotations",
        _LAVIS + "coco_karpathy_val.json",
        md5="b273847456ef5580e33713b1f7de52a0",
        images=5000,
        terms="COCO",
    ),
    Source(
        "val2014.zip",
        "coco",
        "archive",
        "http://images.cocodataset.org/zips/val2014.zip",
        md5="a3d79f5ed8d289b7a7554ce06a5782b3",
        members=40504,
        terms="COCO",
    ),
    Source(
        "coco_entities_release.json",
        "coco-entities",
        "json",
        "https://ailb-web.ing.unimore.it/publicfiles/drive/show-control-and-tell/coco_entities_release.json",
        terms="COCO Entities",
    ),
    Source(
        "Flickr30K_FG_ann.json",
        "fg",
        "captions",
        _FG + "Flickr30K_FG_ann.json",
        sha256="7e77be240f3c94bf16ae2db0b59183ad86a73f7a05354e5317d05ce54d12996f",
        images=1000,
        terms="MSCOCO-FG / Flickr30K-FG",
    ),
    Source(
        "MSCOCO_FG_ann.json",
        "fg",
        "captions",
        _FG + "MSCOCO_FG_ann.json",
        sha256="2836a1d721aa16288bf14ae4dc76af6603af900d43946e7b9c89401b72905452",
        images=5000,
        terms="MSCOCO-FG / Flickr30K-FG",
    ),
):
    register_source(_source)

#: The facts --catalog may override (the identity of a source, its file name, dataset and kind, stays).
_OVERRIDABLE = {"url": str, "md5": str, "sha256": str, "images": int, "members": int}


def load_catalog(overrides: Union[PathLike, Mapping[str, Any], None] = None) -> dict[str, Source]:
    """The registry with ``overrides`` (a ``--catalog`` JSON file or the same as a dict) applied.

    Raises:
        ConfigError: the file is not JSON, names a file the registry does not know, or gives a fact
            of the wrong type.
    """
    catalog = dict(SOURCES)
    if overrides is None:
        return catalog
    where = "--catalog"
    if not isinstance(overrides, Mapping):
        where = f"--catalog {overrides}"
        try:
            overrides = json.loads(Path(overrides).read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"{where}: cannot read it ({error.strerror or error})") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(overrides, Mapping):
        raise ConfigError(f'{where}: expected a JSON object {{"<file name>": {{"md5": ..., ...}}}}')
    for file, facts in overrides.items():
        if file not in catalog:
            raise ConfigError(f"{where}: unknown source file {file!r}; known: {', '.join(sorted(catalog))}")
        if not isinstance(facts, Mapping):
            raise ConfigError(f"{where}: {file}: expected an object of facts, got {facts!r:.80}")
        for key, value in facts.items():
            if key not in _OVERRIDABLE:
                raise ConfigError(f"{where}: {file}: unknown fact {key!r}; known: {', '.join(_OVERRIDABLE)}")
            kind = _OVERRIDABLE[key]
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ConfigError(f"{where}: {file}: {key} must be a {kind.__name__} or null, got {value!r:.80}")
        catalog[file] = replace(catalog[file], **facts)
    return catalog


def dataset_names(names: Union[str, Iterable[str]]) -> list[str]:
    """The datasets ``names`` asks for (``all`` is every one), in fetch order, each once.

    Raises:
        ConfigError: an unknown name, or none.
    """
    if isinstance(names, str):
        names = [names]
    wanted = set()
    for name in names:
        if name == "all":
            wanted.update(DATASET_NAMES)
        elif name in DATASET_NAMES:
            wanted.add(name)
        else:
            raise ConfigError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)} or all")
    if not wanted:
        raise ConfigError(f"no dataset named; choose from {', '.join(DATASET_NAMES)} or all")
    return [n for n in DATASET_NAMES if n in wanted]
