"""Image-text retrieval test/val sets loaded from the files users actually download.

The data root's layout is :mod:`qpert.data.layout` (the LAVIS cache layout, so
``~/.cache/lavis`` works as a root as is).

When several annotation files are present the BLIP/LAVIS one wins (it is what BLIP-2's
published numbers were computed on); ``captions_file`` names one explicitly. The two
formats hold the same Karpathy split; the format is recognized from the file's content.
The FG datasets take their images and image order from the base dataset and replace
every image's captions by its FG captions (only the test split has FG captions).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import ConfigError, DataError
from .captions import DEFAULT_MAX_WORDS, pre_caption
from .layout import SPLITS, DataLayout, describe, karpathy_image_folder

PathLike = Union[str, Path]

DATASET_NAMES = ("flickr30k", "coco", "flickr30k-fg", "coco-fg")


class DatasetLayoutError(DataError):
    """A dataset file or folder is missing or not in a recognized format."""


@dataclass(frozen=True, eq=False)
class RetrievalDataset:
    """One evaluation split: images, their captions, and the pairing between them.

    ``image_ids`` are the ids box sources and detectors use: the Flickr id (file stem) for
    Flickr30K, the integer COCO id as a string (``"391895"``) for COCO. ``file_stems`` keep
    the file names' stems (``"COCO_val2014_000000391895"``), which key the FG captions.
    ``texts`` are preprocessed with :func:`qpert.data.captions.pre_caption`, image by image
    in annotation order, so ``image_to_texts[i]`` is a contiguous run of text indices.
    """

    name: str
    split: str
    image_ids: list[str]
    file_stems: list[str]
    image_paths: list[Path]
    texts: list[str]
    text_to_image: np.ndarray
    image_to_texts: list[list[int]]

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_texts(self) -> int:
        return len(self.texts)


_COCO_STEM = re.compile(r"^COCO_[a-z]+\d{4}_(\d+)$")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_dataset(
    name: str,
    root: PathLike,
    split: str = "test",
    captions_file: Optional[PathLike] = None,
    *,
    max_words: int = DEFAULT_MAX_WORDS,
    check_images: bool = True,
) -> RetrievalDataset:
    """Load ``name`` (one of :data:`DATASET_NAMES`) for ``split`` ("test" or "val").

    ``captions_file`` overrides the annotation file for flickr30k/coco and the FG caption
    file for the -fg names. With ``check_images`` every image file must exist (a missing
    one would otherwise surface hours later inside a model run).
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; retrieval evaluation uses {SPLITS}")
    base = name.removesuffix("-fg")
    layout = DataLayout(root)
    images_dir = layout.images_dir(base)
    if check_images and not images_dir.is_dir():
        raise DatasetLayoutError(_missing(images_dir, "images folder", base))

    is_fg = name.endswith("-fg")
    if captions_file is not None and not is_fg:
        ann_path = _existing_file(Path(captions_file), "annotation file", base)
    else:
        ann_path = _find_annotation_file(layout.annotation_candidates(base, split), split, base)
    records = _read_annotation(ann_path, split, base, images_dir)

    if is_fg:
        fg_path = Path(captions_file) if captions_file is not None else layout.fg_file(base)
        records = _substitute_fg(records, _existing_file(fg_path, "FG caption file", base))

    return _build(name, split, records, max_words, check_images, base)


@dataclass(frozen=True)
class _Record:
    path: Path
    captions: list[str]


def _read_annotation(path: Path, split: str, base: str, images_dir: Path) -> list[_Record]:
    data = _read_json(path)
    if isinstance(data, list):
        return _lavis_records(data, path, images_dir)
    if isinstance(data, dict) and "images" in data:
        return _karpathy_records(data, path, split, base, images_dir)
    raise DatasetLayoutError(
        f"{path}: not a recognized annotation file; expected a BLIP/LAVIS retrieval file "
        "(a list of {'image', 'caption': [...]}) or Karpathy's dataset_*.json ({'images': [...]})"
    )


def _lavis_records(entries: list[Any], path: Path, images_dir: Path) -> list[_Record]:
    records = []
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
            raise DatasetLayoutError(f"{path}: entry without 'image' and 'caption': {entry!r:.200}")
        if isinstance(entry["caption"], str):
            raise DatasetLayoutError(
                f"{path}: entries hold one caption each, as in LAVIS training files; "
                "use the val/test file, whose entries hold a list of captions per image"
            )
        records.append(_record(path, entry["image"], entry["caption"], images_dir))
    return records


def _record(path: Path, image: Any, captions: Any, images_dir: Path) -> _Record:
    """A record whose image is a file name and whose captions are strings, or a clear error."""
    if not isinstance(image, str) or not image:
        raise DatasetLayoutError(f"{path}: an image must be named by a file name, got {image!r:.100}")
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DatasetLayoutError(f"{path}: the captions of {image} must be a list of strings, got {captions!r:.100}")
    return _Record(images_dir / image, captions)


def _karpathy_records(data: dict[str, Any], path: Path, split: str, base: str, images_dir: Path) -> list[_Record]:
    records = []
    if not isinstance(data["images"], list) or not all(isinstance(image, dict) for image in data["images"]):
        raise DatasetLayoutError(f"{path}: 'images' must be a list of image entries ({{'filename', 'sentences', ...}})")
    for image in data["images"]:
        if image.get("split") != split:
            continue
        try:
            # Karpathy's Flickr30K file names images bare; COCO's gives the folder in "filepath"
            folder = karpathy_image_folder(base) if base == "flickr30k" else image.get("filepath", "")
            captions = [sentence["raw"] for sentence in image["sentences"]]
            records.append(_record(path, image["filename"], captions, images_dir / folder))
        except (KeyError, TypeError) as error:
            raise DatasetLayoutError(
                f"{path}: Karpathy image entry without 'filename' or 'sentences'[*]['raw']: {image!r:.200}"
            ) from error
    if not records:
        raise DatasetLayoutError(f"{path}: no image has split {split!r}")
    return records


def _substitute_fg(records: list[_Record], fg_path: Path) -> list[_Record]:
    fg = _read_json(fg_path)
    if not isinstance(fg, dict):
        raise DatasetLayoutError(f"{fg_path}: expected a JSON object {{image key: [captions]}}")
    missing = [r.path.stem for r in records if r.path.stem not in fg]
    if missing:
        raise DatasetLayoutError(
            f"{fg_path}: no FG captions for {len(missing)} of {len(records)} images "
            f"(e.g. {missing[:3]}); FG captions exist only for the Karpathy test split"
        )
    return [_record(fg_path, r.path.name, fg[r.path.stem], r.path.parent) for r in records]


def _build(
    name: str, split: str, records: list[_Record], max_words: int, check_images: bool, base: str
) -> RetrievalDataset:
    if not records:
        raise DatasetLayoutError(f"{name}/{split}: the annotation file lists no images")
    stems = [r.path.stem for r in records]
    if len(set(stems)) != len(stems):
        duplicates = sorted(s for s, n in Counter(stems).items() if n > 1)
        raise DatasetLayoutError(f"{name}/{split}: images listed more than once: {duplicates[:5]}")
    if check_images:
        absent = [r.path for r in records if not r.path.is_file()]
        if absent:
            raise DatasetLayoutError(
                f"{name}/{split}: {len(absent)} of {len(records)} image files are missing, "
                f"e.g. {[str(p) for p in absent[:3]]}\n{describe(base)}"
            )
    texts: list[str] = []
    image_to_texts: list[list[int]] = []
    for record in records:
        if not record.captions:
            raise DatasetLayoutError(f"{name}/{split}: image {record.path.name} has no captions")
        start = len(texts)
        texts.extend(pre_caption(c, max_words) for c in record.captions)
        image_to_texts.append(list(range(start, len(texts))))
    text_to_image = np.repeat(np.arange(len(records)), [len(t) for t in image_to_texts])
    return RetrievalDataset(
        name=name,
        split=split,
        image_ids=[_image_id(s, base) for s in stems],
        file_stems=stems,
        image_paths=[r.path for r in records],
        texts=texts,
        text_to_image=text_to_image,
        image_to_texts=image_to_texts,
    )


def normalize_image_id(value: Union[int, str]) -> str:
    """The dataset's id for an image named by an int, a numeric string or a file name.

    ``391895``, ``"000000391895"``, ``"COCO_val2014_000000391895"`` and
    ``"COCO_val2014_000000391895.jpg"`` all give ``"391895"``; ``"1007129816.jpg"`` gives
    ``"1007129816"``. Other strings are returned unchanged. Detector outputs and annotation
    files name images in all these ways; this is how they are matched to a dataset.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str, np.integer)):
        raise DataError(f"image id must be an int or a str, got {value!r}")
    if not isinstance(value, str):
        return str(int(value))
    text = value.strip()
    stem = Path(text).stem if Path(text).suffix.lower() in _IMAGE_SUFFIXES else text
    match = _COCO_STEM.match(stem)
    if match is not None:
        return str(int(match.group(1)))
    return str(int(stem)) if stem.isascii() and stem.isdigit() else stem


def _image_id(stem: str, base: str) -> str:
    if base == "coco" and _COCO_STEM.match(stem) is None:
        raise DatasetLayoutError(f"not a COCO image file name: {stem!r}")
    return normalize_image_id(stem)


def _find_annotation_file(candidates: list[Path], split: str, base: str) -> Path:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetLayoutError(
        f"no {split} annotation file for {base}: looked for {', '.join(str(c) for c in candidates)}\n{describe(base)}"
    )


def _existing_file(path: Path, what: str, base: str) -> Path:
    if not path.is_file():
        raise DatasetLayoutError(_missing(path, what, base))
    return path


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetLayoutError(f"{path}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise DatasetLayoutError(f"{path}: not UTF-8 text ({error}); annotation files are UTF-8 JSON") from error


def _missing(path: Path, what: str, base: str) -> str:
    return f"missing {what}: {path}\n{describe(base)}"
