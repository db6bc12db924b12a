"""A plain port of the official Q-Pert code's data and metric logic (NEC-N-SOGI/query-perturbation
@ c6e0294), the reference for qpert's ``rules="official"`` / ``convention="official"``.

It shares no code with qpert and keeps the official steps as they are: COCO Entities is converted
to XML + Sentences files on disk (``data/prepare_coco_entities.py``), every image is then read
back through the Flickr30K Entities loader (``entities_loader`` + ``ImageBoxLoader.get_box_info``),
and metrics come from argsort ranks (``BaseTask.report_metrics`` and friends). Only what the
tests need is ported; the changes are marked ``PORT:``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.dom import minidom

import numpy as np

# ------------------------------------------------------------------ entities_loader.py


def read_sentence_file(path: str) -> dict[str, list[str]]:
    """Entity id -> the phrases naming it, from the Sentences file beside the XML."""
    sentence_path = path.replace("Annotations", "Sentences").replace(".xml", ".txt")
    with open(sentence_path) as f:
        lines = f.readlines()
    phrases: dict[str, set[str]] = {}
    for line in lines:
        for bracket in re.findall(r"\[.*?\]", line):
            entity = bracket.split("#")[1].split("/")[0]
            words = " ".join(bracket.split(" ")[1:])[:-1]
            phrases.setdefault(entity, set()).add(words)
    return {k: list(v) for k, v in phrases.items()}


def read_annotation_file(xml_path: str) -> tuple[int, int, dict[str, list[list[float]]]]:
    root = ET.parse(xml_path).getroot()
    for item in root.find("size"):
        if item.tag == "width":
            width = int(str(item.text))
        elif item.tag == "height":
            height = int(str(item.text))
    boxes: dict[str, list[list[float]]] = {}
    for obj in root.findall("object"):
        bndbox = obj.findall("bndbox")
        if len(bndbox) == 0:
            continue
        name = ",".join(str(n.text) for n in obj.findall("name"))
        boxes.setdefault(name, [])
        boxes[name].append([float(str(bndbox[0].find(t).text)) - 1 for t in ("xmin", "ymin", "xmax", "ymax")])
    return height, width, boxes


# ------------------------------------------------------------------ box_loader.py


@dataclass
class BoxInfo:
    areas: list[float]
    boxes: list[list[float]]
    img_size: list[int]


def get_box_info(xml_path: Path) -> BoxInfo:
    try:
        height, width, boxes = read_annotation_file(str(xml_path))
        sentences = read_sentence_file(str(xml_path))
    except FileNotFoundError:
        return BoxInfo(areas=[-1.0], boxes=[], img_size=[0, 0])
    boxes = {k: v for k, v in boxes.items() if any(list(map(sentences.get, k.split(","))))}
    image_area = height * width
    flat = [b for group in boxes.values() for b in group]
    areas = [(b[2] - b[0]) * (b[3] - b[1]) / image_area for b in flat]
    if len(areas) == 0:
        areas = [0]
    return BoxInfo(areas=areas, boxes=flat, img_size=[height, width])


# ------------------------------------------------------------------ prepare_coco_entities.py


def coco_stem(image_id: str) -> str:
    return f"COCO_val2014_{int(image_id):012d}"


def _pretty(element: ET.Element) -> str:
    rough = minidom.parseString(ET.tostring(element, "utf-8")).toprettyxml(indent="\t")
    return re.sub(r"[\t ]+\n", "", rough).replace(">\n\n\t<", ">\n\t<")


def export_captions(image_ann: dict, image_id: str, root: Path) -> dict:
    nouns = []
    for v in image_ann.values():
        nouns.extend(v["detections"].keys())
    noun2idx = {noun: i for i, noun in enumerate(list(set(nouns)))}
    captions = []
    for caption, v in image_ann.items():
        caption = re.sub(r"\[.*?\]", "", caption)
        for noun in v["detections"]:
            caption = re.sub(rf"\b{noun}s?\b", f"[/EN#{noun2idx[noun]}/hoge {noun}]", caption)
        captions.append(caption + " .\n")
    with open(root / f"{coco_stem(image_id)}.txt", "w") as f:
        f.writelines(captions)
    return noun2idx


def export_annotations(image_id: str, img_shapes: dict, image_ann: dict, noun2idx: dict, root: Path) -> None:
    xml = ET.Element("annotation")
    ET.SubElement(xml, "filename").text = f"{coco_stem(image_id)}.jpg"
    size = ET.SubElement(xml, "size")
    ET.SubElement(size, "width").text = str(img_shapes[image_id][0])
    ET.SubElement(size, "height").text = str(img_shapes[image_id][1])
    ET.SubElement(size, "depth").text = "3"
    pushed = None
    for v in image_ann.values():
        for det_class, boxes in v["detections"].items():
            for box in boxes:
                try:  # the official bare try: the second box's check raises and is skipped
                    if np.abs(pushed - np.asarray(box[1])).sum(1).min() < 0.1:
                        continue
                except Exception:
                    pass
                obj = ET.SubElement(xml, "object")
                ET.SubElement(obj, "name").text = str(noun2idx[det_class])
                bndbox = ET.SubElement(obj, "bndbox")
                for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box[1]):
                    ET.SubElement(bndbox, tag).text = str(value)
                pushed = np.asarray(box[1]) if pushed is None else np.vstack((pushed, box[1]))
    with open(root / f"{coco_stem(image_id)}.xml", "w") as f:
        f.write(_pretty(xml))


MISSING_FROM_RELEASE = ["413120", "201732", "463918", "132317", "35498"]


def prepare_coco_entities(release: dict, img_shapes: dict, captions: dict, root: Path) -> None:
    """``img_shapes[id] = [width, height]``; ``captions[id]``: the dataset's captions of the
    missing images. PORT: only the missing images in ``captions`` (the dataset) are written."""
    sentences, annotations = root / "Sentences", root / "Annotations"
    sentences.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    for image_id, image_ann in release.items():
        noun2idx = export_captions(image_ann, image_id, sentences)
        export_annotations(image_id, img_shapes, image_ann, noun2idx, annotations)
    for image_id in MISSING_FROM_RELEASE:
        if image_id in captions:
            with open(sentences / f"{coco_stem(image_id)}.txt", "w") as f:
                f.writelines([c + " \n" for c in captions[image_id]])
            export_annotations(image_id, img_shapes, {}, [], annotations)


# ------------------------------------------------------------------ base_task.py


def compute_metrics(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    """0-based ranks in; PORT: returns None for a direction with no query (the official code
    divides by zero there)."""
    out = {}
    for name, ranks in (("txt", i2t_ranks), ("img", t2i_ranks)):
        if len(ranks) == 0:
            out.update({f"{name}_r{k}": None for k in (1, 5, 10)} | {f"{name}_mdr": None})
            continue
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{name}_mdr"] = np.median(ranks + 1)
    return out


def bin_indexes(areas, thresholds, img2txt, num_texts) -> tuple[list, list]:
    """Per bin: the I2T query (image) indexes and the T2I query (text) indexes."""
    expanded_area = np.zeros(num_texts)  # np.zeros_like(t2i_ranks): float64
    for k, v in img2txt.items():
        for i in v:
            expanded_area[i] = areas[k]
    i2t_indexes, t2i_indexes = [], []
    for i in range(len(thresholds) - 1):
        small, large = thresholds[i], thresholds[i + 1]
        # PORT: numpy 1.24 (the official lock file) compares a float64 scalar with the
        # float32 ``areas`` in float32 (value-based casting); numpy >= 2 would compare in
        # float64, so the cast is written out. ``expanded_area`` is float64 in both.
        small32, large32 = areas.dtype.type(small), areas.dtype.type(large)
        i2t_indexes.append(np.where((small32 <= areas) & (areas < large32))[0])
        t2i_indexes.append(np.where((small <= expanded_area) & (expanded_area < large))[0])
    return i2t_indexes, t2i_indexes


def report_metrics_on_size(i2t_ranks, t2i_ranks, areas, thresholds, img2txt) -> list[dict]:
    i2t_indexes, t2i_indexes = bin_indexes(areas, thresholds, img2txt, len(t2i_ranks))
    return [compute_metrics(i2t_ranks[i2t], t2i_ranks[t2i]) for i2t, t2i in zip(i2t_indexes, t2i_indexes)]


def report_metrics(
    scores_i2t, scores_t2i, txt2img, img2txt, areas, thresholds=np.linspace(0, 1.0, 11)
) -> tuple[dict, list[dict], np.ndarray, np.ndarray]:
    """Overall metrics, per-bin metrics, then (PORT: returned for the tests) the 0-based I2T
    and T2I ranks."""
    i2t_ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        i2t_ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    t2i_ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        t2i_ranks[index] = np.where(inds == txt2img[index])[0][0]
    areas = np.array(areas, dtype=np.float32)
    return (
        compute_metrics(i2t_ranks, t2i_ranks),
        report_metrics_on_size(i2t_ranks, t2i_ranks, areas, thresholds, img2txt),
        i2t_ranks,
        t2i_ranks,
    )
