"""Box rules and metric conventions of the official code (``rules="official"``, ``convention="official"``),
against a plain port of its loaders (tests/official_port.py) and of its ``BaseTask`` metrics."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from official_port import get_box_info, prepare_coco_entities
from qpert.data.boxes import BoxFormatError, coco_entities_boxes, flickr30k_entities_boxes
from qpert.eval.metrics import area_bins, median_rank, retrieval_metrics


def entities_object(names, box=None, flag=None):
    tags = "".join(f"<name>{n}</name>" for n in names)
    if box is not None:
        tags += "<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) + \
                "</bndbox>"
    if flag:
        tags += f"<{flag}>1</{flag}>"
    return f"<object>{tags}</object>"


def write_entities(root: Path, image_id: str, size, objects, sentences=None) -> None:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Sentences").mkdir(parents=True, exist_ok=True)
    w, h = size
    (root / "Annotations" / f"{image_id}.xml").write_text(
        f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
        f"<depth>3</depth></size>{''.join(objects)}</annotation>")
    if sentences is not None:
        (root / "Sentences" / f"{image_id}.txt").write_text("\n".join(sentences) + "\n")


def multiset(boxes) -> Counter:
    return Counter(tuple(round(float(v), 4) for v in b) for b in boxes)


@pytest.fixture
def entities(tmp_path):
    root = tmp_path / "flickr30k_entities"
    write_entities(root, "100", (500, 375), [
        entities_object(["18", "22"], (1, 11, 100, 200)),
        entities_object(["23"], (1, 11, 100, 200)),       # the same box again under another entity: kept twice
        entities_object(["19"], (401, 301, 480, 375)),
        entities_object(["19"], (201, 101, 210, 110)),
        entities_object(["25"], (50, 50, 300, 300)),      # entity 25 is in no sentence: dropped
        entities_object(["20"], flag="nobndbox"), entities_object(["0"], flag="scene"),
    ], ["[/EN#18/people A man] and [/EN#22/people his son] sit on [/EN#19/other a bench] .",
        "[/EN#23/people Two people] rest ."])
    write_entities(root, "200", (100, 80), [entities_object(["7"], (3, 4, 90, 70))],
                   ["[/EN#8/other Something else] is here ."])  # annotated, but no box is mentioned
    write_entities(root, "300", (100, 80), [entities_object(["7"], (3, 4, 90, 70))])  # no Sentences file
    return root, ["100", "200", "300", "400"]  # 400: no file at all


def test_flickr30k_entities_official_rules_match_the_port(entities):
    root, ids = entities
    boxes = flickr30k_entities_boxes(root / "Annotations", ids, rules="official")
    assert boxes.rules == "official" and "official rules" in boxes.summary()
    for image_id in ids:
        port = get_box_info(root / "Annotations" / f"{image_id}.xml")
        assert multiset(boxes[image_id].boxes) == multiset(port.boxes), image_id
        expected = max(port.areas)
        got = boxes.max_areas([image_id], convention="official")[0]
        assert (np.isnan(got) and expected == -1.0) or got == pytest.approx(expected), image_id
    assert len(boxes["100"].boxes) == 4  # the repeated box twice, entity 25's box dropped
    assert boxes.max_areas(["200"], convention="official")[0] == 0.0  # first bin and small-object subset
    assert np.isnan(boxes.max_areas(["200"])[0])                      # the paper's convention: in no bin


def test_flickr30k_entities_paper_rules_unchanged(entities):
    root, ids = entities
    paper = flickr30k_entities_boxes(root / "Annotations", ids)
    assert paper.rules == "paper" and paper.missing == ["400"]
    np.testing.assert_allclose(paper["100"].boxes[0], [0, 10, 100, 200])  # 1-based inclusive -> pixel edges
    assert len(paper["100"].boxes) == 4  # the repeated box once, entity 25's box kept


def test_official_rules_need_the_sentences(tmp_path):
    write_entities(tmp_path / "e", "1", (10, 10), [])
    (tmp_path / "e/Sentences").rmdir()
    with pytest.raises(BoxFormatError, match="Sentences"):
        flickr30k_entities_boxes(tmp_path / "e/Annotations", ["1"], rules="official")


RELEASE = {
    "11": {
        "two dogs chase a ball [in the park]": {"detections": {
            "dog": [[1, [10.0, 10.0, 50.0, 40.0]], [2, [10.0, 10.0, 50.0, 40.0]]],  # 2nd box = 1st: kept (quirk)
            "ball": [[3, [60.5, 20.25, 70.0, 30.0]]],
            "grass": [[4, [0.0, 50.0, 100.0, 80.0]]],                              # "grass" not in the caption
        }},
        "a dog with a ball": {"detections": {
            "dog": [[5, [10.02, 10.03, 50.01, 40.0]]],     # within 0.1 (L1) of a written box: skipped
            "ball": [[6, [60.5, 20.25, 70.0, 31.0]]],      # 1.0 away: kept
        }},
    },
    "12": {"a red kite": {"detections": {"bird": [[7, [5.0, 5.0, 20.0, 20.0]]]}}},  # noun never in its caption
}
SIZES = {"11": (120, 90), "12": (64, 48), "13": (40, 30)}  # (width, height); 13 is not in the release


def test_coco_entities_official_rules_match_the_port(tmp_path):
    release = tmp_path / "coco_entities_release.json"
    release.write_text(json.dumps(RELEASE))
    paths = {}
    for image_id, (w, h) in SIZES.items():
        paths[image_id] = tmp_path / f"COCO_val2014_{int(image_id):012d}.jpg"
        Image.new("RGB", (w, h)).save(paths[image_id])
    prepare_coco_entities(release, {k: list(v) for k, v in SIZES.items()}, tmp_path / "port", missing_data=["13"])
    boxes = coco_entities_boxes(release, list(SIZES), paths, rules="official")
    for image_id in SIZES:
        port = get_box_info(tmp_path / "port/Annotations" / f"COCO_val2014_{int(image_id):012d}.xml")
        assert multiset(boxes[image_id].boxes) == multiset(port.boxes), image_id
        assert boxes.max_areas([image_id], convention="official")[0] == pytest.approx(max(port.areas)), image_id
    assert len(boxes["11"].boxes) == 4 and len(boxes["12"].boxes) == 0
    paper = coco_entities_boxes(release, list(SIZES), paths)
    assert len(paper["11"].boxes) == 6  # by detection id: the near-duplicate and the grass kept, no -1


def test_official_metric_conventions_match_base_task():
    """Median and bins as ``BaseTask.compute_metrics`` / ``report_metircs_on_size`` compute them."""
    ranks = np.array([1, 2, 3, 6])
    assert median_rank(ranks) == 2.0 and median_rank(ranks, "official") == float(np.median((ranks - 1) + 1)) == 2.5
    areas = np.array([0.0, 0.1, 0.3, 0.7, 0.9999999, 1.0, np.nan, np.float32(0.1) * 3])
    thresholds = np.linspace(0, 1.0, 11)
    areas32 = areas.astype(np.float32)
    expected = np.full(len(areas), -1)
    for b in range(10):
        expected[np.where((thresholds[b] <= areas32) & (areas32 < thresholds[b + 1]))[0]] = b
    got = area_bins(areas, "official")
    assert np.array_equal(got, expected)
    assert got[5] == -1 and area_bins(areas[:6], "paper")[5] == 9  # 1.0: in no bin / in the last bin
    assert got[3] == 6 and area_bins(areas, "paper")[3] == 7         # 0.7 in float32 is just below the 0.7 edge


def test_retrieval_metrics_record_their_convention():
    scores = np.array([[0.9, 0.1, 0.5, 0.2], [0.1, 0.8, 0.4, 0.7]])  # T2I ranks 1, 2, 2, 1
    official = retrieval_metrics(scores, np.array([0, 0, 1, 1]), np.array([0.0, 1.0]), convention="official")
    assert official.to_dict()["convention"] == "official" and official.num_images_without_boxes == 1
    assert official.t2i["median_rank"] == 1.5 and retrieval_metrics(
        scores, np.array([0, 0, 1, 1]), np.array([0.0, 1.0])).t2i["median_rank"] == 1.0
