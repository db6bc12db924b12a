"""Loading saved checkpoints through the users' code path, and the command line."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import qpert
from qpert.models.tiny import tiny_blip2, tiny_processor

WORDS = "a small red square large blue rectangle green circle".split()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-blip2")
    tiny_blip2(seed=7).save_pretrained(path)
    tiny_processor(WORDS, str(path)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    pixels = np.random.default_rng(0).integers(0, 255, size=(60, 90, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def test_load_saved_checkpoint_attach_and_run(saved_model, image_file):
    loaded = qpert.load_model(str(saved_model))
    assert type(loaded.model).__name__ == "Blip2ForImageTextRetrieval" and not loaded.model.training
    reference = tiny_blip2(seed=7)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    img = Image.open(image_file)
    inputs = loaded.processor(images=img, text=["a small red square"], return_tensors="pt")
    handle = qpert.attach(loaded.model, qpert.QPertConfig(alpha=8.0))
    try:
        with torch.no_grad():
            base = loaded.model(**inputs, use_image_text_matching_head=True).logits_per_image
            with handle.objects([[[5, 5, 30, 20]]], [(img.height, img.width)]):
                pert = loaded.model(**inputs, use_image_text_matching_head=True).logits_per_image
    finally:
        handle.detach()
    assert torch.isfinite(pert).all() and (pert - base).abs().max() > 1e-3


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        qpert.load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        qpert.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(TypeError, match="supports"):
        qpert.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        qpert.load_model("blip2", dtype="fp8")


def qpert_cli(*args):
    return subprocess.run([sys.executable, "-c", "from qpert.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_score_end_to_end(saved_model, image_file):
    out = qpert_cli("score", str(image_file), "--model", str(saved_model), "-t", "a small red square",
                    "-t", "a green circle", "--box", "5,5,30,20", "--box", "40,10,80,50", "--alpha", "6")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith(("a small", "a green"))]
    assert len(rows) == 2
    deltas = [float(r.split()[-1]) for r in rows]
    assert any(abs(d) > 0 for d in deltas)


@pytest.mark.parametrize("args,message", [
    (["score", "{img}", "--model", "{model}", "-t", "x", "--box", "1,2,3"], "x0,y0,x1,y1"),
    (["score", "{bad}", "--model", "{model}", "-t", "x"], "not a readable image"),
    (["score", "{img}", "--model", "{model}", "-t", "x", "--threshold", "1.5"], "(0, 1)"),
    (["score", "{img}", "--model", "no-such-model", "-t", "x"], "unknown model"),
])
def test_cli_user_errors_are_one_clear_line(saved_model, image_file, tmp_path, args, message):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    args = [a.format(img=image_file, model=saved_model, bad=bad) for a in args]
    out = qpert_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_cli_help_and_example():
    out = qpert_cli("--help")
    assert out.returncode == 0 and "example" in out.stdout and "score" in out.stdout
    out = qpert_cli("example")
    assert out.returncode == 0, out.stderr
    assert "a small red square" in out.stdout and "qpert.attach" in out.stdout


@pytest.fixture(scope="module")
def bad_inputs(saved_model, image_file, tmp_path_factory):
    """Everything the table below feeds the CLI: a photo index (and damaged copies), a tiny benchmark layout,
    annotation files whose fields have the wrong types, a 196-Mpx PNG header."""
    import json
    import shutil
    import struct
    import zlib

    from qpert.search.indexer import IndexSettings, build_index

    root = tmp_path_factory.mktemp("bad-inputs")
    photos = root / "photos"
    for i in range(2):
        Image.open(image_file).rotate(90 * i).save(photos.mkdir(exist_ok=True) or photos / f"p{i}.png")
    build_index(photos, root / "index", IndexSettings(model=str(saved_model), detector="none"), device="cpu",
                progress=False)
    manifest = json.loads((root / "index" / "index.json").read_text())
    damaged = {"nosettings": json.dumps({k: v for k, v in manifest.items() if k != "settings"}),
               "badjson": "{nope", "listidx": "[]",
               "badalpha": json.dumps({**manifest, "settings": {**manifest["settings"], "qpert": {"alpha": "x"}}})}
    for name, text in damaged.items():
        shutil.copytree(root / "index", root / name)
        (root / name / "index.json").write_text(text)
    shutil.copytree(root / "index", root / "corrupt")
    (root / "corrupt" / "catalog.sqlite").write_bytes(b"not a database " * 100)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 14000, 14000, 8, 2, 0, 0, 0))
                                    + chunk(b"IEND", b""))
    images = root / "data" / "flickr30k" / "images" / "flickr30k-images"
    images.mkdir(parents=True)
    shutil.copy(image_file, images / "1.jpg")
    (root / "data" / "flickr30k" / "annotations").mkdir()
    (root / "data" / "flickr30k" / "annotations" / "flickr30k_test.json").write_text(
        json.dumps([{"image": "flickr30k-images/1.jpg", "caption": ["a small red square"]}]))
    files = {"list.json": [1, 2], "coco_bad.json": {"images": [{"id": 1, "file_name": None, "height": 1, "width": 1}],
                                                     "annotations": []},
             "caps_num.json": [{"image": "flickr30k-images/1.jpg", "caption": [1, 2]}],
             "caps_null.json": [{"image": "flickr30k-images/1.jpg", "caption": None}],
             "caps_nullitem.json": [{"image": "flickr30k-images/1.jpg", "caption": [None]}],
             "img_num.json": [{"image": 5, "caption": ["a"]}], "img_null.json": [{"image": None, "caption": ["a"]}],
             "karp_none.json": {"images": [None]}, "karp_int.json": {"images": 5},
             "dets.json": [{"image_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9, "category_id": 1}]}
    for name, value in files.items():
        (root / name).write_text(json.dumps(value))
    return {"img": image_file, "model": saved_model, "root": root, "photos": photos, "index": root / "index",
            "bomb": root / "bomb.png", **{name: root / name for name in [*damaged, "corrupt", "data"]},
            **{name.removesuffix(".json"): root / name for name in files}}


EVAL = ["eval", "--model", "{model}", "--dataset", "flickr30k", "--data-root", "{data}", "--no-cache",
        "--boxes", "coco-json:{dets}"]
TUNE = ["tune", "--model", "{model}", "--dataset", "flickr30k", "--data-root", "{data}", "--no-cache", "--split", "test",
        "--boxes", "coco-json:{dets}"]
SCORE = ["score", "{img}", "--model", "{model}", "-t", "a small red square"]
INDEX = ["index", "{photos}", "--index", "{root}/new-index", "--model", "{model}", "--detector", "none"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
BAD_INPUTS = [
    (["score", "{bomb}", "--model", "{model}", "-t", "x"], "decompression bomb"),
    ([*SCORE, "--threshold", "99999999999999999999"], "fixed rank takes 1 to"),
    ([*SCORE, "--threshold", "abc"], "--threshold takes"),
    ([*SCORE, "--threshold", "1e400"], "(0, 1)"),
    ([*SCORE, "--threshold", "0"], "must be >= 1"),
    ([*SCORE, "--alpha", "inf"], "finite"),
    ([*SCORE, "--alpha", "nan"], "finite"),
    ([*SCORE, "--alpha", "1e400"], "finite"),
    ([*SCORE, "--alpha", "x"], "--alpha"),
    ([*SCORE, "--alpha", "1e308", "--box", "1,1,30,20"], "not finite"),
    pytest.param([*SCORE, "--device", "cuda"], "no CUDA GPU", marks=NO_CUDA),
    ([*SCORE, "--device", "cuda:999"], "cuda:999"),
    ([*SCORE, "--device", "tpu9"], "unknown device"),
    ([*SCORE, "--device", ""], "unknown device"),
    ([*SCORE, "--device", "meta"], "cpu, cuda or mps"),
    ([*SCORE, "--dtype", "fp8"], "unknown dtype"),
    ([*SCORE, "--weight", "nope"], "unknown weight function"),
    ([*SCORE, "--box", "1,2,3"], "x0,y0,x1,y1"),
    (["score", "{root}/missing.jpg", "--model", "{model}", "-t", "x"], "no such image"),
    (["score", "{root}", "--model", "{model}", "-t", "x"], "not a readable image"),
    (["score", "{img}", "--model", "no-such-model", "-t", "x"], "unknown model"),
    (["score", "{img}", "--model", "{list}", "-t", "x"], "not a folder"),
    (["score"], "Missing argument"),
    ([*SCORE, "--nope"], "No such option"),
    (["caption", "{img}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["caption", "{img}", "--num-beams", "0"], "--num-beams"),
    ([*EVAL, "--itm", "--k", "-1"], "--k"),
    ([*EVAL, "--k", "0"], "--k"),
    ([*EVAL, "--batch-size", "0"], "--batch-size"),
    ([*EVAL, "--itm-batch-size", "0"], "--itm-batch-size"),
    ([*EVAL, "--shard-size", "0"], "--shard-size"),
    ([*EVAL, "--max-boxes", "0"], "--max-boxes"),
    ([*EVAL, "--score-threshold", "nan"], "finite"),
    ([*EVAL, "--alpha", "inf"], "finite"),
    ([*EVAL, "--config", "{list}"], "expected a JSON object"),
    ([*EVAL, "--config", "{root}/missing.json"], "No such file"),
    ([*EVAL, "--captions", "{caps_num}"], "must be a list of strings"),
    ([*EVAL, "--captions", "{caps_null}"], "must be a list of strings"),
    ([*EVAL, "--captions", "{caps_nullitem}"], "must be a list of strings"),
    ([*EVAL, "--captions", "{img_num}"], "named by a file name"),
    ([*EVAL, "--captions", "{img_null}"], "named by a file name"),
    ([*EVAL, "--captions", "{karp_none}"], "'images' must be a list"),
    ([*EVAL, "--captions", "{karp_int}"], "'images' must be a list"),
    ([*EVAL, "--captions", "{list}"], "entry without 'image'"),
    ([*EVAL, "--split", "nope"], "unknown split"),
    (["eval", "--model", "{model}", "--dataset", "nope", "--data-root", "{data}"], "unknown dataset"),
    ([*EVAL, "--device", "tpu9"], "unknown device"),
    ([*TUNE, "--alphas", "a,b"], "comma-separated numbers"),
    ([*TUNE, "--alphas", "2,inf"], "finite"),
    ([*TUNE, "--thresholds", "5.5"], "(0, 1)"),
    ([*TUNE, "--select-by", "t2i R@99"], "select_by"),
    ([*INDEX, "--batch-size", "0"], "--batch-size"),
    ([*INDEX, "--max-boxes", "0"], "--max-boxes"),
    ([*INDEX, "--detector-threshold", "nan"], "finite"),
    ([*INDEX, "--faiss", "nope"], "unknown FAISS index kind"),
    ([*INDEX, "--alpha", "inf"], "finite"),
    ([*INDEX, "--threshold", "99999999999999999999"], "fixed rank takes 1 to"),
    ([*INDEX, "--device", "tpu9"], "unknown device"),
    ([*INDEX, "--dtype", "fp8"], "unknown dtype"),
    ([*INDEX, "--annotations", "{list}"], "COCO instances"),
    ([*INDEX, "--annotations", "{coco_bad}"], "file_name"),
    (["index", "{bomb}", "--model", "{model}", "--detector", "none"], "not a folder"),
    (["index", "{photos}", "--index", "{list}", "--model", "{model}", "--detector", "none"], "File exists"),
    (["index", "{photos}", "--index", "{nosettings}", "--model", "{model}", "--detector", "none"], "damaged"),
    (["index", "{photos}", "--index", "{corrupt}", "--model", "{model}", "--detector", "none", "--device", "cpu"],
     "damaged"),
    (["search", "{index}", "q", "--k", "-1"], "--k"),
    (["search", "{index}", "q", "--k", "0"], "--k"),
    (["search", "{index}", "q", "--k", "100000000000000000000"], "--k"),
    (["search", "{index}", "q", "--candidates", "0", "--itm"], "--candidates"),
    (["search", "{index}", "", "--device", "cpu"], "empty"),
    (["search", "{index}", "q", "--device", "cuda:999"], "cuda:999"),
    (["search", "{nosettings}", "q"], "damaged"),
    (["search", "{badjson}", "q"], "damaged"),
    (["search", "{listidx}", "q"], "damaged"),
    (["search", "{badalpha}", "q"], "damaged"),
    (["search", "{corrupt}", "q", "--device", "cpu"], "damaged"),
    (["search", "{root}", "q"], "not a qpert index"),
    (["serve", "{index}", "--port", "70000"], "--port"),
    (["serve", "{index}", "--port", "-1"], "--port"),
    (["serve", "{index}", "--host", "0.0.0.0"], "--allow-host"),
    (["serve", "{index}", "--allow-host", "a b"], "not a host name"),
    (["serve", "{index}", "--allow-host", "localhost:8765"], "not a host name"),
    (["serve", "{nosettings}"], "damaged"),
    (["serve", "{corrupt}", "--device", "cpu"], "damaged"),
    (["serve", "{index}", "--host", "203.0.113.7", "--port", "0", "--device", "cpu"], "cannot listen"),
    (["demo", "--seeds", "0"], "--seeds"),
    (["demo", "--k", "0"], "--k"),
    (["demo", "--n-test", "0"], "--n-test"),
    (["nosuch"], "No such command"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=lambda v: " ".join(v[:1] + v[-2:]) if isinstance(v, list) else "")
def test_bad_cli_inputs_end_in_one_error_line(bad_inputs, args, message, capsys, monkeypatch):
    """Each mistake: exit status 2, exactly one ``error:`` line naming it, no traceback (main() in-process,
    as the `qpert` entry point runs it; a server that would start fails the test instead of running)."""
    from qpert.cli import main
    from qpert.search.server import SearchServer

    monkeypatch.setattr(SearchServer, "serve_forever", lambda self: pytest.fail("the server started"))
    monkeypatch.setattr(sys, "argv", ["qpert", *(a.format(**{k: str(v) for k, v in bad_inputs.items()}) for a in args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2, (out, err)
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in out + err
