"""Synthetic scenes: determinism, pixel-exact boxes, the real loaders, and the shipped toy checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import qpert
from qpert.data.box_sources import flickr30k_entities_boxes, read_entities_sentences
from qpert.data.captions import pre_caption
from qpert.data.datasets import load_dataset
from qpert.eval.metrics import retrieval_metrics
from qpert.models import blip2
from qpert.synthetic import COLOURS, SHAPES, SceneConfig, make_scene, make_scenes, vocabulary, write_flickr30k

PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)


def test_scenes_are_deterministic_by_seed_and_index():
    a, b = make_scene(3, 17), make_scene(3, 17)
    assert np.array_equal(a.image, b.image) and a.objects == b.objects and a.captions == b.captions
    assert a.image_id != make_scene(4, 17).image_id
    assert not np.array_equal(a.image, make_scene(4, 17).image)
    assert make_scenes(3, 2, start=16)[1].captions == a.captions


def test_boxes_match_the_drawn_pixels():
    for scene in make_scenes(11, 40):
        img = scene.image.astype(np.float64)
        saturated = img.max(-1) - img.min(-1) > 80  # objects are saturated, the background is grey
        nearest = np.argmin(((img[..., None, :] - PALETTE) ** 2).sum(-1), axis=-1)
        outside = np.ones(saturated.shape, dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            outside[y0:y1, x0:x1] = False
            inside = saturated[y0:y1, x0:x1] & (nearest[y0:y1, x0:x1] == list(COLOURS).index(obj.colour))
            assert inside.mean() > 0.33, (scene.image_id, obj)  # a 5-px cross fills 9 of 25 pixels
            rows, cols = np.nonzero(inside)
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (0, 0, x1 - x0, y1 - y0)
        assert not saturated[outside].any(), scene.image_id


def test_scene_mix_small_and_large_and_captions_name_every_object():
    scenes = make_scenes(5, 200)
    kinds = {s.kind for s in scenes}
    assert kinds == {"small", "large"}
    for s in scenes:
        assert (s.max_area < 0.1) == (s.kind == "small")
        assert len(s.captions) == SceneConfig().captions_per_image
        for text in s.captions:
            assert all(f"{o.colour} {o.shape}" in text for o in s.objects)
            assert set(text.split()) <= set(vocabulary())
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)


def _spread(image: np.ndarray) -> np.ndarray:
    """Per-pixel channel spread: > 80 for the named colours, small for grey and the dull distractors."""
    return image.max(-1).astype(int) - image.min(-1)


def test_distractors_are_large_dull_unnamed_and_unboxed():
    bare = SceneConfig(distractors=(0, 0))
    covered = []
    for i in range(30):
        scene, plain = make_scene(9, i), make_scene(9, i, bare)
        assert scene.objects == plain.objects and scene.captions == plain.captions  # nothing names or boxes them
        changed = np.abs(scene.image.astype(int) - plain.image.astype(int)).max(-1) > 0
        covered.append(changed.mean())
        assert _spread(scene.image)[changed].max() < 80  # dull: never mistaken for a named colour
        assert not (changed & (_spread(plain.image) > 80)).any()  # named shapes are drawn on top, untouched
    assert min(covered) > 0.0 and np.mean(covered) > 0.1  # large: a blob fills several patches


def test_written_split_loads_through_the_real_loaders(tmp_path):
    scenes = make_scenes(7, 12)
    out = write_flickr30k(tmp_path, seed=7, count=12, split="val")
    ds = load_dataset("flickr30k", tmp_path, split="val")
    assert ds.image_ids == [s.image_id for s in scenes]
    assert ds.texts == [pre_caption(c) for s in scenes for c in s.captions]
    assert np.array_equal(ds.text_to_image, np.repeat(np.arange(12), 5))
    assert np.array_equal(np.asarray(Image.open(ds.image_paths[3])), scenes[3].image)  # lossless
    boxes = flickr30k_entities_boxes(out.entities, ds.image_ids)
    assert boxes.missing == []
    for s in scenes:
        assert np.array_equal(boxes[s.image_id].boxes, s.boxes) and boxes[s.image_id].size == (64, 64)
    assert np.allclose(boxes.max_areas(ds.image_ids), [s.max_area for s in scenes])
    sentences = read_entities_sentences(out.sentences / f"{scenes[0].image_id}.txt")
    assert [p.text for p in sentences[0].phrases]
    assert sentences[0].text == scenes[0].captions[0]


def test_shipped_checkpoint_retrieves_far_above_chance():
    assert Path(qpert.MODELS["blip2-shapes"].source).is_dir()
    loaded = qpert.load_model("blip2-shapes")
    scenes = make_scenes(424_242, 100)  # neither the training nor the validation stream
    texts = [c for s in scenes for c in s.captions]
    pixels = loaded.processor.image_processor(
        [Image.fromarray(s.image) for s in scenes], return_tensors="pt"
    ).pixel_values
    tok = loaded.processor.tokenizer(texts, padding="longest", return_tensors="pt")
    tokens = blip2.image_tokens(loaded.model, pixels)
    scores = blip2.itc_scores(
        blip2.image_embeddings(loaded.model, tokens),
        blip2.text_embeddings(loaded.model, tok.input_ids, tok.attention_mask),
    )
    with pytest.warns(UserWarning, match="area bin"):
        metrics = retrieval_metrics(scores.numpy(), np.repeat(np.arange(100), 5), [s.max_area for s in scenes])
    assert metrics.t2i["R@1"] > 20.0  # chance is 1%
    assert metrics.t2i["R@5"] > 50.0
