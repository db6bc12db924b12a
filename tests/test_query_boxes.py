"""Query-aware Q-Pert in photo search: OWLv2 features stored at index time, boxes chosen per query."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.bench import run_in_process
from helpers.search_fixtures import photo_folder, save_tiny_blip2, save_tiny_detr, save_tiny_owlv2
from PIL import Image
from transformers import AutoProcessor, Owlv2ForObjectDetection

import qpert
from qpert.errors import ConfigError
from qpert.scoring import score
from qpert.search import query_boxes
from qpert.search.detectors import DetectorOptions
from qpert.search.indexer import IndexSettings, build_index
from qpert.search.query_boxes import KIND, QueryBoxOptions, phrases
from qpert.search.searcher import PhotoIndex

CONFIG = qpert.QPertConfig(alpha=4.0)
QUERY = "a red square"
PATCHES = 16  # the tiny OWLv2's 4 x 4 patches: every candidate is stored


def save_calm_owlv2(path):
    """The tiny OWLv2 with a class head whose logits stay in the sigmoid's slope (random ones saturate at 1)."""
    save_tiny_owlv2(path)
    model = Owlv2ForObjectDetection.from_pretrained(path)
    with torch.no_grad():
        for layer in (model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.mul_(0.05)
            layer.bias.zero_()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("query-boxes")
    blip2, detr, owl = save_tiny_blip2(root / "blip2"), save_tiny_detr(root / "detr"), save_calm_owlv2(root / "owl")
    photos = photo_folder(root / "photos", count=6)
    settings = IndexSettings(
        model=str(blip2),
        detector=str(detr),
        qpert=CONFIG,
        detector_options=DetectorOptions(score_threshold=0.0, max_boxes=2),
        query_boxes=str(owl),
        query_box_count=PATCHES,
    )
    build_index(photos, root / "index", settings, device="cpu", progress=False)
    index = PhotoIndex(root / "index", device="cpu")
    yield root, index, settings
    index.close()


def reference_boxes(owl_dir, image: Image.Image, texts, threshold: float, max_boxes: int):
    """What Owlv2ForObjectDetection and its own post-processing find for ``texts``, clipped to the photo
    and capped as the indexer's detectors keep boxes."""
    model, processor = Owlv2ForObjectDetection.from_pretrained(owl_dir).eval(), AutoProcessor.from_pretrained(owl_dir)
    inputs = processor(text=[list(texts)], images=image, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    (found,) = processor.post_process_grounded_object_detection(
        out, threshold=threshold, target_sizes=[(image.height, image.width)]
    )
    boxes, scores = found["boxes"], found["scores"]
    boxes = torch.stack([boxes[:, 0].clamp(0, image.width), boxes[:, 1].clamp(0, image.height),
                         boxes[:, 2].clamp(0, image.width), boxes[:, 3].clamp(0, image.height)], 1)  # fmt: skip
    order = scores.argsort(descending=True)[:max_boxes]
    return boxes[order].numpy(), scores[order].numpy(), [texts[int(i)] for i in found["labels"][order]]


def all_scores(owl_dir, images, texts):
    return np.concatenate([reference_boxes(owl_dir, im, texts, 0.0, PATCHES)[1] for im in images])


@pytest.mark.parametrize("query", [QUERY, "a red square, a green circle"])
def test_query_boxes_equal_owlv2_post_processing_and_qpert_equals_score(built, query):
    root, index, _ = built
    owl = root / "owl"
    rows = sorted(index.rows.values(), key=lambda r: r.path)
    images = [Image.open(index.photos_dir / r.path).convert("RGB") for r in rows]
    texts = phrases(query)
    assert len(texts) == (3 if "," in query else 1)
    threshold = float(np.median(all_scores(owl, images, texts)))  # about half of the boxes pass
    options = QueryBoxOptions(threshold=threshold, max_boxes=3, mode="add")
    hits = {h.path: h for h in index.search(query, k=6, itm=True, candidates=6, query_boxes=options)}
    chosen = []
    for row, image in zip(rows, images):
        boxes, scores, labels = reference_boxes(owl, image, texts, threshold, 3)
        got = hits[row.path].query_boxes
        assert len(got) == len(boxes) > 0
        np.testing.assert_allclose([b["box"] for b in got], boxes, atol=0.01)
        np.testing.assert_allclose([b["score"] for b in got], scores, atol=2e-3)  # fp16 class embeddings
        assert [b["label"] for b in got] == labels
        chosen.append(np.concatenate([row.detections.boxes, boxes]))
    by_hand = score(qpert.load_model(str(root / "blip2")), images, chosen, [query], CONFIG, itm=True)["qpert"]
    for i, row in enumerate(rows):  # the index keeps fp16 vision tokens
        np.testing.assert_allclose(hits[row.path].itc, by_hand.itc[i, 0], atol=2e-3)
        np.testing.assert_allclose(hits[row.path].score, by_hand.itm[i, 0], atol=2e-3)
    ranked = [h.score for h in hits.values()]
    assert ranked == sorted(ranked, reverse=True)


def test_replace_mode_uses_only_the_query_boxes(built):
    root, index, _ = built
    rows = sorted(index.rows.values(), key=lambda r: r.path)
    images = [Image.open(index.photos_dir / r.path).convert("RGB") for r in rows]
    options = QueryBoxOptions(threshold=0.0, max_boxes=1, mode="replace")
    hits = {h.path: h for h in index.search(QUERY, k=6, query_boxes=options)}
    chosen = [np.array([hits[r.path].query_boxes[0]["box"]], np.float32) for r in rows]
    by_hand = score(qpert.load_model(str(root / "blip2")), images, chosen, [QUERY], CONFIG, itm=False)["qpert"]
    np.testing.assert_allclose([hits[r.path].itc for r in rows], by_hand.itc[:, 0], atol=2e-3)


@pytest.mark.parametrize("itm", [False, True])
def test_a_query_matching_no_box_leaves_the_ranking_as_without_the_option(built, itm):
    _, index, _ = built
    plain = index.search(QUERY, k=4, itm=itm, candidates=6)
    none = index.search(QUERY, k=4, itm=itm, candidates=6, query_boxes=QueryBoxOptions(threshold=1.0))
    assert [h.query_boxes for h in none] == [[]] * 4
    assert [(h.path, h.score, h.itc, h.itm) for h in none] == [(h.path, h.score, h.itc, h.itm) for h in plain]


def test_search_options_are_checked(built):
    _, index, _ = built
    with pytest.raises(ConfigError, match="no-qpert"):
        index.search(QUERY, qpert=False, query_boxes=QueryBoxOptions())
    for bad in (dict(threshold=2.0), dict(max_boxes=0), dict(mode="union")):
        with pytest.raises(ConfigError):
            QueryBoxOptions(**bad)
    with pytest.raises(ConfigError, match="no-itm-features"):
        IndexSettings(query_boxes="hf:x", itm_features=False)


def test_adding_query_boxes_runs_only_the_detector_and_none_drops_them(built, tmp_path, monkeypatch, capsys):
    root, _, settings = built
    photos = shutil.copytree(root / "photos", tmp_path / "photos")
    index_dir = tmp_path / "index"
    plain = IndexSettings(**{**settings.__dict__, "query_boxes": None})
    build_index(photos, index_dir, plain, device="cpu", progress=False)

    index = PhotoIndex(index_dir, device="cpu")
    with pytest.raises(ConfigError) as refused:
        index.search(QUERY, query_boxes=QueryBoxOptions())
    index.close()
    assert "\n" not in str(refused.value) and "qpert index PHOTOS --query-boxes" in str(refused.value)
    out = run_in_process(monkeypatch, capsys, "search", index_dir, QUERY, "--query-boxes", "--device", "cpu")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and errors == [f"error: {refused.value}"] and "Traceback" not in out.stderr

    encoded = []
    real = qpert.search.indexer.retrieval_heads

    def counting(model):
        heads = real(model)
        return type(heads)(**{**heads.__dict__, "image_tokens": lambda *a: encoded.append(1) or heads.image_tokens(*a)})

    monkeypatch.setattr(qpert.search.indexer, "retrieval_heads", counting)
    report = build_index(photos, index_dir, settings, device="cpu", progress=False)
    assert (report.updated, encoded) == (6, [])  # the stored tokens are reused: the vision encoder never ran
    stored = list((index_dir / "features" / KIND).glob("*.safetensors"))
    assert len(stored) == 6
    tensors = qpert.eval.cache.FeatureStore(index_dir / "features").load(KIND, stored[0].stem)
    assert tensors["class_embeds"].dtype == torch.float16 and tensors["boxes"].shape == (PATCHES, 4)

    # a re-run without the option keeps them; `--query-boxes none` drops them
    assert query_boxes.resolve(None, None, index_dir) == (settings.query_boxes, PATCHES)
    assert query_boxes.resolve("none", None, index_dir) == (None, PATCHES)
    build_index(photos, index_dir, plain, device="cpu", progress=False)
    assert not list((index_dir / "features" / KIND).glob("*.safetensors"))


def test_cli_search_with_query_boxes_says_which_boxes_were_used(built, monkeypatch, capsys):
    root, _, _ = built
    out = run_in_process(monkeypatch, capsys, "search", root / "index", QUERY, "--query-boxes", "--json",
                         "--query-box-threshold", "0", "--max-query-boxes", "2", "--device", "cpu")  # fmt: skip
    assert out.returncode in (0, None), out.stderr
    result = json.loads(out.stdout)
    assert result["query_boxes"] is True
    assert all(
        len(h["query_boxes"]) == 2 and {"box", "score", "label"} <= set(h["query_boxes"][0]) for h in result["results"]
    )


def test_siglip_pooling_head_is_rescored_from_its_stored_tokens(built, tmp_path):
    """A family with one vector per photo and no ITM head: the pooling head alone is re-run."""
    from helpers.models import tiny_siglip
    from helpers.search_fixtures import save_siglip_folder

    root, _, _ = built
    model_dir = tmp_path / "siglip"
    save_siglip_folder(tiny_siglip(seed=0), model_dir)
    settings = IndexSettings(
        model=str(model_dir), detector="none", qpert=qpert.QPertConfig(alpha=0.6), query_boxes=str(root / "owl")
    )
    build_index(root / "photos", tmp_path / "index", settings, device="cpu", progress=False)
    index = PhotoIndex(tmp_path / "index", device="cpu")
    try:
        options = QueryBoxOptions(threshold=0.0, max_boxes=2)
        hits = {h.path: h for h in index.search(QUERY, k=6, query_boxes=options)}
    finally:
        index.close()
    rows = sorted(index.rows.values(), key=lambda r: r.path)
    images = [Image.open(index.photos_dir / r.path).convert("RGB") for r in rows]
    chosen = [np.array([b["box"] for b in hits[r.path].query_boxes], np.float32) for r in rows]
    assert all(len(c) == 2 for c in chosen)
    by_hand = score(qpert.load_model(str(model_dir)), images, chosen, [QUERY], settings.qpert)
    np.testing.assert_allclose([hits[r.path].itc for r in rows], by_hand["qpert"].itc[:, 0], atol=2e-3)
    assert not np.allclose(by_hand["qpert"].itc, by_hand["baseline"].itc)


def test_the_search_page_asks_for_query_boxes_and_gets_them(built):
    import threading
    from urllib.error import HTTPError
    from urllib.parse import urlencode
    from urllib.request import urlopen

    from qpert.search.server import make_server

    _, index, _ = built
    server = make_server(index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with urlopen(server.url + "api/info", timeout=60) as response:
            assert json.loads(response.read())["query_boxes"] is True
        params = urlencode({"q": QUERY, "k": 3, "query_boxes": 1})
        with urlopen(server.url + "api/search?" + params, timeout=60) as response:
            hits = json.loads(response.read())["qpert"]
        assert [h["query_boxes"] for h in hits] == [
            h.query_boxes for h in index.search(QUERY, k=3, query_boxes=QueryBoxOptions())
        ]
        with pytest.raises(HTTPError) as bad:
            urlopen(server.url + "api/search?" + urlencode({"q": QUERY, "query_boxes": 2}), timeout=60)
        assert bad.value.code == 400
    finally:
        server.shutdown()
        server.server_close()
    page = (Path(qpert.__file__).parent / "search" / "static" / "app.js").read_text()
    assert "query_boxes" in page and "QUERY_BOX_COLOR" in page
