"""Box loading under the official Q-Pert code's rules, checked against a port of that code."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import helpers.official_loader_port as port
import numpy as np
import pytest
from PIL import Image

from qpert.data.box_sources import BoxFormatError, coco_entities_boxes, flickr30k_entities_boxes, load_boxes
from qpert.data.datasets import RetrievalDataset
from qpert.eval.api import resolve_boxes

SHARED_IDS = Path("/work/shared/data/flickr30k_entities/test.txt")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def entities_xml(width: int, height: int, objects: list[tuple[list[str], tuple | None]]) -> str:
    """Annotations/<id>.xml as released: tab-indented PASCAL VOC, 1-based inclusive corners;
    an object without a box carries the nobndbox flag."""
    parts = [
        f"<annotation>\n\t<filename>x.jpg</filename>\n\t<size>\n\t\t<width>{width}</width>\n"
        f"\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
    ]
    for names, box in objects:
        parts.append("\t<object>\n" + "".join(f"\t\t<name>{n}</name>\n" for n in names))
        if box is None:
            parts.append("\t\t<nobndbox>1</nobndbox>\n")
        else:
            corners = "".join(f"\t\t\t<{t}>{v}</{t}>\n" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
            parts.append(f"\t\t<bndbox>\n{corners}\t\t</bndbox>\n")
        parts.append("\t</object>\n")
    return "".join(parts) + "</annotation>\n"


def multiset(boxes) -> Counter:
    return Counter(tuple(float(v) for v in b) for b in np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def clip(boxes: list[list[float]], height: int, width: int) -> list[tuple[float, ...]]:
    """What every qpert source does after reading: clip to the image, drop empty boxes."""
    out = []
    for x0, y0, x1, y1 in boxes:
        x0, x1 = np.clip([x0, x1], 0, width)
        y0, y1 = np.clip([y0, y1], 0, height)
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1, y1))
    return out


def assert_same_as_port(box_set, infos: dict[str, port.BoxInfo]) -> None:
    """Per image: the official boxes in the official order, qpert's clipped boxes, the max area."""
    ids = list(infos)
    for image_id, info in infos.items():
        got = box_set[image_id]
        source = got.source_boxes if got.source_boxes is not None else np.zeros((0, 4))
        assert multiset(source) == multiset(info.boxes), image_id
        np.testing.assert_array_equal(source.reshape(-1, 4), np.asarray(info.boxes).reshape(-1, 4))
        if info.boxes:
            height, width = info.img_size
            assert multiset(got.boxes) == multiset(np.float32(clip(info.boxes, height, width))), image_id
        else:
            assert got.boxes.shape == (0, 4)
    expected = [max(infos[i].areas) for i in ids]
    np.testing.assert_array_equal(box_set.max_areas(ids, convention="official"), expected)


# ------------------------------------------------------------------ Flickr30K Entities

SENTENCES = (
    "[/EN#18/people A man] with [/EN#19/bodyparts pierced ears] is wearing "
    "[/EN#20/other glasses] and [/EN#21/clothing an orange hat] .\n"
    "[/EN#23/people A man] holds [/EN#24/bodyparts/other a thin stick] near [/EN#0/notvisual it] .\n"
    "\n"
)
OBJECTS = [
    (["18", "22"], (1, 11, 100, 200)),
    (["23"], (1, 11, 100, 200)),  # the same box under another chain: kept twice
    (["19"], (401, 301, 520, 375)),  # beyond the 500-pixel width: clipped by qpert
    (["19"], (201, 101, 210, 110)),
    (["19"], (201, 101, 210, 110)),  # repeated in its own chain: kept twice
    (["30"], (1, 1, 500, 375)),  # chain 30 is in no sentence: dropped
    (["20"], None),
    (["24"], (50, 50, 50, 60)),  # 1 pixel wide: zero width once shifted by -1
]


@pytest.fixture
def entities(tmp_path):
    root = tmp_path / "flickr30k_entities"
    write(root / "Annotations/1000092795.xml", entities_xml(500, 375, OBJECTS))
    write(root / "Sentences/1000092795.txt", SENTENCES)
    write(root / "Annotations/1001773457.xml", entities_xml(333, 500, [(["7"], (5, 5, 50, 50))]))
    write(root / "Sentences/1001773457.txt", "[/EN#8/people Two dogs] run .\n")  # no kept box
    write(root / "Annotations/1002674143.xml", entities_xml(500, 400, [(["1"], (5, 5, 50, 50))]))
    # 1002674143 has no Sentences file, 123 has no XML: both absent
    return root


def test_official_flickr_boxes_by_hand(entities):
    boxes = flickr30k_entities_boxes(entities / "Annotations", ["1000092795"], rules="official")
    image = boxes["1000092795"]
    np.testing.assert_array_equal(
        image.source_boxes,
        [
            [0, 10, 99, 199],
            [0, 10, 99, 199],
            [400, 300, 519, 374],
            [200, 100, 209, 109],
            [200, 100, 209, 109],
            [49, 49, 49, 59],
        ],
    )
    np.testing.assert_array_equal(
        image.boxes,
        [[0, 10, 99, 199], [0, 10, 99, 199], [400, 300, 500, 374], [200, 100, 209, 109], [200, 100, 209, 109]],
    )  # the zero-width box is dropped, the one beyond the image clipped
    assert boxes.max_areas(["1000092795"], "official")[0] == 99 * 189 / (500 * 375)
    assert boxes.rules == "official" and "official-code rules" in boxes.summary()


def test_official_flickr_matches_the_port(entities):
    ids = ["1000092795", "1001773457", "1002674143", "123"]
    boxes = flickr30k_entities_boxes(entities / "Annotations", ids, rules="official")
    infos = {i: port.get_box_info(entities / f"Annotations/{i}.xml") for i in ids}
    assert [max(infos[i].areas) for i in ids[1:]] == [0, -1.0, -1.0]
    assert_same_as_port(boxes, infos)
    assert boxes.missing == ["1002674143", "123"]
    assert boxes["1001773457"].size == (500, 333)


def random_entities(root: Path, ids: list[str], seed: int) -> None:
    """Random images in the real format: shared, repeated, degenerate and out-of-image boxes,
    chains named in the sentences or not, some files missing."""
    rng = np.random.default_rng(seed)
    for image_id in ids:
        width, height = int(rng.integers(50, 120)), int(rng.integers(50, 120))
        objects: list[tuple[list[str], tuple | None]] = []
        for _ in range(int(rng.integers(0, 9))):
            names = [str(n) for n in rng.choice(8, size=int(rng.integers(1, 3)), replace=False)]
            if objects and objects[-1][1] is not None and rng.random() < 0.3:
                box = objects[-1][1]
            elif rng.random() < 0.1:
                box = None
            else:
                x0, y0 = int(rng.integers(1, width)), int(rng.integers(1, height))
                box = (x0, y0, x0 + int(rng.integers(0, 40)), y0 + int(rng.integers(0, 40)))
            objects.append((names, box))
        if rng.random() > 0.1:
            write(root / f"Annotations/{image_id}.xml", entities_xml(width, height, objects))
        if rng.random() > 0.1:
            named = rng.choice(8, size=int(rng.integers(0, 7)), replace=False)
            text = " ".join(f"[/EN#{n}/people thing {n}]" for n in named)
            write(root / f"Sentences/{image_id}.txt", f"A photo of {text} .\nNothing .\n")


@pytest.mark.parametrize("seed", [0, 1])
def test_official_flickr_matches_the_port_on_random_annotations(tmp_path, seed):
    ids = SHARED_IDS.read_text().split()[:60] if SHARED_IDS.is_file() else [str(10**9 + i) for i in range(60)]
    root = tmp_path / "flickr30k_entities"
    (root / "Annotations").mkdir(parents=True)
    random_entities(root, ids, seed)
    boxes = flickr30k_entities_boxes(root / "Annotations", ids, rules="official")
    infos = {i: port.get_box_info(root / f"Annotations/{i}.xml") for i in ids}
    assert_same_as_port(boxes, infos)
    # the comparison is not vacuous: many boxes, repeated ones, dropped degenerate ones, both empty kinds
    assert sum(len(i.boxes) for i in infos.values()) > 50
    assert any(max(multiset(i.boxes).values(), default=0) > 1 for i in infos.values())
    assert any(len(boxes[i].boxes) < len(infos[i].boxes) for i in ids)
    assert {max(i.areas) for i in infos.values()} >= {-1.0, 0}


def test_paper_rules_unchanged_on_the_same_files(entities):
    paper = flickr30k_entities_boxes(entities / "Annotations", ["1000092795", "123"])
    assert paper.rules == "paper" and "official" not in paper.summary()
    assert paper["1000092795"].source_boxes is None
    np.testing.assert_array_equal(
        paper["1000092795"].boxes,
        [[0, 10, 100, 200], [400, 300, 500, 375], [200, 100, 210, 110], [0, 0, 500, 375], [49, 49, 50, 60]],
    )
    areas = paper.max_areas(["1000092795", "123"])
    assert areas[0] == 1.0 and np.isnan(areas[1])


def test_official_flickr_needs_the_sentences_folder(tmp_path):
    write(tmp_path / "Annotations/1.xml", entities_xml(10, 10, [(["1"], (1, 1, 5, 5))]))
    with pytest.raises(BoxFormatError, match="Sentences folder beside Annotations"):
        flickr30k_entities_boxes(tmp_path / "Annotations", ["1"], rules="official")
    write(tmp_path / "Sentences/1.txt", "a [broken phrase] .\n")
    with pytest.raises(BoxFormatError, match=r"1\.txt: phrase '\[broken phrase\]'"):
        flickr30k_entities_boxes(tmp_path / "Annotations", ["1"], rules="official")
    with pytest.raises(ValueError, match="unknown box rules 'offical'"):
        flickr30k_entities_boxes(tmp_path / "Annotations", ["1"], rules="offical")


# ------------------------------------------------------------------ COCO Entities

RELEASE = {
    "452113": {
        "two dogs play with a frisbee": {
            "detections": {
                "dog": [[1, [10.0, 10.0, 30.0, 30.0]], [2, [10.02, 10.03, 30.0, 30.0]]],  # 2nd never compared
                "frisbee": [[3, [40.0, 5.0, 50.0, 15.0]]],
            }
        },
        "a man throws a ball to a dog": {
            "detections": {
                "man": [[4, [0.0, 0.0, 20.0, 47.5]]],
                "ball": [[5, [10.04, 10.0, 30.0, 30.0]]],  # L1 0.04 from the first dog box: dropped
                "dog": [[1, [10.0, 10.0, 30.0, 30.0]]],  # repeated: dropped
                "person": [[6, [30.0, 20.0, 40.0, 30.0]]],  # "person" is in no caption: dropped
            }
        },
        "a tennis racket and a [racket] on the grass": {
            "detections": {
                "tennis racket": [[7, [5.0, 5.0, 25.0, 20.0]]],
                "racket": [[8, [1.0, 1.0, 3.0, 3.0]]],  # only matches inside the tennis racket markup
                "grass": [[9, [60.0, 40.0, 70.0, 50.0]], [10, [60.1, 40.1, 70.0, 50.0]]],  # L1 0.2: kept
            }
        },
    },
    "368117": {"a photo of something": {"detections": {"cat": [[1, [1.0, 1.0, 9.0, 9.0]]]}}},
    "999999": {"a bus": {"detections": {"bus": [[1, [1, 2, 3, 4]]]}}},  # not in the dataset
}
SIZES = {"452113": (64, 48), "368117": (30, 20), "413120": (40, 30), "999999": (10, 10)}  # width, height
DATASET_IDS = ["452113", "368117", "413120", "77"]  # 413120: Karpathy test, not in the release


@pytest.fixture
def coco(tmp_path):
    path = write(tmp_path / "coco_entities_release.json", json.dumps(RELEASE))
    paths = {}
    for image_id, (width, height) in SIZES.items():
        paths[image_id] = tmp_path / f"images/{port.coco_stem(image_id)}.jpg"
        paths[image_id].parent.mkdir(exist_ok=True)
        Image.new("RGB", (width, height)).save(paths[image_id])
    return path, paths


def test_official_coco_boxes_by_hand(coco):
    path, paths = coco
    boxes = coco_entities_boxes(path, DATASET_IDS, paths, rules="official")
    expected = [
        [9, 9, 29, 29],
        [10.02 - 1, 10.03 - 1, 29, 29],
        [39, 4, 49, 14],
        [-1, -1, 19, 46.5],
        [4, 4, 24, 19],
        [59, 39, 69, 49],
        [60.1 - 1, 40.1 - 1, 69, 49],
    ]
    np.testing.assert_array_equal(boxes["452113"].source_boxes, expected)
    np.testing.assert_allclose(boxes["452113"].boxes[3], [0, 0, 19, 46.5])
    np.testing.assert_allclose(boxes["452113"].boxes[5:], [[59, 39, 64, 48], [59.1, 39.1, 64, 48]])
    assert boxes["368117"].boxes.shape == (0, 4)
    assert boxes.missing == ["77"]  # 413120 has an (empty) official annotation
    areas = boxes.max_areas(DATASET_IDS, convention="official")
    np.testing.assert_array_equal(areas, [20 * 47.5 / (64 * 48), 0, 0, -1])
    assert np.isnan(boxes.max_areas(["413120"])[0])  # the paper convention: in no bin


def test_official_coco_matches_the_port(coco, tmp_path):
    path, paths = coco
    boxes = coco_entities_boxes(path, DATASET_IDS, paths, rules="official")
    root = tmp_path / "coco_entities"
    captions = {"413120": ["a man on a bench", "someone sitting"]}
    port.prepare_coco_entities(RELEASE, {k: list(v) for k, v in SIZES.items()}, captions, root)
    infos = {i: port.get_box_info(root / f"Annotations/{port.coco_stem(i)}.xml") for i in DATASET_IDS}
    assert len(infos["452113"].boxes) == 7
    assert_same_as_port(boxes, infos)


def test_official_coco_matches_the_port_on_random_captions(tmp_path):
    rng = np.random.default_rng(3)
    nouns = ["dog", "man", "grass", "bus", "tennis racket", "racket", "shirt", "person"]
    words = ["a", "the", "two", "on", "with", "dogs", "men", "shirts", "buses", "grass", "racket"]
    release, sizes, paths = {}, {}, {}
    for n in range(40):
        image_id = str(100000 + n)
        width, height = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        sizes[image_id] = [width, height]
        kept: list[list[float]] = []
        captions = {}
        for c in range(int(rng.integers(1, 5))):
            text = " ".join(rng.choice(words + nouns, size=int(rng.integers(3, 9))))
            detections = {}
            for noun in rng.choice(nouns, size=int(rng.integers(0, 4)), replace=False):
                dets = []
                for _ in range(int(rng.integers(1, 4))):
                    if kept and rng.random() < 0.4:  # near or exact repeat of an earlier box
                        box = list(
                            np.round(np.array(kept[rng.integers(len(kept))]) + rng.choice([0, 0.02, 0.05, 0.2]), 2)
                        )
                    else:
                        x0, y0 = float(rng.integers(0, width)), float(rng.integers(0, height))
                        box = [x0, y0, x0 + float(rng.integers(1, 40)), y0 + float(rng.integers(1, 40))]
                    kept.append(box)
                    dets.append([len(kept), box])
                detections[str(noun)] = dets
            captions[f"{text} {c}"] = {"detections": detections}
        release[image_id] = captions
        paths[image_id] = tmp_path / f"{image_id}.png"
        Image.new("RGB", (width, height)).save(paths[image_id])
    path = write(tmp_path / "release.json", json.dumps(release))
    ids = list(release)
    boxes = coco_entities_boxes(path, ids, paths, rules="official")
    root = tmp_path / "coco_entities"
    port.prepare_coco_entities(release, sizes, {}, root)
    infos = {i: port.get_box_info(root / f"Annotations/{port.coco_stem(i)}.xml") for i in ids}
    assert_same_as_port(boxes, infos)
    detections = sum(len(d) for c in release.values() for a in c.values() for d in a["detections"].values())
    written = sum(
        len(b)
        for i in ids
        for b in port.read_annotation_file(str(root / f"Annotations/{port.coco_stem(i)}.xml"))[2].values()
    )
    kept = sum(len(i.boxes) for i in infos.values())
    assert 50 < kept < written < detections  # some unmatched nouns, some repeats


def test_load_boxes_and_resolve_boxes_pass_the_rules(entities, coco, tmp_path):
    dataset = RetrievalDataset(
        name="flickr30k",
        split="test",
        image_ids=["1000092795", "123"],
        file_stems=["1000092795", "123"],
        image_paths=[tmp_path / "a.jpg", tmp_path / "b.jpg"],
        texts=["a", "b"],
        text_to_image=np.array([0, 1]),
        image_to_texts=[[0], [1]],
    )
    official = resolve_boxes(f"entities:{entities / 'Annotations'}", dataset, tmp_path, rules="official")
    assert official.rules == "official" and len(official["1000092795"].boxes) == 5
    assert resolve_boxes(f"entities:{entities / 'Annotations'}", dataset, tmp_path).rules == "paper"
    with pytest.raises(ValueError, match="unknown box rules"):
        load_boxes("flickr30k-entities", entities / "Annotations", dataset, rules="lavis")
