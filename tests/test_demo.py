"""`qpert demo` end to end at a reduced size."""

from __future__ import annotations

import re

import pytest

from qpert.demo import run_demo
from qpert.models.tiny import tiny_blip2, tiny_processor
from qpert.synthetic import vocabulary


@pytest.fixture(scope="module")
def random_shapes_model(tmp_path_factory):
    """A random tiny BLIP-2 with the scenes' vocabulary: exercises the pipeline, not the trained weights."""
    path = tmp_path_factory.mktemp("model")
    tiny_blip2(seed=5).save_pretrained(path)
    tiny_processor(vocabulary(), str(path)).save_pretrained(path)
    return path


def test_demo_writes_report_with_figure(random_shapes_model, tmp_path):
    result = run_demo(
        tmp_path / "demo",
        model=str(random_shapes_model),
        seeds=(2000, 2001),
        n_test=40,
        n_val=30,
        alphas=(0.5, 2.0),
        progress=False,
    )
    assert result.alpha in (0.5, 2.0)
    assert not result.itm and all(not res.settings["itm"] for res in result.tests.values())
    assert set(result.validation.metrics) == {"baseline", "alpha=0.5", "alpha=2"}
    for seed, res in result.tests.items():
        assert res.settings["num_images"] == 40 and res.settings["seed"] == seed
        assert res.settings["methods"]["qpert"]["alpha"] == result.alpha
    page = result.report.read_text()
    assert page.count("data:image/png;base64,") >= 2  # the bin chart and example thumbnails
    assert "R@1 per object-size bin" in page and "±" in result.summary()
    assert "ITC only: the toy's ITM head never learned" in page  # the default protocol, and why
    assert re.search(r"R@1\s+-?\d+\.\d+ ± \d+\.\d+", result.summary())
    # each seed has its own scenes: alpha is chosen on the validation seed's, never on a test seed's
    data = tmp_path / "demo/data"
    assert sorted(p.name for p in data.iterdir()) == ["seed1000", "seed2000", "seed2001"]
    images = {seed: sorted(p.read_bytes() for p in (data / seed).rglob("*.png")) for seed in ("seed1000", "seed2000")}
    assert len(images["seed1000"]) == 30 and len(images["seed2000"]) == 40
    assert not set(images["seed1000"]) & set(images["seed2000"])


@pytest.mark.slow
def test_demo_ablation_rows_and_rank_labels(random_shapes_model, tmp_path):
    """--ablation: each control gets its own alpha by the same rule, one table row per method; example
    queries never show the tie-worst rank of a right image that re-ranking did not see."""
    result = run_demo(
        tmp_path / "demo",
        model=str(random_shapes_model),
        seeds=(2000, 2001),
        n_test=40,
        n_val=30,
        alphas=(0.5, 2.0),
        itm=True,
        k=4,
        progress=False,
        ablation=True,
    )
    assert set(result.alphas) == {"qpert", "official projector", "random subspace", "query scaling"}
    assert set(result.alphas.values()) <= {0.5, 2.0}
    for res in result.tests.values():
        methods = res.settings["methods"]
        assert methods["random subspace"]["projector"] == "random" and methods["qpert"]["projector"] == "paper"
        assert methods["query scaling"]["alpha"] == result.alphas["query scaling"]
    table = result.ablation_table().splitlines()
    assert [line.split("  ")[0].strip() for line in table[1:]] == ["baseline", *result.alphas]
    assert all(line.count("±") == 6 for line in table[1:])
    page = result.report.read_text()
    assert "Ablation: which part of Q-Pert helps" in page and "toy model" in page.lower()
    assert "ITC + ITM re-ranking of the top 4" in page and "lowers R@1 against ITC alone" in page
    labels = re.findall(r"\((rank \d+|not in the top \d+)\)", page)
    assert labels and all(label == "not in the top 4" or int(label.split()[1]) <= 4 for label in labels)
