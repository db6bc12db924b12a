"""Photo search: index a folder with a tiny BLIP-2 and a tiny DETR, search it, update it, break it."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.bench import run_in_process
from helpers.contract import needs_cpp_compiler
from helpers.disk import full_disk_for
from helpers.processes import kill_when
from helpers.search_fixtures import photo_folder, save_tiny_blip2, save_tiny_detr, write_photo
from PIL import Image, ImageOps

import qpert
from qpert.scoring import score
from qpert.search import indexer
from qpert.search.catalog import Catalog, CatalogUpdate
from qpert.search.detectors import DetectorOptions, TransformersDetector, load_detector
from qpert.search.indexer import IndexSettings, build_index
from qpert.search.searcher import PhotoIndex
from qpert.search.vectors import VectorIndex

CONFIG = qpert.QPertConfig(alpha=4.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-models")
    return save_tiny_blip2(root / "blip2"), save_tiny_detr(root / "detr")


def settings_for(models, **overrides) -> IndexSettings:
    model, detr = models
    return IndexSettings(
        **{
            "model": str(model),
            "detector": str(detr),
            "qpert": CONFIG,
            "detector_options": DetectorOptions(score_threshold=0.0, max_boxes=3),
            **overrides,
        }
    )


def index_cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "qpert", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def catalog_state(index_dir):
    catalog = Catalog(index_dir / "catalog.sqlite")
    try:
        rows = {p: (r.sha256, r.settings, r.detections.to_json()) for p, r in catalog.photos().items()}
        return rows, catalog.vectors("baseline")[1].copy(), catalog.vectors("qpert")[1].copy(), catalog.generation
    finally:
        catalog.close()


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=needs_cpp_compiler)], ids=["eager", "compiled-vision-encoder"]
)
def test_search_matches_scoring_every_photo_directly(models, tmp_path, compiled, monkeypatch):
    photos = photo_folder(tmp_path / "photos", count=6)
    compiled_encoders = []
    monkeypatch.setattr(
        indexer,
        "compile_vision_encoder",
        lambda model, real=indexer.compile_vision_encoder: compiled_encoders.append(real(model)),
    )
    report = build_index(
        photos,
        tmp_path / "index",
        settings_for(models),
        device="cpu",
        batch_size=4,
        progress=False,
        compile_vision=compiled,
    )
    assert (report.added, report.photos, report.skipped) == (6, 6, [])
    assert len(compiled_encoders) == compiled
    index = PhotoIndex(tmp_path / "index", device="cpu")
    detector = load_detector(str(models[1]), DetectorOptions(score_threshold=0.0, max_boxes=3))
    paths = sorted(index.photos_dir / r.path for r in index.rows.values())
    images = [Image.open(p).convert("RGB") for p in paths]
    detections = detector.detect(images)
    assert all(len(d.boxes) == 3 for d in detections)
    query = "a red square on the left"
    reference = score(
        qpert.load_model(str(models[0])), images, [d.boxes for d in detections], [query], CONFIG, itm=True
    )
    by_path = {index.photos_dir / r.path: r for r in index.rows.values()}
    for i, p in enumerate(paths):
        np.testing.assert_allclose(by_path[p].detections.boxes, detections[i].boxes, atol=0.01)

    for qp, name in ((True, "qpert"), (False, "baseline")):
        expected = reference[name].itc[:, 0].numpy()
        hits = index.search(query, k=6, qpert=qp)
        assert [paths.index(index.photos_dir / h.path) for h in hits] == list(np.argsort(-expected, kind="stable"))
        np.testing.assert_allclose([h.itc for h in hits], np.sort(expected)[::-1], atol=1e-5)
        reranked = index.search(query, k=6, qpert=qp, itm=True, candidates=6)
        expected_itm = reference[name].itm[:, 0].numpy()  # ITM + ITC from fp32 tokens; the index keeps fp16
        np.testing.assert_allclose(
            [h.score for h in reranked],
            [expected_itm[paths.index(index.photos_dir / h.path)] for h in reranked],
            atol=2e-3,
        )
        assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
    assert not np.allclose(reference["qpert"].itc, reference["baseline"].itc), "Q-Pert must change the scores"
    top3 = index.search(query, k=3)
    assert [h.rank for h in top3] == [1, 2, 3] and len(top3) == 3
    assert index.photo_path(top3[0].id) == index.photos_dir / top3[0].path
    with pytest.raises(ValueError, match="empty"):
        index.search("  ")
    index.close()


def test_incremental_update_adds_modifies_removes_and_skips_the_rest(models, tmp_path, monkeypatch):
    photos = photo_folder(tmp_path / "photos", count=5)
    settings = settings_for(models)
    build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    before, *_ = catalog_state(tmp_path / "index")

    calls = []
    real_detect = TransformersDetector.detect
    monkeypatch.setattr(
        TransformersDetector, "detect", lambda self, ims: calls.append(len(ims)) or real_detect(self, ims)
    )
    write_photo(photos / "new" / "added.png", seed=50)
    write_photo(photos / "album0" / "photo0.jpg", seed=51)  # modified content
    (photos / "album1" / "photo1.png").unlink()  # deleted
    old = photos / "album0" / "photo2.webp"
    stat = old.stat()
    import os

    os.utime(old, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    report = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    assert (report.added, report.updated, report.removed, report.photos) == (1, 1, 1, 5)
    assert report.unchanged == 3 and sum(calls) == 2, "only the new and the modified photo are detected again"
    after, *_ = catalog_state(tmp_path / "index")
    assert set(after) == set(before) - {"album1/photo1.png"} | {"new/added.png"}
    assert after["album0/photo0.jpg"][0] != before["album0/photo0.jpg"][0]
    assert after["album0/photo2.webp"] == before["album0/photo2.webp"]
    tokens = list((tmp_path / "index" / "features" / "tokens").glob("*.safetensors"))
    assert len(tokens) == 5, "vision tokens of removed or replaced photos are collected"
    assert not (tmp_path / "index" / "staging").exists()

    calls.clear()  # new Q-Pert settings: re-embedded from stored boxes and tokens, nothing detected again
    report = build_index(
        photos,
        tmp_path / "index",
        settings_for(models, qpert=qpert.QPertConfig(alpha=1.0)),
        device="cpu",
        progress=False,
    )
    assert report.updated == 5 and calls == []
    hits = PhotoIndex(tmp_path / "index", device="cpu").search("a green circle", k=10)
    assert sorted(h.path for h in hits) == sorted(after)

    paper_vectors = catalog_state(tmp_path / "index")[2]  # compat="official": re-embedded, in float32
    official = settings_for(models, qpert=qpert.QPertConfig(alpha=1.0, compat="official"))
    assert official.dtype == "fp32"
    assert build_index(photos, tmp_path / "index", official, device="cpu", progress=False).updated == 5
    assert not np.allclose(catalog_state(tmp_path / "index")[2], paper_vectors)
    index = PhotoIndex(tmp_path / "index", device="cpu")
    assert index.settings.qpert.compat == "official" and len(index.search("a green circle", k=10, itm=True)) == 5
    with pytest.raises(ValueError, match="float32"):
        settings_for(models, qpert=qpert.QPertConfig(compat="official"), dtype="fp16")


def test_corrupt_photos_are_reported_and_skipped_until_they_change(models, tmp_path):
    photos = photo_folder(tmp_path / "photos", count=3)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.txt").write_text("not a photo, ignored")
    report = build_index(photos, tmp_path / "index", settings_for(models), device="cpu", progress=False)
    assert report.photos == 3 and sorted(p for p, _ in report.skipped) == ["broken.jpg", "empty.png"]
    assert all("not a readable image" in why for _, why in report.skipped)
    again = build_index(photos, tmp_path / "index", settings_for(models), device="cpu", progress=False)
    assert again.added == 0 and len(again.skipped) == 2
    write_photo(photos / "broken.jpg", seed=9, fmt="JPEG")
    fixed = build_index(photos, tmp_path / "index", settings_for(models), device="cpu", progress=False)
    assert fixed.added == 1 and fixed.photos == 4 and [p for p, _ in fixed.skipped] == ["empty.png"]


def test_links_out_of_the_photo_folder_are_not_indexed(models, tmp_path, caplog):
    photos = photo_folder(tmp_path / "photos", count=2)
    (photos / "inside.jpg").symlink_to(photos / "album0" / "photo0.jpg")
    (photos / "outside.jpg").symlink_to(write_photo(tmp_path / "elsewhere" / "secret.jpg", seed=3))
    (photos / "loop").symlink_to(photos, target_is_directory=True)  # folder links are not followed at all
    report = build_index(
        photos, tmp_path / "index", settings_for(models, detector="none"), device="cpu", progress=False
    )
    rows, *_ = catalog_state(tmp_path / "index")
    assert report.photos == 3 and sorted(rows) == ["album0/photo0.jpg", "album1/photo1.png", "inside.jpg"]
    assert "outside the photo folder" in caplog.text


def test_exif_orientation_is_respected(models, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, size=(40, 80, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display upright
    Image.fromarray(pixels).save(photos / "portrait.jpg", exif=exif)
    build_index(photos, tmp_path / "index", settings_for(models), device="cpu", progress=False)
    (row,) = PhotoIndex(tmp_path / "index", device="cpu").rows.values()
    assert (row.width, row.height) == (40, 80)
    assert (row.detections.boxes[:, [2]] <= 40 + 1e-3).all() and (row.detections.boxes[:, [3]] <= 80 + 1e-3).all()


def test_without_detector_qpert_vectors_equal_the_baseline(models, tmp_path):
    photos = photo_folder(tmp_path / "photos", count=3)
    build_index(photos, tmp_path / "index", settings_for(models, detector="none"), device="cpu", progress=False)
    rows, baseline, qp, _ = catalog_state(tmp_path / "index")
    assert all(r[2] == [] for r in rows.values())
    np.testing.assert_array_equal(baseline, qp)


def test_failed_merge_leaves_the_previous_index_whole(models, tmp_path, monkeypatch):
    photos = photo_folder(tmp_path / "photos", count=3)
    settings = settings_for(models)
    build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    before = catalog_state(tmp_path / "index")
    for i in range(3, 6):
        write_photo(photos / f"more{i}.png", seed=i + 10)
    real_put, puts = CatalogUpdate.put, []

    def failing_put(self, photo):
        puts.append(photo.path)
        if len(puts) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the transaction
        real_put(self, photo)

    monkeypatch.setattr(CatalogUpdate, "put", failing_put)
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    after = catalog_state(tmp_path / "index")
    assert after[0] == before[0] and after[3] == before[3]
    np.testing.assert_array_equal(after[1], before[1])
    assert len(PhotoIndex(tmp_path / "index", device="cpu").search("a red square", k=10)) == 3
    monkeypatch.setattr(CatalogUpdate, "put", real_put)
    report = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    assert report.added == 3 and report.photos == 6


@pytest.mark.slow
def test_killed_indexing_keeps_the_old_index_and_resumes(models, tmp_path):
    photos = photo_folder(tmp_path / "photos", count=2)
    index_dir = tmp_path / "index"
    common = [
        "--index",
        str(index_dir),
        "--model",
        str(models[0]),
        "--detector",
        str(models[1]),
        "--detector-threshold",
        "0",
        "--max-boxes",
        "3",
        "--alpha",
        "4",
        "--device",
        "cpu",
        "--batch-size",
        "1",
    ]
    index_cli("index", str(photos), *common)
    before = catalog_state(index_dir)
    for i in range(2, 14):
        write_photo(photos / f"batch/p{i:02d}.png", seed=100 + i)
    kill_when(
        [sys.executable, "-m", "qpert", "index", str(photos), *common],
        lambda: bool(list(index_dir.glob("staging/photo/*.safetensors"))),
    )
    after = catalog_state(index_dir)
    assert after[0] == before[0] and after[3] == before[3], "the catalog is untouched until the merge"
    out = index_cli("search", str(index_dir), "a red square", "--device", "cpu", "--json")
    assert out.stdout.count('"path"') == 2, "the previous index still answers"
    staged = len(list(index_dir.glob("staging/photo/*.safetensors")))
    assert 1 <= staged < 12
    out = index_cli("index", str(photos), *common)
    assert "12 added" in out.stdout and "14 photos indexed" in out.stdout
    resumed = catalog_state(index_dir)
    shutil.rmtree(index_dir)
    index_cli("index", str(photos), *common)
    clean = catalog_state(index_dir)
    assert resumed[0] == clean[0]
    np.testing.assert_allclose(resumed[2], clean[2], atol=1e-6)


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_builds_the_same_index(models, tmp_path):
    photos = photo_folder(tmp_path / "photos", count=7)
    (photos / "broken.png").write_bytes(b"nope")
    common = [
        "--model",
        str(models[0]),
        "--detector",
        str(models[1]),
        "--detector-threshold",
        "0",
        "--max-boxes",
        "3",
        "--alpha",
        "4",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]
    index_cli("index", str(photos), "--index", str(tmp_path / "single"), *common)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "qpert",
            "index",
            str(photos),
            "--index",
            str(tmp_path / "multi"),
            *common,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("7 photos indexed") == 1, "rank 0 alone reports"
    single, multi = catalog_state(tmp_path / "single"), catalog_state(tmp_path / "multi")
    assert multi[0] == single[0] and len(multi[0]) == 7
    for variant in (1, 2):
        np.testing.assert_allclose(multi[variant], single[variant], atol=1e-5)
    query = ["search", "a red square", "--device", "cpu", "--json"]
    assert index_cli(query[0], str(tmp_path / "multi"), *query[1:]).stdout.replace("multi", "X") == index_cli(
        query[0], str(tmp_path / "single"), *query[1:]
    ).stdout.replace("single", "X")


def test_index_and_search_errors_are_one_line(models, tmp_path, monkeypatch, capsys):
    def qpert(*args):
        return run_in_process(monkeypatch, capsys, *args)

    out = qpert("index", tmp_path / "nowhere", "--model", models[0], "--detector", "none")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    out = qpert("search", tmp_path, "a cat")
    assert out.returncode == 2 and "not a qpert index" in out.stderr
    photos = photo_folder(tmp_path / "photos", count=2)
    assert qpert("index", photos, "--model", models[0], "--detector", "none", "--device", "cpu").returncode == 0
    out = qpert("index", photos, "--model", "blip2-coco", "--detector", "none")
    assert out.returncode == 2 and "was built with model" in out.stderr
    out = qpert("index", photos, "--model", models[0], "--detector", "torchvision:nonsense")
    assert out.returncode == 2 and "not a torchvision detection model" in out.stderr
    out = qpert("search", photos / ".qpert-index", "a red square", "-k", "1", "--device", "cpu")
    assert out.returncode == 0 and out.stdout.count("photo") >= 1 and " 1. " in out.stdout


def test_flat_vector_search_is_exact_max_over_query_tokens():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 4, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    ids = np.arange(1000, 1300)
    query = rng.normal(size=(3, 16)).astype(np.float32)
    truth = np.einsum("nqd,td->tnq", vectors, query).max(-1)
    flat = VectorIndex.build(ids, vectors, "flat")
    got_ids, got_scores = flat.search(query, 10)
    for t in range(3):
        order = np.argsort(-truth[t], kind="stable")[:10]
        np.testing.assert_array_equal(got_ids[t], ids[order])
        np.testing.assert_allclose(got_scores[t], truth[t][order], rtol=1e-5)
    for kind in ("hnsw", "ivf"):
        approx_ids, _ = VectorIndex.build(ids, vectors, kind).search(query, 10)
        recall = np.mean([len(set(approx_ids[t]) & set(got_ids[t])) / 10 for t in range(3)])
        assert recall >= 0.7, f"{kind} recall {recall}"


def test_stale_or_damaged_faiss_files_are_rebuilt(models, tmp_path):
    photos = photo_folder(tmp_path / "photos", count=3)
    build_index(photos, tmp_path / "index", settings_for(models), device="cpu", progress=False)
    expected = [h.path for h in PhotoIndex(tmp_path / "index", device="cpu").search("a blue square", k=3)]
    (tmp_path / "index" / "qpert.faiss").write_bytes(b"garbage")
    assert VectorIndex.load(tmp_path / "index", "qpert", 1) is None
    assert [h.path for h in PhotoIndex(tmp_path / "index", device="cpu").search("a blue square", k=3)] == expected


def test_torchvision_detector_from_a_saved_folder(tmp_path):
    from torchvision.models import get_model

    from qpert.search.detectors import save_torchvision_detector

    torch.manual_seed(0)
    model = get_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        weights=None,
        weights_backbone=None,
        num_classes=3,
        box_score_thresh=0.0,
    )
    save_torchvision_detector(
        model,
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        ["__background__", "dog", "cat"],
        tmp_path / "det",
        box_score_thresh=0.0,
    )
    detector = load_detector(str(tmp_path / "det"), DetectorOptions(score_threshold=0.0, max_boxes=4, classes=("dog",)))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, size=(90, 120, 3), dtype=np.uint8))
    (found,) = detector.detect([image])
    model.eval()
    with torch.no_grad():
        (raw,) = model([torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255])
    dogs = raw["labels"] == 1
    assert len(found.boxes) == min(4, int(dogs.sum())) and set(found.labels) <= {"dog"}
    np.testing.assert_allclose(found.boxes, raw["boxes"][dogs][:4].numpy(), atol=1e-4)
    assert (found.boxes[:, 2] <= 120).all() and (found.boxes[:, 3] <= 90).all()
    assert list(found.scores) == sorted(found.scores, reverse=True)


def test_detections_are_clipped_filtered_and_capped():
    from qpert.search.detectors import keep

    boxes = torch.tensor([[-5.0, 2, 20, 30], [10, 10, 12, 12], [50, 5, 70, 9], [1, 1, 4, 4], [3, 3, 3, 9]])
    scores = torch.tensor([0.9, 0.3, 0.8, 0.95, 0.99])
    labels = ["dog", "dog", "cat", "dog", "dog"]
    found = keep(boxes, scores, labels, DetectorOptions(score_threshold=0.5, max_boxes=2, classes=("dog",)), (24, 40))
    # [3,3,3,9] has no width; [10,10,12,12] scores too low; the cat is filtered; two best dogs remain
    assert found.labels == ["dog", "dog"]
    np.testing.assert_allclose(found.boxes, [[1, 1, 4, 4], [0, 2, 20, 24]])
    np.testing.assert_allclose(found.scores, [0.95, 0.9])
    outside = keep(torch.tensor([[50.0, 5, 70, 9]]), torch.tensor([0.9]), ["cat"], DetectorOptions(), (24, 40))
    assert len(outside.boxes) == 0, "a box entirely outside the image is dropped"


@pytest.mark.parametrize("family", ["coca", "siglip"])
def test_other_families_index_and_search_by_itc(family, models, tmp_path):
    """One vector per photo (CoCa, SigLIP) instead of BLIP-2's 32; no ITM head, so --itm is refused."""
    from helpers.models import tiny_coca_dir, tiny_siglip
    from helpers.search_fixtures import save_siglip_folder

    from qpert.errors import UnsupportedModelError

    model_dir = tmp_path / family
    if family == "coca":
        model_dir.mkdir()
        tiny_coca_dir(model_dir)
    else:
        save_siglip_folder(tiny_siglip(seed=0), model_dir)
    photos = photo_folder(tmp_path / "photos", count=4)
    build_index(photos, tmp_path / "index", settings_for((model_dir, models[1])), device="cpu", progress=False)
    index = PhotoIndex(tmp_path / "index", device="cpu")
    rows = sorted(index.rows.values(), key=lambda r: r.path)
    images = [Image.open(index.photos_dir / r.path).convert("RGB") for r in rows]
    query = "a red square"
    reference = score(qpert.load_model(str(model_dir)), images, [r.detections.boxes for r in rows], [query], CONFIG)
    for qp, name in ((True, "qpert"), (False, "baseline")):
        expected = reference[name].itc[:, 0].numpy()
        hits = index.search(query, k=4, qpert=qp)
        assert [h.path for h in hits] == [rows[i].path for i in np.argsort(-expected, kind="stable")]
    assert not np.allclose(reference["qpert"].itc, reference["baseline"].itc)
    with pytest.raises(UnsupportedModelError, match="no ITM head"):
        index.search(query, itm=True)


def test_annotated_photos_take_their_boxes_and_the_rest_go_to_the_detector(models, tmp_path):
    import json

    photos = photo_folder(tmp_path / "photos", count=4)
    coco = {
        "images": [
            {"id": 7, "file_name": "album0/photo0.jpg", "height": 48, "width": 64},
            {"id": 8, "file_name": "album1/photo1.png", "height": 48, "width": 64},
            {"id": 9, "file_name": "not/there.jpg", "height": 10, "width": 10},
        ],
        "annotations": [
            {"image_id": 7, "bbox": [2, 3, 10, 12], "category_id": 1},
            {"image_id": 7, "bbox": [50, 40, 30, 30], "category_id": 2},  # clipped to 64 x 48
            {"image_id": 8, "bbox": [0, 0, 5, 5], "category_id": 2, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "kite"}, {"id": 2, "name": "person"}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    build_index(
        photos,
        tmp_path / "index",
        settings_for(models, annotations=str(tmp_path / "boxes.json")),
        device="cpu",
        progress=False,
    )
    rows, *_ = catalog_state(tmp_path / "index")
    assert rows["album0/photo0.jpg"][2] == [
        {"box": [2.0, 3.0, 12.0, 15.0], "score": 1.0, "label": "kite"},
        {"box": [50.0, 40.0, 64.0, 48.0], "score": 1.0, "label": "person"},
    ]
    assert rows["album1/photo1.png"][2] == [], "annotated with crowd boxes only: no boxes, no detector"
    assert all(
        len(rows[p][2]) == 3 and rows[p][2][0]["label"] in ("dog", "cat", "ball")
        for p in ("album0/photo2.webp", "album1/photo3.jpg")
    ), "unannotated photos get the detector's boxes"
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": []}))
    out = index_cli(
        "index",
        str(photos),
        "--index",
        str(tmp_path / "other"),
        "--model",
        str(models[0]),
        "--detector",
        "none",
        "--annotations",
        str(tmp_path / "bad.json"),
        check=False,
    )
    assert out.returncode == 2 and "images need id, file_name, height, width" in out.stderr


def test_open_vocabulary_detector_finds_what_the_prompts_name(models, tmp_path):
    from helpers.search_fixtures import save_tiny_owlv2
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from qpert.search.detectors import keep

    owl = save_tiny_owlv2(tmp_path / "owlv2")
    prompts = ("a dog", "a red kite")
    with pytest.raises(ValueError, match="open-vocabulary detector: say what to look for"):
        load_detector(f"hf:{owl}")
    options = DetectorOptions(score_threshold=0.0, max_boxes=4, prompts=prompts)
    detector = load_detector(f"hf:{owl}", options)
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40 + 20 * i, 60, 3), dtype=np.uint8))
        for i in range(2)
    ]
    found = detector.detect(images)
    model, processor = AutoModelForZeroShotObjectDetection.from_pretrained(owl), AutoProcessor.from_pretrained(owl)
    for image, got in zip(images, found):  # the model's own post-processing, clipped to the image
        with torch.no_grad():
            out = model(**processor(text=[list(prompts)], images=[image], padding=True, return_tensors="pt"))
        (raw,) = processor.post_process_grounded_object_detection(
            out, threshold=0.0, target_sizes=[(image.height, image.width)]
        )
        expected = keep(
            raw["boxes"], raw["scores"], [prompts[int(i)] for i in raw["labels"]], options, (image.height, image.width)
        )
        assert set(got.labels) <= set(prompts) and 1 <= len(got.boxes) <= 4 and got.labels == expected.labels
        np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-3)  # batched detection = one by one
    photos = photo_folder(tmp_path / "photos", count=2)
    build_index(
        photos,
        tmp_path / "index",
        settings_for((models[0], f"hf:{owl}"), detector_options=options),
        device="cpu",
        progress=False,
    )
    rows, *_ = catalog_state(tmp_path / "index")
    assert all(r[2] and {b["label"] for b in r[2]} <= set(prompts) for r in rows.values())
    assert IndexSettings.from_json(indexer_manifest(tmp_path / "index")).detector_options.prompts == prompts


def indexer_manifest(index_dir):
    from qpert.search.indexer import read_manifest

    return read_manifest(index_dir)["settings"]


def test_file_names_with_terminal_escapes_are_printed_escaped(models, tmp_path):
    photos = photo_folder(tmp_path / "photos", count=1)
    write_photo(photos / "\x1b[2J\x1b[31mred\x1b[0m.jpg", seed=5)
    write_photo(photos / "bell\x07\u202egnp.png", seed=6)
    index_cli("index", str(photos), "--model", str(models[0]), "--detector", "none", "--device", "cpu")
    out = index_cli("search", str(photos / ".qpert-index"), "a red square", "--device", "cpu")
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout and "\u202e" not in out.stdout
    assert "\\x1b[2J\\x1b[31mred\\x1b[0m.jpg" in out.stdout and "bell\\x07\\u202egnp.png" in out.stdout
    data = json.loads(
        index_cli("search", str(photos / ".qpert-index"), "a red square", "--device", "cpu", "--json").stdout
    )
    assert "\x1b[2J\x1b[31mred\x1b[0m.jpg" in {h["path"] for h in data["results"]}  # JSON keeps it exact


def test_a_file_name_that_is_not_utf8_is_indexed_losslessly(models, tmp_path):
    photos = photo_folder(tmp_path / "photos", count=2)
    raw = b"caf\xe9 \xff.jpg"  # Latin-1 and a stray byte: no UTF-8 can say it
    write_photo(photos / os.fsdecode(raw), seed=5, fmt="JPEG")
    report = build_index(
        photos, tmp_path / "index", settings_for(models, detector="none"), device="cpu", progress=False
    )
    assert (report.added, report.photos, report.skipped) == (3, 3, [])
    index = PhotoIndex(tmp_path / "index", device="cpu")
    (row,) = [r for r in index.rows.values() if r.path.endswith(".jpg") and "album" not in r.path]
    assert os.fsencode(index.photos_dir / row.path) == os.fsencode(photos.resolve()) + b"/" + raw
    photo, _ = index.open_photo(row.id)
    with photo:
        assert photo.read() == (photos / os.fsdecode(raw)).read_bytes()
    index.close()
    again = build_index(photos, tmp_path / "index", settings_for(models, detector="none"), device="cpu", progress=False)
    assert (again.unchanged, again.added, again.removed) == (3, 0, 0)
    out = index_cli("search", str(tmp_path / "index"), "a red square", "--device", "cpu")
    assert "caf\\xe9 \\xff.jpg" in out.stdout


def test_an_unreadable_folder_is_skipped_and_its_photos_are_kept(models, tmp_path, monkeypatch, caplog):
    """A folder the indexer may not read (lost+found, another user's) is named in a warning; the rest is indexed,
    and what was indexed from it before stays (it may be readable again later)."""
    photos = photo_folder(tmp_path / "photos", count=4)
    settings = settings_for(models, detector="none")
    build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    write_photo(photos / "album0" / "new.jpg", seed=20)
    (photos / "lost+found").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and os.path.basename(path) in ("album1", "lost+found"):  # as root
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    monkeypatch.undo()
    assert (report.added, report.removed, report.photos) == (1, 0, 5)
    assert sorted(report.skipped) == [
        ("album1/", "unreadable folder (Permission denied)"),
        ("lost+found/", "unreadable folder (Permission denied)"),
    ]
    assert "album1/" in caplog.text and "lost+found/" in caplog.text and "Permission denied" in caplog.text
    assert "skipped album1/: unreadable folder" in report.summary()


def test_a_folder_nested_deeper_than_the_recursion_limit_is_scanned(tmp_path):
    from qpert.search.photos import scan_photos

    deep = tmp_path / "photos"
    deep.mkdir()
    for _ in range(1100):  # deeper than Python's default recursion limit (1000)
        deep /= "d"
        os.mkdir(deep)
    try:
        write_photo(deep / "bottom.jpg", seed=1)
        write_photo(tmp_path / "photos" / "top.png", seed=2)
        scan = scan_photos(tmp_path / "photos")
        assert [p.path.rsplit("/", 1)[-1] for p in scan.photos] == ["bottom.jpg", "top.png"]
        assert scan.photos[0].path.count("/") == 1100 and scan.unreadable == []
    finally:  # bottom up: shutil.rmtree (pytest's clean-up of old runs) recurses, and would fail here
        (deep / "bottom.jpg").unlink(missing_ok=True)
        while deep != tmp_path / "photos":
            deep.rmdir()
            deep = deep.parent


def test_an_edit_that_keeps_size_and_mtime_is_found(models, tmp_path):
    """cp -p, rsync -t, exiftool -P keep the modification time; the change time and inode give them away."""
    photos = photo_folder(tmp_path / "photos", count=3)
    settings = settings_for(models, detector="none")
    build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    before, *_ = catalog_state(tmp_path / "index")
    target = photos / "album0" / "photo0.jpg"
    old, stat = target.read_bytes(), target.stat()
    Image.open(target).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "other.jpg", quality=50)
    new = (tmp_path / "other.jpg").read_bytes()
    assert len(new) <= len(old) and new != old
    new += b"\0" * (len(old) - len(new))  # same size (JPEG decoders ignore what follows the image)
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(new)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(copy, target)  # as rsync -t does: same size, same mtime
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    report = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    after, *_ = catalog_state(tmp_path / "index")
    assert (report.updated, report.unchanged) == (1, 2)
    assert after["album0/photo0.jpg"][0] != before["album0/photo0.jpg"][0]


def test_rehash_checks_every_photo_and_skipped_files_are_retried(models, tmp_path, monkeypatch):
    from qpert.search import photos as photos_module

    photos = photo_folder(tmp_path / "photos", count=3)
    settings = settings_for(models, detector="none")
    hashed, unreadable = [], {"photo1.png"}
    real_read = photos_module.read_photo

    def read_photo(path):
        hashed.append(path.name)
        if path.name in unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(indexer, "read_photo", read_photo)
    first = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    assert first.photos == 2 and [p for p, _ in first.skipped] == ["album1/photo1.png"]
    unreadable.clear()  # chmod-ed back: size, mtime and all unchanged
    retried = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    assert (retried.added, retried.photos, retried.skipped) == (1, 3, []), "an unchanged skipped file is retried"

    catalog = Catalog(tmp_path / "index" / "catalog.sqlite")  # a stored hash that no longer matches the bytes
    with catalog.db:
        catalog.db.execute("UPDATE photos SET sha256='0' WHERE path='album0/photo2.webp'")
    catalog.close()
    hashed.clear()
    quick = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    assert hashed == [] and quick.unchanged == 3
    full = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False, rehash=True)
    assert sorted(hashed) == ["photo0.jpg", "photo1.png", "photo2.webp"]
    assert (full.updated, full.unchanged) == (1, 2)
    out = index_cli(
        "index",
        str(photos),
        "--index",
        str(tmp_path / "index"),
        "--model",
        str(models[0]),
        "--detector",
        "none",
        "--alpha",
        "4",
        "--device",
        "cpu",
        "--rehash",
    )
    assert "3 unchanged" in out.stdout


def test_searches_read_the_index_while_an_update_holds_the_catalog(models, tmp_path, monkeypatch):
    """A large merge is one long write transaction: searches started meanwhile read the last committed index."""
    photos = photo_folder(tmp_path / "photos", count=3)
    build_index(photos, tmp_path / "index", settings_for(models, detector="none"), device="cpu", progress=False)
    writer = Catalog(tmp_path / "index" / "catalog.sqlite")
    try:
        writer.db.execute("BEGIN EXCLUSIVE")  # what a merge that spills its cache to the file holds
        writer.db.execute("DELETE FROM photos")
        index = PhotoIndex(tmp_path / "index", device="cpu")
        assert len(index.search("a red square", k=10, itm=True)) == 3
        index.close()
    finally:
        writer.db.rollback()
        writer.close()


def test_a_catalog_locked_too_long_is_a_clear_error(models, tmp_path, monkeypatch):
    from qpert.errors import IndexBusyError
    from qpert.search import catalog as catalog_module

    photos = photo_folder(tmp_path / "photos", count=2)
    build_index(photos, tmp_path / "index", settings_for(models, detector="none"), device="cpu", progress=False)
    monkeypatch.setattr(catalog_module, "BUSY_SECONDS", 0.2)
    holder = sqlite3.connect(tmp_path / "index" / "catalog.sqlite")
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # a lock even WAL readers wait for
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(IndexBusyError, match="stayed locked by another process"):
            PhotoIndex(tmp_path / "index", device="cpu")
    finally:
        holder.rollback()
        holder.close()


def test_temporaries_of_a_killed_merge_are_removed_at_the_next_run(models, tmp_path):
    from qpert.atomic import atomic_write

    photos = photo_folder(tmp_path / "photos", count=2)
    index_dir = tmp_path / "index"
    settings = settings_for(models, detector="none")
    build_index(photos, index_dir, settings, device="cpu", progress=False)
    stale = [
        index_dir / "qpert.faiss.tmp4242.faiss",
        index_dir / "baseline.owners.npy.tmp4242-0a1b2c3d",
        index_dir / "index.json.tmp",
    ]
    for path in stale:  # as kill -9 during the FAISS and manifest writes leaves them
        path.write_bytes(b"\0" * 100_000)
    with atomic_write(index_dir / "other.json") as live:  # another process still writing: kept
        live.write(b"{}")
        build_index(photos, index_dir, settings, device="cpu", progress=False)
        assert not [p for p in stale if p.exists()]
        assert len(list(index_dir.glob("other.json.tmp*"))) == 1
    assert (index_dir / "other.json").read_bytes() == b"{}" and not list(index_dir.glob("*.tmp*"))


def test_non_finite_alpha_is_refused_and_an_overflow_never_stored(models, tmp_path):
    with pytest.raises(ValueError, match="finite"):
        qpert.QPertConfig(alpha=float("inf"))
    with pytest.raises(ValueError, match="finite"):
        qpert.QPertConfig(alpha=float("nan"))
    with pytest.raises(ValueError, match="overflows"):  # infinite in float32: no score could be finite
        qpert.QPertConfig(alpha=1e308)
    photos = photo_folder(tmp_path / "photos", count=2)
    out = index_cli(
        "index", str(photos), "--model", str(models[0]), "--detector", "none", "--alpha", "inf", check=False
    )
    assert out.returncode == 2 and "error: alpha must be a finite real number" in out.stderr
    with pytest.raises(ValueError, match="non-finite image embeddings"):
        build_index(
            photos,
            tmp_path / "index",
            settings_for(models, qpert=qpert.QPertConfig(alpha=1e38)),
            device="cpu",
            progress=False,
        )
    assert not (tmp_path / "index" / "catalog.sqlite").exists() or catalog_state(tmp_path / "index")[0] == {}
    build_index(photos, tmp_path / "index", settings_for(models, detector="none"), device="cpu", progress=False)
    index = PhotoIndex(tmp_path / "index", device="cpu")
    index._itm = lambda rows, *args: np.full(len(rows), np.nan, np.float32)  # as an ITM head overflowing would
    with pytest.raises(ValueError, match="ITM re-ranking gave non-finite scores"):
        index.search("a red square", itm=True)
    index.close()


def flip_tensor_bytes(path, count: int = 64) -> None:
    """64 bytes inside a safetensors file's tensor data inverted, its size unchanged (a bad sector)."""
    blob = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little")
    at = start + max(0, (len(blob) - start - count) // 2)
    blob[at : at + count] = bytes(b ^ 0xFF for b in blob[at : at + count])
    path.write_bytes(bytes(blob))


def test_damaged_tokens_and_staged_results_are_never_read_as_data(models, tmp_path, monkeypatch, caplog):
    """Issue #23: a stored vision-token file that fails its checksum is encoded again from the photo at search
    time (and stored again by ``qpert index --rehash``); a damaged staged result is recomputed on resume."""
    photos = photo_folder(tmp_path / "photos", count=3)
    settings = settings_for(models, detector="none")
    build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    index = PhotoIndex(tmp_path / "index", device="cpu")
    clean = [(h.path, h.score) for h in index.search("a red square", k=3, itm=True)]
    index.close()
    (damaged,) = [p for p in (tmp_path / "index/features/tokens").glob("*.safetensors")][:1]
    flip_tensor_bytes(damaged)
    index = PhotoIndex(tmp_path / "index", device="cpu")
    with caplog.at_level("WARNING"):
        hits = [(h.path, h.score) for h in index.search("a red square", k=3, itm=True)]
    index.close()
    assert [p for p, _ in hits] == [p for p, _ in clean]
    np.testing.assert_allclose([s for _, s in hits], [s for _, s in clean], atol=1e-4)
    assert sum(str(damaged) in r.getMessage() and "checksum mismatch" in r.getMessage() for r in caplog.records) == 1
    assert damaged.exists(), "a search never writes to the index"

    caplog.clear()
    report = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False, rehash=True)
    assert report.updated == 1 and report.unchanged == 2
    index = PhotoIndex(tmp_path / "index", device="cpu")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert [(h.path, h.score) for h in index.search("a red square", k=3, itm=True)] == hits
    index.close()
    assert not caplog.records, "repaired: the stored tokens pass their checksum again"

    write_photo(photos / "new.png", seed=40)  # a run killed after staging its result, then a bad sector
    monkeypatch.setattr(indexer.Indexer, "merge", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    (staged,) = (tmp_path / "index/staging/photo").glob("*.safetensors")
    flip_tensor_bytes(staged)
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level("WARNING"):
        report = build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    assert report.added == 1 and any(str(staged) in r.getMessage() for r in caplog.records)
    assert build_index(photos, tmp_path / "fresh", settings, device="cpu", progress=False).photos == 4
    resumed, fresh = (vectors_by_path(tmp_path / name, "baseline") for name in ("index", "fresh"))
    assert resumed.keys() == fresh.keys()
    for path in fresh:  # the same photo encoded in another batch: equal to float tolerance
        np.testing.assert_allclose(resumed[path], fresh[path], atol=1e-4)


def vectors_by_path(index_dir, variant: str) -> dict[str, np.ndarray]:
    catalog = Catalog(index_dir / "catalog.sqlite", readonly=True)
    try:
        paths = {row.id: path for path, row in catalog.photos().items()}
        ids, vectors = catalog.vectors(variant)
        return {paths[int(i)]: v.copy() for i, v in zip(ids, vectors)}
    finally:
        catalog.close()


def write_protected(folder: Path, protect: bool) -> None:
    """Make ``folder`` and its files unwritable as read-only storage would, or writable again: ``chattr +i``
    when the tests run as root (who ignores file permissions, not the immutable attribute), else chmod."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "u+w" if protect is False else "a-w", str(folder)], check=True)
        return
    try:
        flag = subprocess.run(["chattr", "-R", "+i" if protect else "-i", str(folder)], capture_output=True, text=True)
    except FileNotFoundError:
        flag = None
    if protect and (flag is None or flag.returncode != 0):
        pytest.skip(f"running as root, and chattr +i is not available here ({flag and flag.stderr.strip()})")


def test_a_read_only_index_is_searched_and_not_updated(models, tmp_path, monkeypatch, capsys):
    """Issue #23: an index on read-only storage (a snapshot, another user's folder) is searched, ITM included,
    without writing anything beside it; `qpert index` on it says it is read-only."""
    photos = photo_folder(tmp_path / "photos", count=3)
    index = tmp_path / "index"
    build_index(photos, index, settings_for(models, detector="none"), device="cpu", progress=False)
    files = sorted(p.name for p in index.iterdir())
    assert "catalog.sqlite-wal" not in files  # the writer checkpointed on closing: nothing to follow
    reference = PhotoIndex(index, device="cpu")
    expected = [(h.path, h.score) for h in reference.search("a red square", k=10, itm=True)]
    reference.close()
    for leftover in index.glob("catalog.sqlite-*"):  # what a reader with write access leaves: SQLite's WAL files
        leftover.unlink()
    try:
        write_protected(index, True)
        out = run_in_process(monkeypatch, capsys, "search", index, "a red square", "--itm", "--json", "--device", "cpu")
        assert out.returncode == 0, out.stderr
        assert sorted(p.name for p in index.iterdir()) == files, "no lock, journal, WAL or shared-memory file"
        got = [(h["path"], h["score"]) for h in json.loads(out.stdout)["results"]]
        assert [p for p, _ in got] == [p for p, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-5)
        update = run_in_process(
            monkeypatch, capsys, "index", photos, "--index", index, "--model", models[0], "--detector", "none"
        )
        assert update.returncode == 2 and "Traceback" not in update.stderr, update.stderr
        (line,) = [x for x in update.stderr.splitlines() if x.startswith("error:")]
        assert f"the index {index} is read-only" in line and "Errno" not in line, line
    finally:
        write_protected(index, False)


def test_a_full_disk_keeps_the_previous_index_and_says_so(models, tmp_path, monkeypatch, capsys):
    """Issue #23: ENOSPC while staging results: one line after the progress bar, naming the file, saying that
    the previous index is intact and the command can be re-run."""
    photos = photo_folder(tmp_path / "photos", count=2)
    args = ("index", photos, "--index", tmp_path / "index", "--model", models[0], "--detector", "none")
    assert run_in_process(monkeypatch, capsys, *args, "--device", "cpu").returncode == 0
    before = catalog_state(tmp_path / "index")
    for i in range(2, 4):
        write_photo(photos / f"more{i}.png", seed=i + 20)
    with full_disk_for(monkeypatch, lambda path: "/staging/" in path):
        run = run_in_process(monkeypatch, capsys, *args, "--device", "cpu")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"no space left on the device while writing {tmp_path / 'index' / 'staging'}" in errors[0]
    assert "the previous index is intact" in errors[0] and "run the same command again" in errors[0]
    assert "Errno" not in errors[0] and "\nerror:" in "\n" + run.stderr, "the progress bar ends before the error"
    after = catalog_state(tmp_path / "index")
    assert after[0] == before[0] and after[3] == before[3]
    assert run_in_process(monkeypatch, capsys, *args, "--device", "cpu").returncode == 0
    assert len(catalog_state(tmp_path / "index")[0]) == 4


def test_a_large_jpeg_is_decoded_smaller_and_its_boxes_refer_to_the_photo_itself(models, tmp_path):
    """A phone-size JPEG is decoded at half scale (the decoder's own DCT scaling); its detections, stored size and
    Q-Pert geometry still refer to the upright photo, as if it had been decoded whole."""
    photos = tmp_path / "photos"
    turned = Image.open(write_photo(photos / "phone.jpg", seed=5, size=(2100, 2800)))  # stored 2800 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 2100 wide, 2800 high
    turned.save(photos / "phone.jpg", exif=exif, quality=90)
    build_index(photos, tmp_path / "index", settings_for(models), device="cpu", progress=False)
    index = PhotoIndex(tmp_path / "index", device="cpu")
    (row,) = index.rows.values()
    assert (row.width, row.height) == (2100, 2800)

    with Image.open(photos / "phone.jpg") as im:  # half scale, asked for explicitly: 1400 x 1050 before turning
        im.draft("RGB", (1400, 1050))
        assert im.size == (1400, 1050)
        half = ImageOps.exif_transpose(im).convert("RGB")
    (found,) = load_detector(str(models[1]), DetectorOptions(score_threshold=0.0, max_boxes=3)).detect([half])
    np.testing.assert_allclose(row.detections.boxes, found.boxes * 2, atol=0.02)
    query = "a red square on the left"
    reference = score(qpert.load_model(str(models[0])), [half], [found.boxes], [query], CONFIG)
    (hit,) = index.search(query, k=1)
    np.testing.assert_allclose(hit.itc, reference["qpert"].itc[0, 0].item(), atol=1e-5)
    index.close()
