import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qpert.data.captions import pre_caption
from qpert.data.datasets import DatasetLayoutError, load_dataset, normalize_image_id
from qpert.errors import QPertError

FLICKR_IDS = ["1007129816", "1009434119", "4864584935"]  # real Flickr30K-FG test ids
COCO_STEMS = ["COCO_val2014_000000452113", "COCO_val2014_000000368117"]  # real COCO-FG keys


def shared_fg_dir() -> Path:
    repo = Path(__file__).resolve().parents[1]
    for base in (Path("/work/shared"), repo.parent / "shared"):
        if (base / "data" / "fg").is_dir():
            return base / "data" / "fg"
    pytest.skip("shared data folder (/work/shared or ../shared)/data/fg is absent")


def write_jpeg(path: Path, size=(8, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def captions(prefix: str, n: int = 5) -> list[str]:
    return [f"{prefix} Caption number {i}." for i in range(n)]


@pytest.fixture
def flickr_lavis(tmp_path):
    entries = [{"image": f"flickr30k-images/{i}.jpg", "caption": captions(i)} for i in FLICKR_IDS]
    write_json(tmp_path / "flickr30k/annotations/flickr30k_test.json", entries)
    for i in FLICKR_IDS:
        write_jpeg(tmp_path / f"flickr30k/images/flickr30k-images/{i}.jpg")
    return tmp_path


@pytest.fixture
def coco_karpathy(tmp_path):
    def image(stem, split, n):
        sentences = [{"raw": c, "tokens": c.lower().split()} for c in captions(stem, n)]
        return {
            "filepath": "val2014",
            "filename": f"{stem}.jpg",
            "split": split,
            "sentences": sentences,
        }

    images = [
        image(COCO_STEMS[0], "test", 5),
        image("COCO_val2014_000000999999", "val", 5),
        image(COCO_STEMS[1], "test", 6),  # some COCO images have more than 5 captions
        image("COCO_val2014_000000999998", "restval", 5),
    ]
    write_json(tmp_path / "coco/annotations/dataset_coco.json", {"images": images})
    for im in images:
        write_jpeg(tmp_path / "coco/images/val2014" / im["filename"])
    return tmp_path


# ------------------------------------------------------------------ pre_caption


def test_pre_caption_matches_lavis_rules():
    assert pre_caption("A man, wearing a hat.  He's (happy)!") == "a man, wearing a hat he's happy"
    assert pre_caption("A dog runs.\n") == "a dog runs"
    assert pre_caption('Say "cheese" ~ #1: now; *go*') == "say cheese 1 now go"
    assert pre_caption("What is it? $5 - a t-shirt") == "what is it? $5 - a t-shirt"
    assert pre_caption("a\tdog") == "a\tdog"  # a lone tab survives, as in LAVIS


def test_pre_caption_truncates_to_max_words():
    text = " ".join(f"w{i}" for i in range(60))
    assert pre_caption(text).split(" ") == [f"w{i}" for i in range(50)]
    assert pre_caption("One two three", max_words=2) == "one two"


# ------------------------------------------------------------------ Flickr30K


def test_flickr_lavis_format(flickr_lavis):
    ds = load_dataset("flickr30k", flickr_lavis)
    assert (ds.name, ds.split, ds.num_images, ds.num_texts) == ("flickr30k", "test", 3, 15)
    assert ds.image_ids == FLICKR_IDS == ds.file_stems
    assert ds.image_paths[0] == flickr_lavis / "flickr30k/images/flickr30k-images/1007129816.jpg"
    assert ds.texts[0] == "1007129816 caption number 0"
    assert ds.text_to_image.tolist() == np.repeat([0, 1, 2], 5).tolist()
    assert ds.image_to_texts[1] == [5, 6, 7, 8, 9]


def test_flickr_lavis_cache_file_name(flickr_lavis):
    ann = flickr_lavis / "flickr30k/annotations"
    (ann / "flickr30k_test.json").rename(ann / "test.json")
    assert load_dataset("flickr30k", flickr_lavis).num_images == 3


def test_flickr_karpathy_format(tmp_path):
    def image(fid, split):
        return {
            "filename": f"{fid}.jpg",
            "imgid": int(fid),
            "split": split,
            "sentences": [{"raw": c, "tokens": c.split()} for c in captions(fid)],
        }

    images = [image("11", "train"), image("22", "test"), image("33", "val"), image("44", "test")]
    write_json(tmp_path / "flickr30k/annotations/dataset_flickr30k.json", {"images": images})
    for fid in ("11", "22", "33", "44"):
        write_jpeg(tmp_path / f"flickr30k/images/flickr30k-images/{fid}.jpg")
    test = load_dataset("flickr30k", tmp_path, "test")
    val = load_dataset("flickr30k", tmp_path, "val")
    assert test.image_ids == ["22", "44"] and test.num_texts == 10
    assert val.image_ids == ["33"] and val.texts[4] == "33 caption number 4"
    assert test.image_paths[1].name == "44.jpg"


def test_lavis_file_wins_over_karpathy(flickr_lavis):
    write_json(flickr_lavis / "flickr30k/annotations/dataset_flickr30k.json", {"images": []})
    assert load_dataset("flickr30k", flickr_lavis).num_images == 3


def test_explicit_captions_file(flickr_lavis, tmp_path):
    entries = [{"image": f"flickr30k-images/{FLICKR_IDS[2]}.jpg", "caption": ["Only one."]}]
    custom = write_json(tmp_path / "elsewhere/mine.json", entries)
    ds = load_dataset("flickr30k", flickr_lavis, captions_file=custom)
    assert ds.image_ids == [FLICKR_IDS[2]] and ds.texts == ["only one"]


# ------------------------------------------------------------------ COCO


def test_coco_karpathy_format(coco_karpathy):
    ds = load_dataset("coco", coco_karpathy)
    assert ds.image_ids == ["452113", "368117"]
    assert ds.file_stems == COCO_STEMS
    assert ds.num_texts == 11
    assert ds.image_to_texts[1] == list(range(5, 11))
    assert ds.text_to_image.tolist() == [0] * 5 + [1] * 6
    assert ds.image_paths[0] == coco_karpathy / f"coco/images/val2014/{COCO_STEMS[0]}.jpg"
    assert load_dataset("coco", coco_karpathy, "val").image_ids == ["999999"]


def test_coco_lavis_format(coco_karpathy):
    entries = [{"image": f"val2014/{s}.jpg", "caption": captions(s)} for s in COCO_STEMS]
    write_json(coco_karpathy / "coco/annotations/coco_karpathy_test.json", entries)
    ds = load_dataset("coco", coco_karpathy)
    assert ds.image_ids == ["452113", "368117"] and ds.num_texts == 10


# ------------------------------------------------------------------ FG


def test_flickr_fg_uses_real_fg_captions(flickr_lavis):
    fg_dir = shared_fg_dir()
    (flickr_lavis / "fg").mkdir()
    (flickr_lavis / "fg/Flickr30K_FG_ann.json").symlink_to(fg_dir / "Flickr30K_FG_ann.json")
    real = json.loads((fg_dir / "Flickr30K_FG_ann.json").read_text())
    ds = load_dataset("flickr30k-fg", flickr_lavis)
    assert ds.name == "flickr30k-fg"
    assert ds.image_ids == FLICKR_IDS and ds.num_texts == 15
    assert ds.texts[0] == pre_caption(real["1007129816"][0])
    assert ds.texts[0].startswith("the man with pierced ears")
    # the 70-word FG caption of 4864584935 is cut to LAVIS's 50 words
    assert len(real["4864584935"][0].split()) == 70
    assert len(ds.texts[10].split(" ")) == 50


def test_coco_fg_with_explicit_captions_file(coco_karpathy):
    fg_file = shared_fg_dir() / "MSCOCO_FG_ann.json"
    real = json.loads(fg_file.read_text())
    ds = load_dataset("coco-fg", coco_karpathy, captions_file=fg_file)
    assert ds.image_ids == ["452113", "368117"]
    assert ds.num_texts == 10  # FG has 5 captions for the image with 6 originals
    assert ds.texts[5:] == [pre_caption(c) for c in real[COCO_STEMS[1]]]


def test_fg_without_captions_for_an_image(coco_karpathy):
    fg_file = shared_fg_dir() / "MSCOCO_FG_ann.json"
    with pytest.raises(DatasetLayoutError, match="only for the Karpathy test split"):
        load_dataset("coco-fg", coco_karpathy, "val", captions_file=fg_file)


def test_missing_fg_file(flickr_lavis):
    with pytest.raises(DatasetLayoutError, match=r"FG caption file: .*fg/Flickr30K_FG_ann.json"):
        load_dataset("flickr30k-fg", flickr_lavis)


# ------------------------------------------------------------------ bad layouts


def test_missing_annotation_file_names_paths_and_layout(tmp_path):
    (tmp_path / "flickr30k/images").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as error:
        load_dataset("flickr30k", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "flickr30k/annotations/flickr30k_test.json") in message
    assert "dataset_flickr30k.json" in message and "expected layout" in message


def test_missing_images_folder(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"images folder: .*coco/images"):
        load_dataset("coco", tmp_path)


def test_missing_image_file(flickr_lavis):
    (flickr_lavis / f"flickr30k/images/flickr30k-images/{FLICKR_IDS[1]}.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 of 3 image files are missing.*1009434119"):
        load_dataset("flickr30k", flickr_lavis)
    assert load_dataset("flickr30k", flickr_lavis, check_images=False).num_images == 3


def test_training_file_is_refused(flickr_lavis):
    entries = [{"image": "flickr30k-images/1.jpg", "caption": "One caption.", "image_id": "1"}]
    write_json(flickr_lavis / "flickr30k/annotations/flickr30k_test.json", entries)
    with pytest.raises(DatasetLayoutError, match="one caption each"):
        load_dataset("flickr30k", flickr_lavis)


def test_unrecognized_and_invalid_json(flickr_lavis):
    ann = flickr_lavis / "flickr30k/annotations/flickr30k_test.json"
    write_json(ann, {"something": 1})
    with pytest.raises(DatasetLayoutError, match="not a recognized annotation file"):
        load_dataset("flickr30k", flickr_lavis)
    ann.write_text("{not json")
    with pytest.raises(DatasetLayoutError, match="not valid JSON"):
        load_dataset("flickr30k", flickr_lavis)


def test_split_absent_from_karpathy_file(coco_karpathy):
    data = json.loads((coco_karpathy / "coco/annotations/dataset_coco.json").read_text())
    data["images"] = [im for im in data["images"] if im["split"] != "val"]
    write_json(coco_karpathy / "coco/annotations/dataset_coco.json", data)
    with pytest.raises(DatasetLayoutError, match="no image has split 'val'"):
        load_dataset("coco", coco_karpathy, "val")


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("flickr8k", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("coco", tmp_path, "train")


def test_normalize_image_id():
    assert normalize_image_id(391895) == "391895"
    assert normalize_image_id(np.int64(7)) == "7"
    assert normalize_image_id("000000391895") == "391895"
    assert normalize_image_id("COCO_val2014_000000391895") == "391895"
    assert normalize_image_id("val2014/COCO_val2014_000000391895.jpg") == "391895"
    assert normalize_image_id("1007129816.jpg") == "1007129816"
    assert normalize_image_id("img_a") == "img_a"
    with pytest.raises(QPertError, match="image id must be an int or a str"):
        normalize_image_id(1.5)  # an annotation file with a malformed id: a data error, one line in the CLI


def test_empty_or_incomplete_annotation_files(flickr_lavis):
    ann = flickr_lavis / "flickr30k/annotations/flickr30k_test.json"
    write_json(ann, [])
    with pytest.raises(DatasetLayoutError, match="lists no images"):
        load_dataset("flickr30k", flickr_lavis)
    ann.unlink()
    karpathy = {"images": [{"split": "test", "filename": "1.jpg"}]}
    write_json(flickr_lavis / "flickr30k/annotations/dataset_flickr30k.json", karpathy)
    with pytest.raises(DatasetLayoutError, match="without 'filename' or 'sentences'"):
        load_dataset("flickr30k", flickr_lavis)


def test_duplicate_images_are_refused(flickr_lavis):
    entry = {"image": f"flickr30k-images/{FLICKR_IDS[0]}.jpg", "caption": ["A."]}
    write_json(flickr_lavis / "flickr30k/annotations/flickr30k_test.json", [entry, entry])
    with pytest.raises(DatasetLayoutError, match="more than once"):
        load_dataset("flickr30k", flickr_lavis)
