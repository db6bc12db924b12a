"""Query-aware Q-Pert on the toy benchmark (#22): subset captions, and re-scoring on the named boxes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

import qpert
from qpert.errors import ConfigError
from qpert.models.tiny import tiny_blip2, tiny_processor
from qpert.synthetic import COLOURS, SHAPES, SceneConfig, make_scenes, vocabulary
from qpert.synthetic.query_aware import GATED, NAMED, ROWS, SCENES, rescore, run_query_aware
from qpert.synthetic.scenes import named_objects


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A random tiny BLIP-2 with the scenes' vocabulary: Q-Pert moves its scores, which is all these tests need."""
    path = tmp_path_factory.mktemp("model")
    tiny_blip2(seed=5).save_pretrained(path)
    tiny_processor(vocabulary(), str(path)).save_pretrained(path)
    return qpert.load_model(str(path))


def test_subset_captions_name_some_shapes_of_the_scene_and_keep_every_box():
    for subset, full in zip(make_scenes(8, 60, SCENES), make_scenes(8, 60)):
        assert np.array_equal(subset.image, full.image) and subset.objects == full.objects  # boxes: all shapes
        names = {o.name for o in subset.objects}
        for text in subset.captions:
            words = text.split()
            mentioned = {f"{c} {s}" for c, s in itertools.pairwise(words) if c in COLOURS and s in SHAPES}
            assert mentioned <= names  # only shapes the scene holds
            named = named_objects(text, subset.objects)
            assert len(named) == len(mentioned) >= 1
            assert len(named) < len(names) or len(names) == 1  # at least one boxed shape goes unnamed
            assert set(words) <= set(vocabulary())
    with pytest.raises(ConfigError, match="caption_names"):
        SceneConfig(caption_names="some")


def test_rescoring_is_qpert_score_on_the_named_boxes(loaded):
    scenes = make_scenes(12, 3, SCENES)
    texts = [c for s in scenes for c in s.captions]
    config = qpert.QPertConfig(alpha=4.0, weight="constant", threshold=0.99)
    found = rescore(loaded, scenes, texts, {NAMED: [config], GATED: [config]}, k=len(scenes))
    assert found.t2i.all()  # k = every image: each pair is re-scored

    def score(i: int, t: int, boxes: np.ndarray) -> qpert.Scores:
        image = Image.fromarray(scenes[i].image)
        return qpert.score(loaded, [image], [boxes], [texts[t]], config, itm=False)

    pairs = [(i, t, named_objects(texts[t], scenes[i].objects)) for i in range(3) for t in range(len(texts))]
    i, t, named = next((i, t, n) for i, t, n in pairs if 0 < len(n) < len(scenes[i].objects))
    expected = score(i, t, scenes[i].boxes[list(named)])
    every_box = score(i, t, scenes[i].boxes)
    assert found.scores[NAMED, 4.0][i, t] == pytest.approx(float(expected["qpert"].itc[0, 0]), abs=1e-5)
    assert found.scores[GATED, 4.0][i, t] == pytest.approx(float(every_box["qpert"].itc[0, 0]), abs=1e-5)
    assert abs(float(expected["qpert"].itc[0, 0]) - float(every_box["qpert"].itc[0, 0])) > 1e-3  # boxes matter

    i, t, _ = next((i, t, n) for i, t, n in pairs if not n)  # the caption names no shape of this candidate
    baseline = float(score(i, t, scenes[i].boxes)["baseline"].itc[0, 0])
    for row in (NAMED, GATED):
        assert found.scores[row, 4.0][i, t] == pytest.approx(baseline, abs=1e-5)
        assert found.scores[row, 4.0][i, t] == found.baseline[i, t]


def test_rescoring_reaches_only_the_top_k(loaded):
    scenes = make_scenes(12, 6, SCENES)
    texts = [c for s in scenes for c in s.captions]
    config = qpert.QPertConfig(alpha=4.0, weight="constant", threshold=0.99)
    found = rescore(loaded, scenes, texts, {NAMED: [config], GATED: [config]}, k=2)
    assert (found.t2i.sum(0) == 2).all() and (found.i2t.sum(1) == 2).all()
    scores = found.scores[NAMED, 4.0]
    assert np.isfinite(scores[found.t2i | found.i2t]).all() and np.isinf(scores[~(found.t2i | found.i2t)]).all()


def test_run_query_aware_chooses_an_alpha_per_row(loaded, tmp_path):
    result = run_query_aware(
        tmp_path, model=loaded.name, seeds=(2000,), n_test=16, n_val=12, alphas=(0.5, 2.0), k=4, progress=False
    )
    assert set(result.alphas) == set(ROWS[1:]) and set(result.alphas.values()) <= {0.5, 2.0}
    lines = result.table().splitlines()
    assert [line[:26].strip() for line in lines[1:]] == list(ROWS)
