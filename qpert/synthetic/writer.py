"""Write synthetic scenes in the on-disk formats of Flickr30K and Flickr30K Entities.

The files are exactly what :func:`qpert.data.datasets.load_dataset` ("flickr30k") and
:func:`qpert.data.box_sources.flickr30k_entities_boxes` read for the real datasets, so the whole
evaluation path, loaders included, runs on the synthetic benchmark unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union
from xml.etree import ElementTree as ET

from PIL import Image

from ..data.layout import DataLayout
from .scenes import Scene, SceneConfig, make_scenes

PathLike = Union[str, Path]


@dataclass(frozen=True)
class SyntheticLayout:
    """Where a written split lives: pass ``root`` to ``load_dataset`` and ``entities`` to the box source."""

    root: Path
    annotation_file: Path
    images: Path
    entities: Path  # the Flickr30K Entities ``Annotations`` folder
    sentences: Path  # the Flickr30K Entities ``Sentences`` folder


def layout(root: PathLike, split: str) -> SyntheticLayout:
    data = DataLayout(root)
    return SyntheticLayout(
        data.root,
        data.annotation_file("flickr30k", split),
        data.image_folder("flickr30k"),
        data.entities_annotations,
        data.entities_sentences,
    )


def write_flickr30k(
    root: PathLike, seed: int, count: int, split: str = "test", config: SceneConfig = SceneConfig()
) -> SyntheticLayout:
    """Generate ``count`` scenes of stream ``seed`` and write them as the Flickr30K ``split``."""
    return write_scenes(root, make_scenes(seed, count, config), split)


def write_scenes(root: PathLike, scenes: Sequence[Scene], split: str = "test") -> SyntheticLayout:
    """PNG images (lossless: boxes stay pixel-exact), a BLIP/LAVIS annotation file, Entities XML and sentences."""
    out = layout(root, split)
    for folder in (out.annotation_file.parent, out.images, out.entities, out.sentences):
        folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for scene in scenes:
        name = f"{scene.image_id}.png"
        Image.fromarray(scene.image).save(out.images / name)
        entries.append({"image": f"{out.images.name}/{name}", "caption": list(scene.captions)})
        (out.entities / f"{scene.image_id}.xml").write_bytes(entities_xml(scene))
        (out.sentences / f"{scene.image_id}.txt").write_text("".join(f"{s}\n" for s in entities_sentences(scene)))
    out.annotation_file.write_text(json.dumps(entries, indent=1))
    return out


def entities_xml(scene: Scene) -> bytes:
    """PASCAL-VOC XML as in Flickr30K Entities: one chain per object, 1-based inclusive corners."""
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{scene.image_id}.png"
    size = ET.SubElement(root, "size")
    height, width, depth = scene.image.shape
    for tag, value in (("width", width), ("height", height), ("depth", depth)):
        ET.SubElement(size, tag).text = str(value)
    for chain, obj in enumerate(scene.objects, start=1):
        element = ET.SubElement(root, "object")
        ET.SubElement(element, "name").text = str(chain)
        box = ET.SubElement(element, "bndbox")
        x0, y0, x1, y1 = obj.box
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
    return ET.tostring(root)


def entities_sentences(scene: Scene) -> list[str]:
    """Captions with each object's words marked ``[/EN#<chain>/other ...]`` as in Entities ``Sentences``."""
    lines = []
    for text in scene.captions:
        for chain, obj in enumerate(scene.objects, start=1):
            text = text.replace(obj.name, f"[/EN#{chain}/other {obj.name}]", 1)
        lines.append(text)
    return lines
