"""Object boxes per image, from manual annotations or a detector, in one common form.

Every source gives, for each requested image id, an :class:`ImageBoxes`: a float32 (M, 4)
array of ``x0, y0, x1, y1`` in pixels of the original image, continuous pixel-edge
coordinates (a box covering pixel columns 0..9 is x0=0, x1=10), clipped to the image, plus
the image size. Boxes left with no area after clipping are dropped.

Sources:

* Flickr30K Entities ``Annotations/<id>.xml`` (manual). An image without an XML file gets
  no boxes and is counted in :attr:`BoxSet.missing` (logged once, never fatal); an XML file
  that does not parse is an error naming the file, since it means a broken download.
* COCO Entities (Cornia et al., CVPR 2019) ``coco_entities_release.json``:
  ``{"<coco id>": {"<caption>": {"detections": {"<class>": [[det_id, [x1, y1, x2, y2]], ...]}}}}``.
  Its boxes are the Visual-Genome Faster R-CNN regions that its captions' noun chunks were
  grounded to; an image's boxes are the union over its captions. The file has no image
  sizes, so they are read from the image files' headers.
* COCO instances annotations (``instances_val2014.json``, manual, ``bbox`` = x, y, w, h);
  crowd regions are left out by default, as COCO's own evaluation ignores them.
* Detector output in COCO results format: ``[{"image_id", "bbox": [x, y, w, h], "score",
  "category_id"}, ...]``, filtered by score and capped per image, highest scores first.

The two Entities sources have two rule sets (``rules``): ``"paper"`` (the above: the
datasets' documented conventions) and ``"official"``, which yields the boxes of the authors'
released code (NEC-N-SOGI/query-perturbation, commit c6e0294) so that its published numbers
can be reproduced; see :func:`read_official_entities` and :func:`official_coco_entities`.
"""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from .datasets import PathLike, RetrievalDataset, normalize_image_id

logger = logging.getLogger(__name__)

BOX_SOURCES = ("flickr30k-entities", "coco-entities", "coco-instances", "detector")

BoxRules = Literal["paper", "official"]
BOX_RULES = ("paper", "official")
AreaConvention = Literal["paper", "official"]


class BoxFormatError(DataError):
    """A box annotation file is missing or does not have the expected format."""


@dataclass(frozen=True, eq=False)
class ImageBoxes:
    """Boxes of one image: float32 (M, 4) xyxy pixels and the image size (height, width).

    ``size`` is None only for an image without boxes whose size no source told us.
    ``source_boxes`` is set by the official rules only: the float64 boxes exactly as the
    official loader yields them (its order, unclipped, zero-area ones included), because the
    official area bins and area weights are computed from those.
    """

    boxes: np.ndarray
    size: Optional[tuple[int, int]]
    source_boxes: Optional[np.ndarray] = None

    def normalized_areas(self) -> np.ndarray:
        """Box areas over the image area, in [0, 1]."""
        if len(self.boxes) == 0:
            return np.zeros(0, dtype=np.float64)
        height, width = self.size
        b = self.boxes.astype(np.float64)
        return np.clip((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (height * width), 0.0, 1.0)

    def max_area(self) -> float:
        """Largest normalized box area; NaN without boxes (such an image is in no area bin)."""
        areas = self.normalized_areas()
        return float(areas.max()) if areas.size else float("nan")

    def official_max_area(self) -> float:
        """``max(BoxInfo.areas)`` of the official loader: unclipped (x1-x0)*(y1-y0)/(H*W) of
        ``source_boxes`` (of ``boxes`` when the paper rules built them), 0 without boxes."""
        boxes = self.boxes if self.source_boxes is None else self.source_boxes
        if len(boxes) == 0:
            return 0.0
        height, width = self.size
        b = np.asarray(boxes, dtype=np.float64)
        return float(np.max((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (height * width)))


@dataclass(frozen=True, eq=False)
class BoxSet:
    """Boxes for every requested image, and which images the source knew nothing about."""

    source: str
    images: dict[str, ImageBoxes]
    missing: list[str]
    rules: BoxRules = "paper"

    def __getitem__(self, image_id: str) -> ImageBoxes:
        return self.images[image_id]

    def max_areas(self, image_ids: Sequence[str], convention: AreaConvention = "paper") -> np.ndarray:
        """Per-image largest normalized area, the input of the mR@K metrics.

        ``"paper"``: of the clipped boxes, NaN without boxes (in no bin). ``"official"``: as
        the official run bins images: :meth:`ImageBoxes.official_max_area` (0 when the image's
        annotation exists but keeps no box, so it counts in bin 0) and -1 for an image absent
        from a source the official rules read (its annotation file is missing: in no bin). A
        COCO instances or detector file has no file per image: there, an image without boxes
        is in bin 0 too.
        """
        if convention == "paper":
            return np.array([self.images[i].max_area() for i in image_ids], dtype=np.float64)
        if convention != "official":
            raise ConfigError(f"unknown area convention {convention!r}; expected paper or official")
        absent = set(self.missing) if self.rules == "official" else set()
        return np.array(
            [-1.0 if i in absent else self.images[i].official_max_area() for i in image_ids],
            dtype=np.float64,
        )

    @property
    def num_without_boxes(self) -> int:
        return sum(1 for b in self.images.values() if len(b.boxes) == 0)

    def summary(self) -> str:
        total = len(self.images)
        boxes = sum(len(b.boxes) for b in self.images.values())
        rules = " (official-code rules)" if self.rules == "official" else ""
        return (
            f"{self.source}{rules}: {total} images, {boxes} boxes; {self.num_without_boxes} "
            f"images without boxes ({len(self.missing)} of them absent from the source)"
        )


def image_size(path: PathLike) -> tuple[int, int]:
    """(height, width) of an image file, read from its header without decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width


# ---------------------------------------------------------------- Flickr30K Entities


@dataclass(frozen=True, eq=False)
class EntitiesAnnotation:
    """One Flickr30K Entities XML file: deduplicated boxes and which chains they belong to."""

    boxes: ImageBoxes
    chain_boxes: dict[str, list[int]]  # chain id -> indices into boxes.boxes
    scene_chains: list[str]
    nobox_chains: list[str]


def read_entities_xml(path: PathLike) -> EntitiesAnnotation:
    """Parse ``Annotations/<id>.xml``; raises :class:`BoxFormatError` naming a malformed file.

    Coordinates are 1-based inclusive pixel indices, converted to edges as
    ``(xmin - 1, ymin - 1, xmax, ymax)``. Objects flagged ``<nobndbox>1`` or ``<scene>1``
    have no box. A box shared by several chains (several ``<name>`` tags, or the same box
    repeated under several objects) is kept once.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
        height = int(_text(root, "size/height"))
        width = int(_text(root, "size/width"))
        unique: dict[tuple[float, ...], int] = {}
        chain_boxes: dict[str, list[int]] = {}
        scene, nobox = [], []
        for obj in root.findall("object"):
            chains = [(n.text or "").strip() for n in obj.findall("name")]
            is_scene, is_nobox = _flag(obj, "scene"), _flag(obj, "nobndbox")
            scene += chains if is_scene else []
            nobox += chains if is_nobox else []
            if is_scene or is_nobox or obj.find("bndbox") is None:
                continue
            xmin, ymin, xmax, ymax = (float(_text(obj, f"bndbox/{t}")) for t in _CORNERS)
            box = _clip((xmin - 1, ymin - 1, xmax, ymax), height, width)
            if box is None:
                continue
            index = unique.setdefault(box, len(unique))
            for chain in chains:
                if index not in chain_boxes.setdefault(chain, []):
                    chain_boxes[chain].append(index)
    except (ET.ParseError, ValueError) as error:
        raise BoxFormatError(f"{path}: not a valid Flickr30K Entities XML ({error})") from error
    return EntitiesAnnotation(
        boxes=ImageBoxes(_as_array(list(unique)), (height, width)),
        chain_boxes=chain_boxes,
        scene_chains=scene,
        nobox_chains=nobox,
    )


def flickr30k_entities_boxes(annotations_dir: PathLike, image_ids: Iterable[str], rules: BoxRules = "paper") -> BoxSet:
    """Boxes of Flickr30K Entities for ``image_ids``, looked up in the full Annotations folder.

    With ``rules="official"`` each image also needs ``Sentences/<id>.txt`` beside
    ``Annotations/`` (see :func:`read_official_entities`); an image missing either file has
    no boxes and is counted as absent, as the official loader does.
    """
    _check_rules(rules)
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise BoxFormatError(
            f"missing Flickr30K Entities annotations folder: {annotations_dir} "
            "(expected <flickr30k_entities>/Annotations/<flickr id>.xml)"
        )
    sentences_dir = annotations_dir.parent / "Sentences"
    if rules == "official" and not sentences_dir.is_dir():
        raise BoxFormatError(
            f"official box rules need the Flickr30K Entities Sentences folder beside "
            f"Annotations: missing {sentences_dir}"
        )
    images, missing = {}, []
    for image_id in image_ids:
        path = annotations_dir / f"{image_id}.xml"
        sentences = sentences_dir / f"{image_id}.txt"
        if rules == "paper" and path.is_file():
            images[image_id] = read_entities_xml(path).boxes
        elif rules == "official" and path.is_file() and sentences.is_file():
            images[image_id] = read_official_entities(path, sentences)
        else:
            logger.debug("no Flickr30K Entities annotation %s", path)
            images[image_id] = _no_boxes()
            missing.append(image_id)
    return _finish("flickr30k-entities", images, missing, annotations_dir, rules)


@dataclass(frozen=True)
class EntitiesPhrase:
    """One ``[/EN#<chain>/<type>[/<type>...] words]`` phrase of a Sentences file."""

    chain_id: str
    types: tuple[str, ...]
    text: str
    first_word_index: int


@dataclass(frozen=True)
class EntitiesSentence:
    text: str
    phrases: list[EntitiesPhrase]


_PHRASE = re.compile(r"\[/EN#(\d+)/(\S+) ([^\]]*)\]")


def parse_entities_sentence(line: str) -> EntitiesSentence:
    """Split one annotated caption into its plain text and its phrases."""
    words: list[str] = []
    phrases = []
    position = 0
    for match in _PHRASE.finditer(line):
        words += line[position : match.start()].split()
        phrase_words = match.group(3).split()
        phrases.append(
            EntitiesPhrase(
                chain_id=match.group(1),
                types=tuple(match.group(2).split("/")),
                text=" ".join(phrase_words),
                first_word_index=len(words),
            )
        )
        words += phrase_words
        position = match.end()
    words += line[position:].split()
    return EntitiesSentence(text=" ".join(words), phrases=phrases)


def read_entities_sentences(path: PathLike) -> list[EntitiesSentence]:
    """Parse ``Sentences/<id>.txt``: one annotated caption per non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            return [parse_entities_sentence(line) for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise BoxFormatError(f"{path}: not UTF-8 text ({error})") from error


# ---------------------------------------------------------------- COCO sources


def coco_entities_boxes(
    json_path: PathLike,
    image_ids: Iterable[str],
    image_paths: Mapping[str, PathLike],
    rules: BoxRules = "paper",
) -> BoxSet:
    """Boxes of COCO Entities: per image, the union of its captions' grounded detections.

    Paper rules: detections are deduplicated by detection id. Official rules: see
    :func:`official_coco_entities`. Sizes come from ``image_paths`` headers (the official
    code read them from a ``coco_img_shapes.json`` that was never published). The release
    file (~400 MB) is read whole, once.
    """
    _check_rules(rules)
    data = _read_json(json_path)
    if not isinstance(data, dict):
        raise BoxFormatError(f"{json_path}: expected {{image id: {{caption: {{...}}}}}}")
    by_id = {normalize_image_id(k): v for k, v in data.items()}
    images, missing = {}, []
    for image_id in image_ids:
        if image_id not in by_id:
            images[image_id] = _no_boxes()
            if not (rules == "official" and image_id in OFFICIAL_COCO_EMPTY_IDS):
                missing.append(image_id)
            continue
        extract = official_coco_entities if rules == "official" else _coco_entities_by_det_id
        try:
            source = extract(by_id[image_id])
        except (AttributeError, KeyError, TypeError, ValueError, re.error) as error:
            raise BoxFormatError(
                f"{json_path}: image {image_id}: expected captions with 'detections' "
                f"{{class: [[det_id, [x1, y1, x2, y2]], ...]}} ({error!r})"
            ) from error
        if rules == "official":
            size = _known_size(image_id, json_path, image_paths=image_paths) if source else None
            images[image_id] = _official_image_boxes(source, size)
        else:
            images[image_id] = _image_boxes(source, image_id, json_path, image_paths=image_paths)
    return _finish("coco-entities", images, missing, json_path, rules)


def _coco_entities_by_det_id(captions: Mapping[str, Any]) -> list[tuple[float, ...]]:
    """Paper rules: the image's detections over all captions, each detection id once."""
    detections: dict[Any, tuple[float, ...]] = {}
    for caption in captions.values():
        for per_class in caption["detections"].values():
            for det_id, box in per_class:
                detections.setdefault(det_id, tuple(float(v) for v in box))
    return list(detections.values())


def coco_instances_boxes(json_path: PathLike, image_ids: Iterable[str], include_crowd: bool = False) -> BoxSet:
    """Ground-truth boxes of COCO instances annotations (sizes from its ``images`` list)."""
    data = _read_json(json_path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise BoxFormatError(f"{json_path}: expected a COCO instances file with 'images' and 'annotations'")
    try:
        sizes = {normalize_image_id(im["id"]): (int(im["height"]), int(im["width"])) for im in data["images"]}
    except (KeyError, TypeError, ValueError) as error:
        raise BoxFormatError(f"{json_path}: 'images' need 'id', 'height', 'width' ({error!r})") from error
    annotations = [a for a in data["annotations"] if include_crowd or not a.get("iscrowd", 0)]
    return _from_xywh("coco-instances", json_path, annotations, image_ids, sizes=sizes)


def detector_boxes(
    json_path: PathLike,
    image_ids: Iterable[str],
    image_paths: Optional[Mapping[str, PathLike]] = None,
    score_threshold: float = 0.0,
    max_boxes: Optional[int] = None,
) -> BoxSet:
    """Detections in COCO results format with ``score >= score_threshold``, at most
    ``max_boxes`` per image (highest scores first). Sizes come from the image headers.

    An image with no detection is not an error: it simply gets no boxes.
    """
    data = _read_json(json_path)
    if not isinstance(data, list):
        raise BoxFormatError(f"{json_path}: expected a COCO results list [{{'image_id', 'bbox', 'score'}}, ...]")
    if max_boxes is not None and max_boxes < 1:
        raise ConfigError(f"max_boxes must be >= 1 or None, got {max_boxes}")
    try:
        kept = [d for d in data if float(d["score"]) >= score_threshold]
    except (KeyError, TypeError, ValueError) as error:
        raise BoxFormatError(f"{json_path}: a detection has no numeric 'score' ({error!r})") from error
    kept.sort(key=lambda d: -float(d["score"]))  # stable: equal scores keep file order
    return _from_xywh("detector", json_path, kept, image_ids, image_paths=image_paths, max_boxes=max_boxes)


def load_boxes(
    kind: str, path: PathLike, dataset: RetrievalDataset, rules: BoxRules = "paper", **options: Any
) -> BoxSet:
    """Boxes of ``kind`` (one of :data:`BOX_SOURCES`) for every image of ``dataset``.

    ``path`` is the Entities Annotations folder or the JSON file; ``rules`` (``"paper"`` or
    ``"official"``) applies to the two Entities sources, the only ones the official code read
    (COCO instances and detector files load as they are under either); ``options`` go to the
    source (``score_threshold``, ``max_boxes``, ``include_crowd``).
    """
    _check_rules(rules)
    paths = dict(zip(dataset.image_ids, dataset.image_paths))
    if kind == "flickr30k-entities":
        return flickr30k_entities_boxes(path, dataset.image_ids, rules=rules, **options)
    if kind == "coco-entities":
        return coco_entities_boxes(path, dataset.image_ids, paths, rules=rules, **options)
    if kind == "coco-instances":
        return coco_instances_boxes(path, dataset.image_ids, **options)
    if kind == "detector":
        return detector_boxes(path, dataset.image_ids, paths, **options)
    raise ConfigError(f"unknown box source {kind!r}; expected one of {BOX_SOURCES}")


# ---------------------------------------------------------------- official-code rules
#
# The official code (NEC-N-SOGI/query-perturbation @ c6e0294) reads Flickr30K Entities with
# ``entities_loader.read_annotation_file`` + ``read_sentence_file`` and
# ``box_loader.ImageBoxLoader.get_box_info``; COCO Entities is first converted to the same
# XML + Sentences layout by ``data/prepare_coco_entities.py``, then read the same way.

# Karpathy-test images missing from coco_entities_release.json: the official preparation
# writes an empty annotation for them (area 0, bin 0) instead of none (area -1, no bin).
OFFICIAL_COCO_EMPTY_IDS = frozenset({"413120", "201732", "463918", "132317", "35498"})

_BRACKETS = re.compile(r"\[.*?\]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what reading a text file back splits lines on


def read_official_entities(xml_path: PathLike, sentences_path: PathLike) -> ImageBoxes:
    """One Flickr30K Entities image's boxes under the official loader's rules.

    Reproduced: every object with a ``<bndbox>`` is a box (no nobndbox/scene flags read),
    coordinates ``float(text) - 1`` on all four corners; boxes are grouped by the
    ``",".join`` of their ``<name>`` texts (groups in first-appearance order) and a group is
    kept only if one of its names is a phrase id of the Sentences file
    (:func:`_official_phrase_ids`); repeated boxes are kept (no de-duplication).
    Then, as for every qpert source, boxes are clipped to the image and boxes left with no
    area are dropped (the official code kept zero-area boxes); ``source_boxes`` keeps the
    unclipped official boxes, degenerate ones included, for the official areas.
    """
    try:
        root = ET.parse(xml_path).getroot()
        size = (int(_text(root, "size/height")), int(_text(root, "size/width")))
        groups: dict[str, list[tuple[float, ...]]] = {}
        for obj in root.findall("object"):
            bndbox = obj.find("bndbox")
            if bndbox is None:
                continue
            name = ",".join(str(n.text) for n in obj.findall("name"))
            box = tuple(float(_text(bndbox, corner)) - 1 for corner in _CORNERS)
            groups.setdefault(name, []).append(box)
    except (ET.ParseError, ValueError) as error:
        raise BoxFormatError(f"{xml_path}: not a valid Flickr30K Entities XML ({error})") from error
    try:
        with open(sentences_path, encoding="utf-8") as f:
            phrase_ids = _official_phrase_ids(f, sentences_path)
    except UnicodeDecodeError as error:
        raise BoxFormatError(f"{sentences_path}: not UTF-8 text ({error})") from error
    kept = [box for name, boxes in groups.items() if any(n in phrase_ids for n in name.split(",")) for box in boxes]
    return _official_image_boxes(kept, size)


def official_coco_entities(captions: Mapping[str, Any]) -> list[tuple[float, ...]]:
    """One COCO Entities image's boxes (unclipped xyxy pixels) under the official rules.

    Reproduces ``prepare_coco_entities.py`` then the loader: captions and their detections
    are walked in file order and a box is dropped when its L1 distance to a box already kept
    for the image is < 0.1 -- except the image's second box, which the official code never
    compares (its check raises on the one-row array and the error is swallowed). A box's
    name is its noun's index; each caption's Sentences line is the caption without
    ``[...]`` in which each of its nouns, in turn, is replaced via ``\\b<noun>s?\\b`` by
    ``[/EN#<index>/hoge <noun>]``; a box is kept only if its noun's index is among the
    phrase ids of the image's lines (its noun matched one of the image's captions). Boxes
    are grouped by noun in first-appearance order and shifted by -1 on all four corners.
    The official indices come from an unordered set; here they follow first appearance,
    which gives the same boxes unless a noun could match the inserted markup itself.
    """
    index: dict[str, str] = {}
    for annotation in captions.values():
        for noun in annotation["detections"]:
            index.setdefault(noun, str(len(index)))
    lines = []
    for caption, annotation in captions.items():
        text = _BRACKETS.sub("", caption)
        for noun in annotation["detections"]:
            text = re.sub(rf"\b{noun}s?\b", f"[/EN#{index[noun]}/hoge {noun}]", text)
        lines.append(text + " .\n")
    phrase_ids = _official_phrase_ids(_LINE_BREAK.split("".join(lines)), "COCO Entities captions")

    kept: list[np.ndarray] = []
    groups: dict[str, list[tuple[float, ...]]] = {}
    for annotation in captions.values():
        for noun, detections in annotation["detections"].items():
            for _det_id, box in detections:
                coords = np.asarray(box, dtype=np.float64)
                if coords.shape != (4,):
                    raise ValueError(f"box {box!r} is not [x1, y1, x2, y2]")
                if len(kept) >= 2 and np.abs(np.stack(kept) - coords).sum(1).min() < 0.1:
                    continue
                kept.append(coords)
                groups.setdefault(index[noun], []).append(tuple(float(v) - 1 for v in box))
    return [box for name, boxes in groups.items() if name in phrase_ids for box in boxes]


def _official_phrase_ids(lines: Iterable[str], where: Any) -> set[str]:
    """Entity ids of ``read_sentence_file``: per line, every ``[...]``'s text between the
    first ``#`` and the next ``/``."""
    ids = set()
    for line in lines:
        for phrase in _BRACKETS.findall(line):
            if "#" not in phrase:
                raise BoxFormatError(f"{where}: phrase {phrase!r} has no '#<entity id>'")
            ids.add(phrase.split("#")[1].split("/")[0])
    return ids


def _official_image_boxes(source: list[tuple[float, ...]], size: Optional[tuple[int, int]]) -> ImageBoxes:
    """Clip the official boxes to the image (dropping empty ones); keep the originals."""
    if not source:
        return ImageBoxes(_as_array([]), size, np.zeros((0, 4), dtype=np.float64))
    height, width = size
    clipped = [c for c in (_clip(b, height, width) for b in source) if c is not None]
    return ImageBoxes(_as_array(clipped), size, np.asarray(source, dtype=np.float64))


# ---------------------------------------------------------------- helpers

_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def _from_xywh(
    source: str,
    json_path: PathLike,
    entries: list[dict[str, Any]],
    image_ids: Iterable[str],
    sizes: Optional[Mapping[str, tuple[int, int]]] = None,
    image_paths: Optional[Mapping[str, PathLike]] = None,
    max_boxes: Optional[int] = None,
) -> BoxSet:
    """Group COCO-style ``{"image_id", "bbox": [x, y, w, h]}`` entries by image, in order."""
    wanted: dict[str, list[tuple[float, ...]]] = {i: [] for i in image_ids}
    try:
        for entry in entries:
            image_id = normalize_image_id(entry["image_id"])
            if image_id in wanted:
                x, y, w, h = (float(v) for v in entry["bbox"])
                wanted[image_id].append((x, y, x + w, y + h))
    except (KeyError, TypeError, ValueError) as error:
        raise BoxFormatError(
            f"{json_path}: expected entries {{'image_id', 'bbox': [x, y, w, h]}} ({error!r})"
        ) from error
    images, missing = {}, []
    for image_id, boxes in wanted.items():
        if boxes:
            images[image_id] = _image_boxes(boxes, image_id, json_path, sizes, image_paths, max_boxes)
        else:
            images[image_id] = _no_boxes()
            missing.append(image_id)
    return _finish(source, images, missing, json_path)


def _image_boxes(
    boxes: list[tuple[float, ...]],
    image_id: str,
    source_path: PathLike,
    sizes: Optional[Mapping[str, tuple[int, int]]] = None,
    image_paths: Optional[Mapping[str, PathLike]] = None,
    max_boxes: Optional[int] = None,
) -> ImageBoxes:
    """Clip to the image (size from ``sizes``, else the image header), then keep ``max_boxes``."""
    height, width = _known_size(image_id, source_path, sizes, image_paths)
    clipped = [c for c in (_clip(b, height, width) for b in boxes) if c is not None]
    return ImageBoxes(_as_array(clipped[:max_boxes]), (height, width))


def _known_size(
    image_id: str,
    source_path: PathLike,
    sizes: Optional[Mapping[str, tuple[int, int]]] = None,
    image_paths: Optional[Mapping[str, PathLike]] = None,
) -> tuple[int, int]:
    if sizes is not None and image_id in sizes:
        return sizes[image_id]
    if image_paths is not None and image_id in image_paths:
        return image_size(image_paths[image_id])
    raise BoxFormatError(f"{source_path}: the size of image {image_id} is unknown; pass its image path")


def _clip(box: tuple[float, ...], height: int, width: int) -> Optional[tuple[float, ...]]:
    x0, y0, x1, y1 = box
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _as_array(boxes: list[tuple[float, ...]]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _no_boxes() -> ImageBoxes:
    return ImageBoxes(_as_array([]), None)


def _finish(
    source: str,
    images: dict[str, ImageBoxes],
    missing: list[str],
    where: Any,
    rules: BoxRules = "paper",
) -> BoxSet:
    if missing:
        logger.warning(
            "%s: %d of %d images have no entry in %s (e.g. %s); they get no boxes",
            source, len(missing), len(images), where, missing[:3],
        )  # fmt: skip
    return BoxSet(source, images, missing, rules)


def _check_rules(rules: str) -> None:
    if rules not in BOX_RULES:
        raise ConfigError(f"unknown box rules {rules!r}; expected one of {BOX_RULES}")


def _text(element: ET.Element, path: str) -> str:
    value = element.findtext(path)
    if value is None or not value.strip():
        raise ValueError(f"missing <{path}>")
    return value.strip()


def _flag(element: ET.Element, tag: str) -> bool:
    return (element.findtext(tag) or "0").strip() not in ("", "0")


def _read_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise BoxFormatError(f"missing box file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise BoxFormatError(f"{path}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise BoxFormatError(f"{path}: not UTF-8 text ({error}); box files are UTF-8 JSON") from error
