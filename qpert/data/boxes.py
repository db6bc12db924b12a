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

Flickr30K Entities and COCO Entities also load by ``rules="official"``: the box rules of the
official Q-Pert code (NEC-N-SOGI/query-perturbation c6e0294, ``entities_loader.py``,
``box_loader.py``, ``data/prepare_coco_entities.py``), which produced the published numbers.
"""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from qpert.data.datasets import PathLike, RetrievalDataset, normalize_image_id

logger = logging.getLogger(__name__)

BOX_SOURCES = ("flickr30k-entities", "coco-entities", "coco-instances", "detector")
Rules = Literal["paper", "official"]


class BoxFormatError(ValueError):
    """A box annotation file is missing or does not have the expected format."""


@dataclass(frozen=True, eq=False)
class ImageBoxes:
    """Boxes of one image: float32 (M, 4) xyxy pixels and the image size (height, width).

    ``size`` is None only for an image without boxes whose size no source told us.
    """

    boxes: np.ndarray
    size: Optional[tuple[int, int]]

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


@dataclass(frozen=True, eq=False)
class BoxSet:
    """Boxes for every requested image, and which images the source knew nothing about.

    ``missing``: images with no entry in the source (logged); ``unannotated``: those of them
    that have no annotation file of their own (Flickr30K Entities), which the official code
    leaves out of every area bin; ``rules``: the rules that read the source.
    """

    source: str
    images: dict[str, ImageBoxes]
    missing: list[str]
    rules: str = "paper"
    unannotated: frozenset[str] = frozenset()

    def __getitem__(self, image_id: str) -> ImageBoxes:
        return self.images[image_id]

    def max_areas(self, image_ids: Sequence[str], convention: Rules = "paper") -> np.ndarray:
        """Per-image largest normalized area, the input of the mR@K metrics.

        An image without boxes is NaN (in no bin) by the paper's convention; the official code
        gives it area 0 (first bin, small-object subset) unless it has no annotation file.
        """
        def area(image_id: str) -> float:
            largest = self.images[image_id].max_area()
            if convention == "official" and np.isnan(largest) and image_id not in self.unannotated:
                return 0.0
            return largest

        return np.array([area(i) for i in image_ids], dtype=np.float64)

    @property
    def num_without_boxes(self) -> int:
        return sum(1 for b in self.images.values() if len(b.boxes) == 0)

    def summary(self) -> str:
        total = len(self.images)
        boxes = sum(len(b.boxes) for b in self.images.values())
        rules = " (official rules)" if self.rules == "official" else ""
        return (
            f"{self.source}{rules}: {total} images, {boxes} boxes; {self.num_without_boxes} images "
            f"without boxes ({len(self.missing)} of them absent from the source)"
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


def flickr30k_entities_boxes(
    annotations_dir: PathLike, image_ids: Iterable[str], rules: Rules = "paper"
) -> BoxSet:
    """Boxes of Flickr30K Entities for ``image_ids``, looked up in the full Annotations folder.

    ``rules="official"`` reads them as the official Q-Pert code does (:func:`read_entities_official`),
    which also needs ``Sentences/`` beside ``Annotations/``.
    """
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise BoxFormatError(
            f"missing Flickr30K Entities annotations folder: {annotations_dir} "
            "(expected <flickr30k_entities>/Annotations/<flickr id>.xml)"
        )
    sentences_dir = annotations_dir.parent / "Sentences"
    if rules == "official" and not sentences_dir.is_dir():
        raise BoxFormatError(
            f"the official rules keep only boxes whose entity a caption mentions: they need {sentences_dir} "
            "(Flickr30K Entities Sentences/<flickr id>.txt) beside Annotations/"
        )
    images, missing = {}, []
    for image_id in image_ids:
        path = annotations_dir / f"{image_id}.xml"
        found = None
        if rules == "official":
            found = read_entities_official(path, sentences_dir / f"{image_id}.txt")
        elif path.is_file():
            found = read_entities_xml(path).boxes
        if found is None:
            logger.debug("no Flickr30K Entities annotation %s", path)
            images[image_id] = _no_boxes()
            missing.append(image_id)
        else:
            images[image_id] = found
    return _finish("flickr30k-entities", images, missing, annotations_dir, rules, unannotated=missing)


def read_entities_official(xml_path: Path, sentences_path: Path) -> Optional[ImageBoxes]:
    """One image's boxes as the official code reads them (``read_annotation_file`` +
    ``read_sentence_file`` + ``ImageBoxLoader.get_box_info``); None when either file is missing.

    Every corner is ``value - 1`` (xmax and ymax too), boxes are grouped by the object's joined
    ``<name>`` ids and a group is kept only if one of its ids is mentioned in a caption, and a box
    repeated under several objects stays repeated (it counts again in the mean over objects).
    As everywhere in qpert, boxes are clipped to the image and zero-area boxes are dropped.
    """
    if not (xml_path.is_file() and sentences_path.is_file()):
        return None
    try:
        root = ET.parse(xml_path).getroot()
        height = int(_text(root, "size/height"))
        width = int(_text(root, "size/width"))
        groups: dict[str, list[tuple[float, ...]]] = {}
        for obj in root.findall("object"):
            bndbox = obj.find("bndbox")
            if bndbox is None:
                continue
            name = ",".join(str(n.text) for n in obj.findall("name"))
            groups.setdefault(name, []).append(tuple(float(_text(bndbox, t)) - 1 for t in _CORNERS))
    except (ET.ParseError, ValueError) as error:
        raise BoxFormatError(f"{xml_path}: not a valid Flickr30K Entities XML ({error})") from error
    with open(sentences_path, encoding="utf-8") as f:
        mentioned = _entity_ids(f.read())
    boxes = [b for name, group in groups.items() if set(name.split(",")) & mentioned for b in group]
    clipped = [c for c in (_clip(b, height, width) for b in boxes) if c is not None]
    return ImageBoxes(_as_array(clipped), (height, width))


def _entity_ids(text: str) -> set[str]:
    """Entity ids of the ``[/EN#<id>/...]`` phrases, found as ``read_sentence_file`` finds them."""
    return {phrase.split("#")[1].split("/")[0] for phrase in re.findall(r"\[.*?\]", text) if "#" in phrase}


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
    with open(path, encoding="utf-8") as f:
        return [parse_entities_sentence(line) for line in f if line.strip()]


# ---------------------------------------------------------------- COCO sources


def coco_entities_boxes(
    json_path: PathLike,
    image_ids: Iterable[str],
    image_paths: Mapping[str, PathLike],
    rules: Rules = "paper",
) -> BoxSet:
    """Boxes of COCO Entities: per image, the union of its captions' grounded detections.

    Detections are deduplicated by detection id; sizes come from ``image_paths`` headers.
    ``rules="official"`` keeps what the official preparation keeps (:func:`coco_entities_official`).
    The release file (~400 MB) is read whole, once.
    """
    data = _read_json(json_path)
    if not isinstance(data, dict):
        raise BoxFormatError(f"{json_path}: expected {{image id: {{caption: {{...}}}}}}")
    by_id = {normalize_image_id(k): v for k, v in data.items()}
    images, missing = {}, []
    for image_id in image_ids:
        if image_id not in by_id:
            images[image_id] = _no_boxes()
            missing.append(image_id)
            continue
        try:
            if rules == "official":
                boxes = coco_entities_official(by_id[image_id])
            else:
                detections: dict[Any, tuple[float, ...]] = {}
                for caption in by_id[image_id].values():
                    for per_class in caption["detections"].values():
                        for det_id, box in per_class:
                            detections.setdefault(det_id, tuple(float(v) for v in box))
                boxes = list(detections.values())
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as error:
            raise BoxFormatError(
                f"{json_path}: image {image_id}: expected captions with 'detections' "
                f"{{class: [[det_id, [x1, y1, x2, y2]], ...]}} ({error!r})"
            ) from error
        images[image_id] = _image_boxes(boxes, image_id, json_path, image_paths=image_paths)
    # The official preparation writes an empty annotation for each image the release lacks (five of
    # the Karpathy test images): with no file missing, they are in the first area bin, not in none.
    return _finish("coco-entities", images, missing, json_path, rules)


def coco_entities_official(captions: Mapping[str, Any]) -> list[tuple[float, ...]]:
    """One image's boxes as ``data/prepare_coco_entities.py`` writes them and the loader reads them.

    Detections of all captions in file order, each skipped when its L1 distance to a box already
    written is below 0.1 (the official check only works once two boxes are written, so the second
    box is never skipped); a box is kept if its noun matched a caption (``\\b<noun>s?\\b``) and so
    appears in the written Sentences; every corner is then ``value - 1``.
    """
    nouns = sorted({noun for caption in captions.values() for noun in caption["detections"]})
    index = {noun: str(i) for i, noun in enumerate(nouns)}
    mentioned: set[str] = set()
    for text, caption in captions.items():
        text = re.sub(r"\[.*?\]", "", text)
        for noun in caption["detections"]:
            text = re.sub(rf"\b{noun}s?\b", f"[/EN#{index[noun]}/hoge {noun}]", text)
        mentioned |= _entity_ids(text)
    written: list[tuple[np.ndarray, str]] = []
    for caption in captions.values():
        for noun, detections in caption["detections"].items():
            for detection in detections:
                box = np.asarray(detection[1], dtype=np.float64).reshape(4)
                if len(written) >= 2 and min(np.abs(b - box).sum() for b, _ in written) < 0.1:
                    continue
                written.append((box, index[noun]))
    return [tuple(float(v) - 1 for v in box) for box, name in written if name in mentioned]


def coco_instances_boxes(
    json_path: PathLike, image_ids: Iterable[str], include_crowd: bool = False
) -> BoxSet:
    """Ground-truth boxes of COCO instances annotations (sizes from its ``images`` list)."""
    data = _read_json(json_path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise BoxFormatError(
            f"{json_path}: expected a COCO instances file with 'images' and 'annotations'"
        )
    try:
        sizes = {
            normalize_image_id(im["id"]): (int(im["height"]), int(im["width"]))
            for im in data["images"]
        }
    except (KeyError, TypeError, ValueError) as error:
        raise BoxFormatError(
            f"{json_path}: 'images' need 'id', 'height', 'width' ({error!r})"
        ) from error
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
        raise BoxFormatError(
            f"{json_path}: expected a COCO results list [{{'image_id', 'bbox', 'score'}}, ...]"
        )
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
    try:
        kept = [d for d in data if float(d["score"]) >= score_threshold]
    except (KeyError, TypeError, ValueError) as error:
        raise BoxFormatError(
            f"{json_path}: a detection has no numeric 'score' ({error!r})"
        ) from error
    kept.sort(key=lambda d: -float(d["score"]))  # stable: equal scores keep file order
    return _from_xywh(
        "detector", json_path, kept, image_ids, image_paths=image_paths, max_boxes=max_boxes
    )


def load_boxes(
    kind: str, path: PathLike, dataset: RetrievalDataset, rules: Rules = "paper", **options: Any
) -> BoxSet:
    """Boxes of ``kind`` (one of :data:`BOX_SOURCES`) for every image of ``dataset``.

    ``path`` is the Entities Annotations folder or the JSON file; ``options`` go to the
    source (``score_threshold``, ``max_boxes``, ``include_crowd``). ``rules`` changes how the two
    Entities sources are read; COCO instances and detector files have no official rules of their own.
    """
    paths = dict(zip(dataset.image_ids, dataset.image_paths))
    if kind == "flickr30k-entities":
        return flickr30k_entities_boxes(path, dataset.image_ids, rules, **options)
    if kind == "coco-entities":
        return coco_entities_boxes(path, dataset.image_ids, paths, rules, **options)
    if kind == "coco-instances":
        return coco_instances_boxes(path, dataset.image_ids, **options)
    if kind == "detector":
        return detector_boxes(path, dataset.image_ids, paths, **options)
    raise ValueError(f"unknown box source {kind!r}; expected one of {BOX_SOURCES}")


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
            images[image_id] = _image_boxes(
                boxes, image_id, json_path, sizes, image_paths, max_boxes
            )
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
    if sizes is not None and image_id in sizes:
        size = sizes[image_id]
    elif image_paths is not None and image_id in image_paths:
        size = image_size(image_paths[image_id])
    else:
        raise BoxFormatError(
            f"{source_path}: the size of image {image_id} is unknown; pass its image path"
        )
    height, width = size
    clipped = [c for c in (_clip(b, height, width) for b in boxes) if c is not None]
    return ImageBoxes(_as_array(clipped[:max_boxes]), (height, width))


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
    rules: Rules = "paper",
    unannotated: Sequence[str] = (),
) -> BoxSet:
    if missing:
        logger.warning(
            "%s: %d of %d images have no entry in %s (e.g. %s); they get no boxes",
            source, len(missing), len(images), where, missing[:3],
        )  # fmt: skip
    return BoxSet(source, images, missing, rules, frozenset(unannotated))


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
