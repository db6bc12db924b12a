"""`qpert reproduce` end to end on the offline stand-in mirror (qpert.synthetic.mirror) with the toy
``blip2-shapes`` model: fetch, runs, comparison with the published numbers, report, resume, user mistakes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.bench import run_in_process

from qpert.config import QPertConfig
from qpert.data.box_sources import flickr30k_entities_boxes
from qpert.data.datasets import load_dataset
from qpert.data.layout import DataLayout
from qpert.eval.api import evaluate_benchmark
from qpert.eval.pipeline import EvalOptions
from qpert.models.registry import load_model
from qpert.reproduce.published import published
from qpert.synthetic.mirror import write_mirror

README = Path(__file__).parents[1] / "README.md"
SHARED_DESIGN = Path(__file__).resolve().parents[2] / "shared" / "DESIGN.md"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mirror")
    write_mirror(folder)
    return folder


def reproduce_cli(monkeypatch, capsys, mirror: Path, tmp_path: Path, protocol: str, *extra: str):
    """`qpert reproduce PROTOCOL` with the toy model, fetching from the stand-in mirror into tmp_path/data."""
    args = [
        "reproduce",
        protocol,
        "--model",
        "blip2-shapes",
        "--data-root",
        tmp_path / "data",
        "--mirror",
        mirror,
        "--catalog",
        mirror / "qpert-catalog.json",
        "--output-dir",
        tmp_path / "out",
        "--cache-dir",
        tmp_path / "cache",
        "--no-progress",
        *extra,
    ]
    return run_in_process(monkeypatch, capsys, *args)


def one_error_line(run) -> str:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    return errors[0]


def comparison(results: dict, run: str, method: str, direction: str, metric: str) -> dict:
    rows = [
        r
        for r in results["comparison"]
        if (r["run"], r["method"], r["direction"], r["metric"]) == (run, method, direction, metric)
    ]
    assert len(rows) == 1, (run, method, direction, metric)
    return rows[0]


def test_official_example_fetches_runs_compares_and_resumes(monkeypatch, capsys, mirror, tmp_path):
    run = reproduce_cli(monkeypatch, capsys, mirror, tmp_path, "official-example")
    assert run.returncode == 0, run.stderr
    assert "blip2-shapes is not the protocol's model" in run.stdout
    assert "fetched" in run.stderr and DataLayout(tmp_path / "data").manifest.is_file()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["protocol"] == "official-example" and results["model"] == "blip2-shapes"
    assert results["model_is_published"] is False
    assert set(results["runs"]) == {"official", "paper"}
    assert {r["compat"] for r in results["runs"].values()} == {"official", "paper"}

    # The published cell of the official example sits beside the measured one, and the difference is theirs.
    cell = comparison(results, "official", "qpert", "t2i", "R@1")
    assert cell["published"] == 89.88
    assert cell["difference"] == pytest.approx(cell["measured"] - 89.88, abs=0.006)
    assert comparison(results, "official", "qpert", "i2t", "small_R@1")["published"] == 93.33
    assert comparison(results, "paper", "qpert", "t2i", "R@1")["published"] is None
    assert comparison(results, "official", "baseline", "t2i", "R@1")["published"] is None

    # The measured numbers are those of the evaluation API run by hand with the example's setting.
    model = load_model("blip2-shapes", dtype="fp32")
    config = QPertConfig(alpha=8.0, weight="constant", threshold=0.99)
    for name, compat in (("official", "official"), ("paper", "paper")):
        by_hand = evaluate_benchmark(
            model,
            "flickr30k",
            tmp_path / "data",
            "entities",
            [config],
            options=EvalOptions(k=64, progress=False),
            compat=compat,
        )
        measured = results["runs"][name]["test"]
        for method in ("baseline", "qpert"):
            for direction in ("t2i", "i2t"):
                assert measured[method][direction] == by_hand.to_dict()[method][direction], (name, method)
        assert measured["settings"]["itm"] is True and measured["settings"]["k"] == 64

    page = (tmp_path / "out" / "report.html").read_text()
    for heading in ("Measured beside published", "Run official: all metrics", "Run paper: all metrics", "Sources"):
        assert heading in page
    assert "not the protocol" in page and "cannot be compared with the published ones" in page
    assert "LAPACK" in page  # the note on why the last digits may not reproduce

    # A second run fetches nothing and computes nothing: the data are verified and every feature is cached.
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    again = reproduce_cli(monkeypatch, capsys, mirror, tmp_path, "official-example")
    assert again.returncode == 0, again.stderr
    assert "fetched 0 files" in again.stderr
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == cached
    repeated = json.loads((tmp_path / "out" / "results.json").read_text())
    assert repeated["comparison"] == results["comparison"]


def test_flickr30k_tunes_on_val_and_adds_the_detector_run_binned_by_entities(monkeypatch, capsys, mirror, tmp_path):
    # A "detector" that found the first Entities box of every image, in COCO results format.
    fetched = run_in_process(
        monkeypatch,
        capsys,
        *("data", "fetch", "flickr30k", "--data-root", tmp_path / "data", "--mirror", mirror),
        *("--catalog", mirror / "qpert-catalog.json", "--no-progress"),
    )
    assert fetched.returncode == 0, fetched.stderr
    layout = DataLayout(tmp_path / "data")
    ids = [i for split in ("val", "test") for i in load_dataset("flickr30k", tmp_path / "data", split).image_ids]
    boxes = flickr30k_entities_boxes(layout.entities_annotations, ids)
    detections = [
        {"image_id": i, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.9, "category_id": 1}
        for i in ids
        for x0, y0, x1, y1 in boxes[i].boxes[:1].tolist()
    ]
    assert detections
    (tmp_path / "detections.json").write_text(json.dumps(detections))

    run = reproduce_cli(
        monkeypatch,
        capsys,
        mirror,
        tmp_path,
        "flickr30k",
        *("--detections", tmp_path / "detections.json"),
        "--alphas",
        "4,8",
    )
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["runs"]) == {"E", "D"}
    entities, detector = results["runs"]["E"], results["runs"]["D"]
    assert entities["tuned"] and detector["tuned"]
    # 2 alphas x 5 weights x 5 taus (and the baseline) on val; the chosen setting is the best by T2I mR@1.
    grid = {n: m for n, m in detector["tuning"].items() if n != "settings"}
    assert len(grid) == 2 * 5 * 5 + 1
    best = max((n for n in grid if n != "baseline"), key=lambda n: grid[n]["t2i"]["mR@1"])
    assert detector["config"] == detector["tuning"]["settings"]["methods"][best]
    # The paper bins Flickr30K by Entities boxes in its detector rows too: both runs share the size bins,
    # so their baselines (the same model without Q-Pert) agree in every binned metric.
    assert detector["bin_boxes"] == "entities"
    assert detector["test"]["baseline"] == entities["test"]["baseline"]
    assert comparison(results, "D", "qpert", "t2i", "mR@1")["published"] == 89.11
    assert comparison(results, "E", "baseline", "t2i", "small_R@1")["published"] == 81.33
    assert "tuning on val" in (tmp_path / "out" / "report.html").read_text()


def test_coco_runs_on_coco_entities(monkeypatch, capsys, mirror, tmp_path):
    run = reproduce_cli(monkeypatch, capsys, mirror, tmp_path, "coco", "--alphas", "8")
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["runs"]) == {"E"}
    assert results["runs"]["E"]["boxes"] == "coco-entities"
    assert all(r["published"] is None for r in results["comparison"])  # none transcribed: nothing invented
    assert DataLayout(tmp_path / "data").coco_entities.is_file()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("nonsense",), "unknown protocol 'nonsense'"),
        (("flickr30k", "--detections", "missing.json"), "--detections missing.json: no such file"),
        (("flickr30k", "--alphas", "4,x"), "--alphas"),
    ],
)
def test_user_mistakes_are_one_error_line(monkeypatch, capsys, tmp_path, extra, expected):
    monkeypatch.chdir(tmp_path)
    run = run_in_process(monkeypatch, capsys, "reproduce", *extra, "--data-root", tmp_path / "data")
    assert expected in one_error_line(run)
    assert not (tmp_path / "data").exists()  # nothing fetched before the mistake was found


def test_no_fetch_on_an_empty_root_says_what_is_missing(monkeypatch, capsys, tmp_path):
    run = run_in_process(
        monkeypatch,
        capsys,
        *("reproduce", "official-example", "--model", "blip2-shapes", "--no-fetch"),
        *("--data-root", tmp_path / "empty", "--output-dir", tmp_path / "out", "--no-progress"),
    )
    line = one_error_line(run)
    assert str(tmp_path / "empty") in line
    assert not (tmp_path / "out").exists()


def numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d+\.\d\d", text)]


def test_published_numbers_match_the_design_notes_and_the_readme():
    """The package's published numbers, read against the two places a person transcribed them from."""
    flickr = published("flickr30k")
    quoted = [
        flickr.row("E", "baseline").value("t2i", "R@1"),
        flickr.row("E", "qpert").value("t2i", "R@1"),
        flickr.row("D", "qpert").value("t2i", "R@1"),
        flickr.row("E", "baseline").value("t2i", "mR@1"),
        flickr.row("E", "qpert").value("t2i", "mR@1"),
        flickr.row("D", "qpert").value("t2i", "mR@1"),
        flickr.row("E", "baseline").value("t2i", "small_R@1"),
        flickr.row("E", "qpert").value("t2i", "small_R@1"),
    ]
    readme = README.read_text()
    paper = readme[readme.index("**The paper's tables**") :]
    assert numbers(paper)[:8] == quoted
    official = published("official-example").row("official", "qpert")
    example = readme[readme.index("prints T2I R@1/5/10") :]
    assert numbers(example)[:8] == [
        *(official.value("t2i", m) for m in ("R@1", "R@5", "R@10")),
        *(official.value("i2t", m) for m in ("R@1", "R@5", "R@10")),
        official.value("t2i", "small_R@1"),
        official.value("i2t", "small_R@1"),
    ]
    if not SHARED_DESIGN.is_file():
        pytest.skip(f"{SHARED_DESIGN} is absent: the design notes' quote is not checked")
    design = SHARED_DESIGN.read_text()
    assert numbers(design[design.index("Paper, BLIP-2 on Flickr30K T2I") :])[:8] == quoted
