import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from qpert.data.box_sources import (
    BoxFormatError,
    coco_entities_boxes,
    coco_instances_boxes,
    detector_boxes,
    flickr30k_entities_boxes,
    image_size,
    load_boxes,
    parse_entities_sentence,
    read_entities_sentences,
    read_entities_xml,
)
from qpert.data.datasets import RetrievalDataset

# Flickr30K Entities Annotations/<id>.xml as released: PASCAL-VOC style, 1-based inclusive
# pixel coordinates, one <name> per chain, box-less objects flagged with nobndbox/scene.
ENTITIES_XML = """<annotation>
<filename>1007129816.jpg</filename>
<size>
<width>500</width>
<height>375</height>
<depth>3</depth>
</size>
<object>
<name>18</name>
<name>22</name>
<bndbox>
<xmin>1</xmin>
<ymin>11</ymin>
<xmax>100</xmax>
<ymax>200</ymax>
</bndbox>
</object>
<object>
<name>23</name>
<bndbox>
<xmin>1</xmin>
<ymin>11</ymin>
<xmax>100</xmax>
<ymax>200</ymax>
</bndbox>
</object>
<object>
<name>19</name>
<bndbox>
<xmin>401</xmin>
<ymin>301</ymin>
<xmax>520</xmax>
<ymax>375</ymax>
</bndbox>
</object>
<object>
<name>19</name>
<bndbox>
<xmin>201</xmin>
<ymin>101</ymin>
<xmax>210</xmax>
<ymax>110</ymax>
</bndbox>
</object>
<object>
<name>20</name>
<nobndbox>1</nobndbox>
<scene>0</scene>
</object>
<object>
<name>21</name>
<nobndbox>0</nobndbox>
<scene>1</scene>
</object>
</annotation>
"""

SENTENCES = (
    "[/EN#18/people A man] with [/EN#19/bodyparts pierced ears] is wearing "
    "[/EN#20/other glasses] and [/EN#21/clothing an orange hat] .\n"
    "[/EN#255543/people A woman] holds [/EN#255545/bodyparts/people a man 's arm] near "
    "[/EN#0/notvisual each other] .\n"
    "\n"
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_jpeg(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 200, 30)).save(path)
    return path


# ------------------------------------------------------------------ Flickr30K Entities


def test_entities_xml_boxes_chains_and_dedup(tmp_path):
    ann = read_entities_xml(write(tmp_path / "1007129816.xml", ENTITIES_XML))
    assert ann.boxes.size == (375, 500)
    assert ann.boxes.boxes.dtype == np.float32
    np.testing.assert_array_equal(
        ann.boxes.boxes,
        [[0, 10, 100, 200], [400, 300, 500, 375], [200, 100, 210, 110]],  # 2nd clipped to width
    )
    assert ann.chain_boxes == {"18": [0], "22": [0], "23": [0], "19": [1, 2]}
    assert ann.nobox_chains == ["20"] and ann.scene_chains == ["21"]
    np.testing.assert_allclose(ann.boxes.normalized_areas(), [100 * 190 / 187500, 100 * 75 / 187500, 100 / 187500])
    assert ann.boxes.max_area() == pytest.approx(100 * 190 / 187500)


def test_entities_missing_xml_is_a_counted_logged_skip(tmp_path, caplog):
    write(tmp_path / "Annotations/1007129816.xml", ENTITIES_XML)
    with caplog.at_level(logging.WARNING, logger="qpert.data.box_sources"):
        boxes = flickr30k_entities_boxes(tmp_path / "Annotations", ["1007129816", "123", "456"])
    assert boxes.missing == ["123", "456"]
    assert boxes.num_without_boxes == 2
    assert boxes["123"].boxes.shape == (0, 4) and boxes["123"].size is None
    assert len(boxes["1007129816"].boxes) == 3
    assert "2 of 3 images" in caplog.text
    assert "2 images without boxes (2 of them absent" in boxes.summary()
    areas = boxes.max_areas(["123", "1007129816"])
    assert np.isnan(areas[0]) and areas[1] == pytest.approx(0.10133, abs=1e-5)


def test_entities_malformed_xml_names_the_file(tmp_path):
    bad = write(tmp_path / "Annotations/42.xml", "<annotation><size><width>5</width>")
    with pytest.raises(BoxFormatError, match=str(bad)):
        flickr30k_entities_boxes(tmp_path / "Annotations", ["42"])
    no_size = write(tmp_path / "7.xml", "<annotation><object><name>1</name></object></annotation>")
    with pytest.raises(BoxFormatError, match=r"7\.xml.*size/height"):
        read_entities_xml(no_size)


def test_entities_missing_folder(tmp_path):
    with pytest.raises(BoxFormatError, match=r"annotations folder: .*nowhere"):
        flickr30k_entities_boxes(tmp_path / "nowhere", ["1"])


def test_entities_sentences(tmp_path):
    sentences = read_entities_sentences(write(tmp_path / "1007129816.txt", SENTENCES))
    assert len(sentences) == 2
    first = sentences[0]
    assert first.text == "A man with pierced ears is wearing glasses and an orange hat ."
    assert [(p.chain_id, p.types, p.text, p.first_word_index) for p in first.phrases] == [
        ("18", ("people",), "A man", 0),
        ("19", ("bodyparts",), "pierced ears", 3),
        ("20", ("other",), "glasses", 7),
        ("21", ("clothing",), "an orange hat", 9),
    ]
    second = sentences[1].phrases
    assert second[1].types == ("bodyparts", "people") and second[1].text == "a man 's arm"
    assert second[2].chain_id == "0" and second[2].types == ("notvisual",)


def test_entities_sentence_without_phrases():
    assert parse_entities_sentence("Nothing here .").phrases == []


# ------------------------------------------------------------------ COCO Entities


def test_coco_entities_union_over_captions(tmp_path):
    release = {
        "452113": {
            "a woman riding a horse": {
                "det_sequences": [None, "woman", None, None, "horse"],
                "noun_chunks": [["a woman", "woman"], ["a horse", "horse"]],
                "detections": {
                    "woman": [[9, [10.5, 20.0, 30.0, 40.0]], [12, [0.0, 0.0, 5.0, 5.0]]],
                    "horse": [[0, [20.0, 10.0, 70.0, 47.0]]],  # x1 beyond width 64: clipped
                },
                "split": "test",
            },
            "a person on a horse": {
                "detections": {"person": [[9, [10.5, 20.0, 30.0, 40.0]]]},
                "split": "test",
            },
        }
    }
    path = write(tmp_path / "coco_entities_release.json", json.dumps(release))
    jpeg = write_jpeg(tmp_path / "img.jpg", 64, 48)
    boxes = coco_entities_boxes(path, ["452113", "368117"], {"452113": jpeg})
    got = boxes["452113"]
    assert got.size == (48, 64)
    np.testing.assert_allclose(got.boxes, [[10.5, 20, 30, 40], [0, 0, 5, 5], [20, 10, 64, 47]])
    assert boxes.missing == ["368117"]


# ------------------------------------------------------------------ COCO instances


def test_coco_instances_boxes(tmp_path):
    instances = {
        "images": [{"id": 452113, "width": 640, "height": 480, "file_name": "x.jpg"}],
        "annotations": [
            {"image_id": 452113, "bbox": [10, 20, 30, 40], "iscrowd": 0, "category_id": 1},
            {"image_id": 452113, "bbox": [0, 0, 640, 480], "iscrowd": 1, "category_id": 1},
            {"image_id": 999, "bbox": [1, 1, 2, 2], "iscrowd": 0, "category_id": 3},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    path = write(tmp_path / "instances_val2014.json", json.dumps(instances))
    boxes = coco_instances_boxes(path, ["452113"])
    np.testing.assert_array_equal(boxes["452113"].boxes, [[10, 20, 40, 60]])
    assert boxes["452113"].size == (480, 640)
    with_crowd = coco_instances_boxes(path, ["452113"], include_crowd=True)
    assert with_crowd["452113"].max_area() == 1.0


# ------------------------------------------------------------------ detector output


@pytest.fixture
def detections(tmp_path):
    results = [
        {"image_id": 452113, "bbox": [0, 0, 10, 10], "score": 0.3, "category_id": 1},
        {"image_id": 452113, "bbox": [5, 5, 10, 10], "score": 0.9, "category_id": 2},
        {"image_id": 452113, "bbox": [1, 1, 2, 2], "score": 0.6, "category_id": 3},
        {"image_id": 452113, "bbox": [2, 2, 2, 2], "score": 0.05, "category_id": 3},
        {"image_id": "COCO_val2014_000000368117", "bbox": [50, 40, 30, 20], "score": 0.8},
        {"image_id": 77, "bbox": [1, 1, 1, 1], "score": 0.99, "category_id": 1},
    ]
    path = write(tmp_path / "detections.json", json.dumps(results))
    paths = {
        "452113": write_jpeg(tmp_path / "a.jpg", 64, 48),
        "368117": write_jpeg(tmp_path / "b.jpg", 60, 50),
        "555": write_jpeg(tmp_path / "c.jpg", 8, 8),
    }
    return path, paths


def test_detector_threshold_and_max_boxes(detections):
    path, paths = detections
    boxes = detector_boxes(path, ["452113", "368117", "555"], paths, 0.1, 2)
    np.testing.assert_array_equal(boxes["452113"].boxes, [[5, 5, 15, 15], [1, 1, 3, 3]])
    np.testing.assert_array_equal(boxes["368117"].boxes, [[50, 40, 60, 50]])  # clipped to 60
    assert boxes["368117"].size == (50, 60)
    assert boxes.missing == ["555"] and boxes["555"].boxes.shape == (0, 4)
    everything = detector_boxes(path, ["452113"], paths)
    assert len(everything["452113"].boxes) == 4


def test_detector_sizes_come_from_headers_without_decoding(detections, monkeypatch):
    path, paths = detections

    def no_decoding(self):
        raise AssertionError("image pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert image_size(paths["452113"]) == (48, 64)
    assert detector_boxes(path, ["368117"], paths)["368117"].size == (50, 60)


def test_detector_errors(detections, tmp_path):
    path, _ = detections
    with pytest.raises(BoxFormatError, match="size of image 452113 is unknown"):
        detector_boxes(path, ["452113"])
    with pytest.raises(BoxFormatError, match="missing box file"):
        detector_boxes(tmp_path / "nope.json", ["1"])
    bad = write(tmp_path / "bad.json", json.dumps([{"image_id": 1, "score": 0.5}]))
    with pytest.raises(BoxFormatError, match="bbox"):
        detector_boxes(bad, ["1"], {"1": "x.jpg"})
    with pytest.raises(BoxFormatError, match="COCO results list"):
        detector_boxes(write(tmp_path / "d.json", "{}"), ["1"])


def test_load_boxes_for_a_dataset(detections):
    path, paths = detections
    ids = ["452113", "368117"]
    dataset = RetrievalDataset(
        name="coco",
        split="test",
        image_ids=ids,
        file_stems=[f"COCO_val2014_{int(i):012d}" for i in ids],
        image_paths=[Path(paths[i]) for i in ids],
        texts=["a", "b"],
        text_to_image=np.array([0, 1]),
        image_to_texts=[[0], [1]],
    )
    boxes = load_boxes("detector", path, dataset, score_threshold=0.5)
    np.testing.assert_allclose(boxes.max_areas(dataset.image_ids), [100 / (48 * 64), 100 / (50 * 60)])
    with pytest.raises(ValueError, match="unknown box source"):
        load_boxes("yolo", path, dataset)
