"""The object-embedding baseline (paper's Table F) on tiny BLIP-2, SigLIP and CoCa.

Its object embedding is checked against ROI pooling done plainly: the family's image embedding of
only the tokens a box covers (other tokens removed from the sequence), with the covered tokens
found by tests/reference_hooks.py's patch loops, not qpert's token weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.bench import WORDS, eval_args, fixture_data, qpert_cli, reranked
from helpers.internvl_standin import tiny_loaded as tiny_internvl_loaded
from helpers.models import tiny_blip, tiny_coca_dir, tiny_siglip
from helpers.reference_hooks import shortest_edge_objects, stretch_objects
from PIL import Image
from transformers import SiglipImageProcessor, SiglipProcessor

import qpert
from qpert.errors import UnsupportedModelError
from qpert.eval.pipeline import EvalOptions, evaluate
from qpert.models.registry import LoadedModel, family_of, retrieval_heads
from qpert.models.tiny import tiny_blip2, tiny_processor
from qpert.object_baseline import object_masks, object_similarities
from qpert.scoring import score

TEXTS = ["a small red square", "a big blue square in the corner", "the green box"]
BOXES = [[[10.0, 12.0, 60.0, 44.0], [0.0, 0.0, 22.0, 25.0]], [], [[30.0, 30.0, 90.0, 90.0], [50.0, 5.0, 52.0, 7.0]]]
SIZES = [(100, 120), (100, 100), (60, 90)]
CONFIG = qpert.QPertConfig(alpha=4.0)


def plain_objects(name, boxes, sizes):
    """[(token coverage, area)] per image, by the reference's loops over patches."""
    if name == "coca":
        return shortest_edge_objects(boxes, sizes, crop=28, grid=4, patch=7, prefix=1)
    return stretch_objects(
        boxes, sizes, input_size=30 if name == "siglip" else 28, grid=4, patch=7, prefix=0 if name == "siglip" else 1
    )


@pytest.fixture(scope="module", params=["blip2", "siglip", "coca", "internvl"])
def loaded(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "coca":
        return qpert.load_model(str(tiny_coca_dir(path)))
    if request.param == "internvl":  # the stand-in's input (28 px, 4 x 4 patches + CLS, stretched) is BLIP-2's
        return tiny_internvl_loaded(path)
    processor = tiny_processor(WORDS, str(path))
    if request.param == "blip2":
        return LoadedModel("blip2", tiny_blip2(seed=0), processor, None)
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": 30, "width": 30}), tokenizer=processor.tokenizer
    )
    return LoadedModel("siglip", tiny_siglip(seed=0), processor, None)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def tokens_of(loaded, images):
    retriever = retrieval_heads(loaded.model)
    return retriever.image_tokens(loaded.model, retriever.preprocess(loaded.model, loaded.processor, images))


def test_whole_image_box_is_the_image_without_its_prefix(loaded, images):
    model, retriever = loaded.model, retrieval_heads(loaded.model)
    layout = family_of(model).token_layout(model)
    tokens = tokens_of(loaded, images)
    masks = object_masks(layout, [[[0, 0, w, h]] for h, w in SIZES], SIZES)[:, 0]
    prefix = layout.num_prefix_tokens
    assert not masks[:, :prefix].any() and masks[:, prefix:].all()
    got = retriever.roi_embeddings(model, tokens, masks)
    expected = retriever.image_embeddings(model, tokens[:, prefix:])
    assert (got - expected).abs().max() <= 1e-5
    if prefix == 0:  # SigLIP: exactly the image embedding
        assert (got - retriever.image_embeddings(model, tokens)).abs().max() <= 1e-5


def test_combined_score_is_model_score_plus_best_object(loaded, images):
    model, retriever = loaded.model, retrieval_heads(loaded.model)
    name = type(model).__name__.lower()
    results = score(loaded, images, BOXES, TEXTS, CONFIG, object_baseline=True)
    tokens = tokens_of(loaded, images)
    ids, mask = retriever.tokenize(model, loaded.processor, TEXTS)
    text_emb = retriever.text_embeddings(model, ids, mask)
    base = results["baseline"]
    objects = plain_objects("coca" if name == "coca" else "siglip" if "siglip" in name else "blip2", BOXES, SIZES)
    for i, image_objects in enumerate(objects):
        sims = [
            retriever.itc_scores(
                retriever.image_embeddings(model, tokens[i : i + 1][:, torch.from_numpy(m > 0)]), text_emb
            )[0]
            for m, _area in image_objects
        ]
        best = torch.stack(sims).amax(0) if sims else base.itc[i]  # no boxes: the whole image is the object
        assert (results["object-embedding"].itc[i] - (base.itc[i] + best)).abs().max() <= 1e-5
        if base.itm is not None:
            assert (results["object-embedding"].itm[i] - (base.itm[i] + best)).abs().max() <= 1e-5
    assert (results["object-embedding"].itc - base.itc).abs().max() > 1e-3


def test_blip_has_no_pooling_to_restrict(tmp_path, images):
    model = tiny_blip(seed=0)
    tokens = torch.zeros(1, 17, 32)
    masks = torch.ones(1, 1, 17, dtype=torch.bool)
    with pytest.raises(UnsupportedModelError, match="object-embedding"):
        object_similarities(model, retrieval_heads(model), tokens, masks, torch.zeros(2, 16), torch.zeros(1, 2))


def test_pipeline_matches_scoring(bench, tmp_path):
    """``evaluate`` with the baseline: ITM + ITC + best object similarity on the top k of ITC + object similarity."""
    root, model_dir = bench
    dataset, boxes = fixture_data(root)
    loaded = qpert.load_model(str(model_dir))
    options = EvalOptions(
        k=3, batch_size=3, shard_size=3, cache_dir=tmp_path, progress=False, keep_scores=True, object_baseline=True
    )
    result = evaluate(loaded, dataset, boxes, {"baseline": None}, options)
    images = [Image.open(p).convert("RGB") for p in dataset.image_paths]
    expected = score(
        loaded, images, [boxes[i].boxes for i in dataset.image_ids], dataset.texts, CONFIG, object_baseline=True
    )["object-embedding"]
    t2i, _ = reranked(expected.itm, expected.itc, 3)
    got = result.scores["object-embedding"]
    assert np.array_equal(np.isfinite(got), np.isfinite(t2i))
    assert np.abs(got[np.isfinite(got)] - t2i[np.isfinite(t2i)]).max() <= 1e-4
    assert result.settings["object_baseline"] is True and set(result.metrics) == {"baseline", "object-embedding"}


def test_cli_eval_object_baseline(bench, tmp_path):
    root, model_dir = bench
    out = qpert_cli(
        *eval_args(model_dir, root),
        "--boxes",
        "entities",
        "--k",
        "3",
        "--no-cache",
        "--object-baseline",
        "--output",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr
    assert "object-embedding" in out.stdout and "object-embedding" in json.loads((tmp_path / "r.json").read_text())
