"""Scoring and the benchmark pipeline for BLIP, CoCa, SigLIP, SigLIP 2 NaFlex and InternVL-G (a stand-in)
through their retrieval interface.

``qpert.scoring.score`` is checked against each model's own forward (with Q-Pert's plain
hooks on the pixels' forward pass); the pipeline is then checked against ``score`` on the
fixture dataset of test_eval_pipeline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.bench import WORDS, eval_args, fixture_data, qpert_cli, reranked
from helpers.internvl_standin import own_itc
from helpers.internvl_standin import tiny_loaded as tiny_internvl_loaded
from helpers.models import (
    TEXT_LENGTH,
    tiny_blip,
    tiny_coca_dir,
    tiny_siglip,
    tiny_siglip2,
    tiny_siglip2_processor,
    tiny_siglip_config,
)
from PIL import Image
from transformers import BlipImageProcessor, BlipProcessor, SiglipImageProcessor, SiglipProcessor, SiglipVisionModel

import qpert
from qpert.errors import UnsupportedModelError
from qpert.eval.metrics import retrieval_metrics
from qpert.eval.pipeline import EvalOptions, evaluate
from qpert.models.registry import LoadedModel, family_of, retrieval_heads
from qpert.models.tiny import tiny_processor
from qpert.scoring import score

TEXTS = ["a small red square", "a big blue square in the corner", "the green box", "a photo of a yellow square"]
BOXES = [[[10.0, 12.0, 60.0, 44.0], [0.0, 0.0, 22.0, 25.0]], [[30.0, 30.0, 90.0, 90.0]], [[50.0, 5.0, 70.0, 30.0]]]
CONFIG = qpert.QPertConfig(alpha=4.0, weight="constant", threshold=0.95)


@pytest.fixture(scope="module", params=["blip", "siglip", "coca", "siglip2", "internvl"])
def loaded(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "coca":
        return qpert.load_model(str(tiny_coca_dir(path)))
    if request.param == "siglip2":
        return LoadedModel("tiny-siglip2", tiny_siglip2(seed=0), tiny_siglip2_processor(str(path)), None)
    if request.param == "internvl":
        return tiny_internvl_loaded(path)
    tokenizer = tiny_processor(WORDS, str(path)).tokenizer
    if request.param == "blip":
        processor = BlipProcessor(
            image_processor=BlipImageProcessor(size={"height": 28, "width": 28}), tokenizer=tokenizer
        )
        return LoadedModel("tiny-blip", tiny_blip(seed=0), processor, None)
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": 30, "width": 30}), tokenizer=tokenizer
    )
    return LoadedModel("tiny-siglip", tiny_siglip(seed=0), processor, None)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((100, 120), (100, 100), (60, 90))
    ]


def forward_itc(model, processor, image, texts) -> torch.Tensor:
    """(T,) ITC of one image through the model's own forward (SigLIP: its logit t * cos + b, undone)."""
    name = type(model).__name__
    if name == "CoCa":
        image_emb = model.encode_image(processor.image_transform(image)[None])[0]
        return model.encode_text(processor.tokenizer(texts)) @ image_emb
    if name == "InternVLModel":
        ids = processor.tokenizer(
            ["summarize:" + t for t in texts],
            padding="max_length",
            max_length=80,
            padding_side="right",
            return_tensors="pt",
        ).input_ids
        return own_itc(model, retrieval_heads(model).preprocess(model, processor, [image]), ids)[0]
    if name == "Siglip2Model":
        ids = processor.tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt").input_ids
        logits = model(input_ids=ids, **processor.image_processor([image], return_tensors="pt")).logits_per_image[0]
        return (logits - model.logit_bias) / model.logit_scale.exp()
    px = processor.image_processor([image], return_tensors="pt").pixel_values
    if name == "SiglipModel":
        ids = processor.tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids
        logits = model(input_ids=ids, pixel_values=px).logits_per_image[0]
        return (logits - model.logit_bias) / model.logit_scale.exp()
    tok = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    return model(pixel_values=px, **tok, use_itm_head=False).itm_score[0]


def forward_itm(model, processor, image, texts) -> torch.Tensor:
    """(T,) BLIP's ITM logit of one image with each text, [ENC] first as BLIP's evaluation feeds it
    (the tiny BLIP's vocabulary ends with [DEC] = bos, then [ENC])."""
    tok = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    tok["input_ids"][:, 0] = model.config.text_config.vocab_size - 1
    px = processor.image_processor([image], return_tensors="pt").pixel_values.expand(len(texts), -1, -1, -1)
    return model(pixel_values=px, **tok, use_itm_head=True).itm_score[:, 1]


def direct_scores(loaded, images, texts, boxes=None):
    """(ITC, ITM + ITC or None) image by image through the model's forward, Q-Pert attached by boxes."""
    model, processor = loaded.model, loaded.processor
    has_itm = type(model).__name__ == "BlipForImageTextRetrieval"
    handle = qpert.attach(model, CONFIG) if boxes else None
    itc, itm = torch.zeros(len(images), len(texts)), torch.zeros(len(images), len(texts))
    try:
        for i, image in enumerate(images):
            for out, forward, n in ((itc, forward_itc, 1), (itm, forward_itm, len(texts)))[: 1 + has_itm]:
                ctx = handle.objects([boxes[i]] * n, [(image.height, image.width)] * n) if handle else _null()
                with torch.no_grad(), ctx:
                    out[i] = forward(model, processor, image, texts)
    finally:
        if handle:
            handle.detach()
    return itc, (itm + itc if has_itm else None)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_score_matches_the_models_own_forward(loaded, images):
    got = score(loaded, images, BOXES, TEXTS, CONFIG)
    for name, boxes in (("baseline", None), ("qpert", BOXES)):
        itc, itm = direct_scores(loaded, images, TEXTS, boxes)
        assert torch.allclose(got[name].itc, itc, atol=1e-5), name
        assert (got[name].itm is None) == (itm is None)
        if itm is not None:
            assert torch.allclose(got[name].itm, itm, atol=1e-5), name
    changed = got["qpert"].itm if got["qpert"].itm is not None else got["qpert"].itc
    base = got["baseline"].itm if got["baseline"].itm is not None else got["baseline"].itc
    assert (changed - base).abs().max() > 1e-4, "Q-Pert must change the scores, else the test is vacuous"
    if got["qpert"].itm is not None:  # BLIP: the ITC pass has no cross-attention
        assert torch.equal(got["qpert"].itc, got["baseline"].itc)


def test_itm_only_where_there_is_an_itm_head(loaded, images):
    if type(loaded.model).__name__ == "BlipForImageTextRetrieval":
        assert score(loaded, images, BOXES, TEXTS, CONFIG, itm=False)["qpert"].itm is None
        return
    with pytest.raises(UnsupportedModelError, match="no image-text matching"):
        score(loaded, images, BOXES, TEXTS, CONFIG, itm=True)


def test_models_without_retrieval_heads_are_refused(images):
    vision = SiglipVisionModel(tiny_siglip_config().vision_config).eval()
    with pytest.raises(UnsupportedModelError, match=r"SiglipVisionModel has no image-text retrieval heads.*CoCa"):
        score(LoadedModel("v", vision, None, None), images, BOXES, TEXTS, CONFIG)


def test_pipeline_matches_scoring_on_the_fixture(bench, loaded, tmp_path):
    root, _ = bench
    dataset, boxes = fixture_data(root)
    options = EvalOptions(k=3, batch_size=3, itm_batch_size=5, shard_size=3, cache_dir=tmp_path, progress=False)
    methods = {"baseline": None, "qpert": CONFIG}
    first, result = vision_forwards(loaded.model, lambda: evaluate(loaded, dataset, boxes, methods, options))
    has_itm = type(loaded.model).__name__ == "BlipForImageTextRetrieval"
    assert result.settings["itm"] is has_itm
    images = [Image.open(p).convert("RGB") for p in dataset.image_paths]
    expected = score(loaded, images, [boxes[i].boxes for i in dataset.image_ids], dataset.texts, CONFIG)
    max_areas = boxes.max_areas(dataset.image_ids)
    # The fixture repeats captions across images: exact ties that float noise of batching may break
    # either way, so each rank must lie between the ranks with ties broken for and against the pair.
    own = 1e-5 * (np.arange(len(images))[:, None] == dataset.text_to_image[None, :])
    for name in ("baseline", "qpert"):
        itc = expected[name].itc
        t2i, i2t = reranked(expected[name].itm, itc, 3) if has_itm else (itc.numpy(), itc.numpy())
        best, worst = (
            retrieval_metrics(t2i + e, dataset.text_to_image, max_areas, i2t_scores=i2t + e).ranks for e in (own, -own)
        )
        for d in ("t2i", "i2t"):
            got = result.metrics[name].ranks[d]
            assert (best[d] <= got).all() and (got <= worst[d]).all(), (name, d)

    again, rerun = vision_forwards(loaded.model, lambda: evaluate(loaded, dataset, boxes, methods, options))
    assert first > 0 and again == 0, "a rerun must read the vision tokens from the cache"
    assert rerun.to_dict()["qpert"] == result.to_dict()["qpert"]


def vision_forwards(model, run):
    """(forward calls of the vision tower during ``run()``, its result)."""
    vision = model.visual.transformer if hasattr(model, "visual") else model.vision_model
    calls = []
    hook = vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        result = run()
    finally:
        hook.remove()
    return len(calls), result


def test_blip2_rerun_reads_vision_tokens_from_the_cache(bench, tmp_path):
    root, model_dir = bench
    loaded = qpert.load_model(str(model_dir))
    dataset, boxes = fixture_data(root)
    options = EvalOptions(itm=False, shard_size=3, cache_dir=tmp_path, progress=False)
    first, _ = vision_forwards(loaded.model, lambda: evaluate(loaded, dataset, boxes, {"baseline": None}, options))
    again, _ = vision_forwards(loaded.model, lambda: evaluate(loaded, dataset, boxes, {"baseline": None}, options))
    assert first > 0 and again == 0


def test_pipeline_itm_without_an_itm_head_is_a_clear_error(bench, loaded):
    dataset, boxes = fixture_data(bench[0])
    options = EvalOptions(itm=True, k=3, progress=False)
    if type(loaded.model).__name__ == "BlipForImageTextRetrieval":
        assert evaluate(loaded, dataset, boxes, {"baseline": None}, options).settings["itm"] is True
        return
    with pytest.raises(UnsupportedModelError, match="ITC only"):
        evaluate(loaded, dataset, boxes, {"baseline": None}, options)


def test_cli_eval_coca_defaults_to_itc_and_refuses_itm(bench, tmp_path):
    root, _ = bench
    model = tiny_coca_dir(tmp_path)
    common = [
        *eval_args(model, root),
        "--boxes",
        "entities",
        "--k",
        "3",
        "--alpha",
        "1",
        "--no-cache",
    ]
    out = qpert_cli(*common, "--output", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    assert "ITC only" in out.stdout and json.loads((tmp_path / "r.json").read_text())["settings"]["itm"] is False
    out = qpert_cli(*common, "--itm")
    assert out.returncode == 2 and "no image-text matching (ITM) head" in out.stderr and "Traceback" not in out.stderr


def test_vision_encoder_is_what_image_tokens_runs_outside_qpert(loaded, images):
    """What ``compile_vision_encoder`` compiles: a stack that ``image_tokens`` runs once per batch and that holds
    none of the cross-attentions Q-Pert hooks (their per-batch state must stay out of compiled code)."""
    model, retriever = loaded.model, retrieval_heads(loaded.model)
    encoder = retriever.vision_encoder(model)
    inside = {id(m) for m in encoder.modules()}
    sites = family_of(model).sites(model)
    assert sites and not any(id(site.module) in inside for site in sites)
    calls = []
    hook = encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        retriever.image_tokens(model, retriever.preprocess(model, loaded.processor, images))
    finally:
        hook.remove()
    assert calls == [1]
