"""A user's mistake on the command line ends with one ``error:`` line and exit code 2, never a traceback;
a bug still shows its traceback."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from helpers.bench import run_in_process

from qpert import cli
from qpert.models import registry

EVAL = ["eval", "--model", "{model}", "--dataset", "flickr30k", "--data-root", "{root}", "--no-cache"]
CASES = [
    (EVAL + ["--shard-size", "0"], "--shard-size"),
    (EVAL + ["--batch-size", "0"], "--batch-size"),
    (EVAL + ["--itm", "--k", "-1"], "--k"),
    (EVAL + ["--threshold", "1.5"], "(0, 1)"),
    (EVAL + ["--rank", "0"], "--rank"),
    (EVAL + ["--alpha", "inf"], "finite"),
    (EVAL + ["--alpha", "nan"], "finite"),
    (EVAL + ["--alpha", "1e308"], "overflows"),
    (EVAL + ["--alpha", "1e38", "--itm", "--k", "3"], "qpert-a1e+38-constant-t0.99 scores are not finite"),
    (EVAL + ["--weight", "square"], "--weight"),
    (EVAL + ["--compat", "lavis"], "--compat"),
    (EVAL + ["--config", "{tmp}/list.json"], "JSON object"),
    (EVAL + ["--config", "{tmp}/missing.json"], "missing.json"),
    (EVAL + ["--config", "{tmp}/broken.json"], "JSON"),
    (EVAL + ["--compat", "official", "--dtype", "fp16"], "float32"),
    (EVAL + ["--dtype", "fp64"], "dtype"),
    (EVAL + ["--max-boxes", "0"], "--max-boxes"),
    (["eval", "--model", "no-such-model", "--dataset", "flickr30k", "--data-root", "{root}"], "unknown model"),
    (["eval", "--model", "{model}", "--dataset", "flickr31k", "--data-root", "{root}", "--no-cache"], "dataset"),
    (
        [
            "tune",
            "--model",
            "{model}",
            "--dataset",
            "flickr30k",
            "--data-root",
            "{root}",
            "--no-cache",
            "--split",
            "test",
            "--select-by",
            "t2i R@2",
        ],
        "select_by",
    ),
    (["demo", "--seeds", "9"], "--seeds"),
    (["demo", "--query-aware", "--itm"], "--query-aware"),
    (["score", "{tmp}/missing.png", "-t", "x"], "no such image"),
    (["no-such-command"], "No such command"),
]


@pytest.mark.parametrize("args,message", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_user_mistakes_are_one_error_line(bench, tmp_path, monkeypatch, capsys, args, message):
    root, model = bench
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    (tmp_path / "broken.json").write_text("{not json")
    run = run_in_process(monkeypatch, capsys, *(a.format(model=model, root=root, tmp=tmp_path) for a in args))
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_a_bug_is_not_disguised_as_a_user_error(monkeypatch):
    """Only QPertError, OSError and option errors become one line: a ValueError from qpert's own code is a bug."""

    class Broken(dict):
        def values(self):
            raise ValueError("range() arg 3 must not be zero")

    monkeypatch.setattr(sys, "argv", ["qpert", "models"])
    monkeypatch.setattr(registry, "MODELS", Broken())
    with pytest.raises(ValueError, match="range"):
        cli.main()


@pytest.fixture(scope="module")
def bad_inputs(bench, tmp_path_factory):
    """What the table below feeds the CLI (issue #15): a photo index and damaged copies of it, annotation
    files whose fields have the wrong types, a 196-Mpx PNG header, the fixture benchmark."""
    import shutil
    import struct
    import zlib

    from helpers.bench import IDS

    from qpert.search.indexer import IndexSettings, build_index

    data, model = bench
    root = tmp_path_factory.mktemp("bad-inputs")
    image = data / "flickr30k/images/flickr30k-images" / f"{IDS[0]}.jpg"
    photos = root / "photos"
    photos.mkdir()
    for i in range(2):
        shutil.copy(data / "flickr30k/images/flickr30k-images" / f"{IDS[i]}.jpg", photos / f"p{i}.jpg")
    build_index(photos, root / "index", IndexSettings(model=str(model), detector="none"), device="cpu", progress=False)
    manifest = json.loads((root / "index" / "index.json").read_text())
    damaged = {
        "nosettings": json.dumps({k: v for k, v in manifest.items() if k != "settings"}),
        "badjson": "{nope",
        "listidx": "[]",
        "badalpha": json.dumps({**manifest, "settings": {**manifest["settings"], "qpert": {"alpha": "x"}}}),
    }
    for name, text in damaged.items():
        shutil.copytree(root / "index", root / name)
        (root / name / "index.json").write_text(text)
    shutil.copytree(root / "index", root / "corrupt")
    (root / "corrupt" / "catalog.sqlite").write_bytes(b"not a database " * 100)

    class Payload:  # what torch.load(weights_only=False) would call: harmless here, refused anyway
        def __reduce__(self):
            return (os.getcwd, ())

    from helpers.search_fixtures import save_tiny_detr

    for name, folder in (("picklemodel", model), ("pickledetr", save_tiny_detr(root / "detr"))):
        shutil.copytree(folder, root / name)
        (root / name / "model.safetensors").unlink()
        torch.save({"weight": Payload()}, root / name / "pytorch_model.bin")
    (root / "latin1.json").write_bytes(f'[{{"image": "{IDS[0]}.jpg", "caption": ["caf\xe9"]}}]'.encode("latin-1"))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 14000, 14000, 8, 2, 0, 0, 0)  # 196 Mpx, more than twice Pillow's limit
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    first = f"flickr30k-images/{IDS[0]}.jpg"
    files = {
        "list": [1, 2],
        "coco_bad": {"images": [{"id": 1, "file_name": None, "height": 1, "width": 1}], "annotations": []},
        "caps_num": [{"image": first, "caption": [1, 2]}],
        "caps_null": [{"image": first, "caption": None}],
        "caps_nullitem": [{"image": first, "caption": [None]}],
        "img_num": [{"image": 5, "caption": ["a"]}],
        "img_null": [{"image": None, "caption": ["a"]}],
        "karp_none": {"images": [None]},
        "karp_int": {"images": 5},
    }
    for name, value in files.items():
        (root / f"{name}.json").write_text(json.dumps(value))
    return {
        "img": image,
        "model": model,
        "data": data,
        "root": root,
        "photos": photos,
        "index": root / "index",
        "bomb": root / "bomb.png",
        "corrupt": root / "corrupt",
        **{name: root / name for name in damaged},
        **{name: root / f"{name}.json" for name in files},
        **{name: root / name for name in ("picklemodel", "pickledetr")},
        "latin1": root / "latin1.json",
    }


FILE_EVAL = ["eval", "--model", "{model}", "--dataset", "flickr30k", "--data-root", "{data}", "--no-cache"]
SCORE = ["score", "{img}", "--model", "{model}", "-t", "a small red square"]
INDEX = ["index", "{photos}", "--index", "{root}/new-index", "--model", "{model}", "--detector", "none"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
#: Issue #15's bad inputs, and more: files, devices, photo indexes, the search server.
BAD_INPUTS = [
    (["score", "{bomb}", "--model", "{model}", "-t", "x"], "decompression bomb"),
    ([*SCORE, "--threshold", "99999999999999999999"], "(0, 1)"),
    ([*SCORE, "--threshold", "abc"], "--threshold"),
    ([*SCORE, "--rank", "99999999999999999999", "--box", "1,1,30,20"], "--rank"),
    ([*SCORE, "--alpha", "1e400"], "finite"),
    ([*SCORE, "--alpha", "1e308", "--box", "1,1,30,20"], "overflows"),
    ([*SCORE, "--alpha", "1e38", "--box", "1,1,30,20"], "qpert scores are not finite (Q-Pert with alpha=1e+38"),
    pytest.param([*SCORE, "--device", "cuda"], "no CUDA GPU", marks=NO_CUDA),
    ([*SCORE, "--device", "cuda:999"], "cuda:999"),
    ([*SCORE, "--device", "tpu9"], "unknown device"),
    ([*SCORE, "--device", ""], "unknown device"),
    ([*SCORE, "--device", "meta"], "cpu, cuda or mps"),
    ([*SCORE, "--box", "1,2,3"], "x0,y0,x1,y1"),
    (["score", "{root}", "--model", "{model}", "-t", "x"], "not a readable image"),
    (["score", "{img}", "--model", "{list}", "-t", "x"], "not a folder"),
    (["caption", "{img}", "--num-beams", "0"], "--num-beams"),
    ([*FILE_EVAL, "--itm", "--k", "0"], "--k"),
    ([*FILE_EVAL, "--device", "tpu9"], "unknown device"),
    ([*FILE_EVAL, "--captions", "{caps_num}"], "must be a list of strings"),
    ([*FILE_EVAL, "--captions", "{caps_null}"], "must be a list of strings"),
    ([*FILE_EVAL, "--captions", "{caps_nullitem}"], "must be a list of strings"),
    ([*FILE_EVAL, "--captions", "{img_num}"], "named by a file name"),
    ([*FILE_EVAL, "--captions", "{img_null}"], "named by a file name"),
    ([*FILE_EVAL, "--captions", "{karp_none}"], "'images' must be a list"),
    ([*FILE_EVAL, "--captions", "{karp_int}"], "'images' must be a list"),
    ([*FILE_EVAL, "--captions", "{list}"], "entry without 'image'"),
    ([*FILE_EVAL, "--captions", "{latin1}"], "not UTF-8"),
    (["score", "{img}", "--model", "{picklemodel}", "-t", "x"], "pytorch_model.bin is not a loadable checkpoint"),
    (["eval", "--model", "{picklemodel}", "--dataset", "flickr30k", "--data-root", "{data}"], "only safetensors"),
    (["index", "{photos}", "--index", "{root}/i2", "--model", "{picklemodel}", "--detector", "none"], "pickles"),
    (["index", "{photos}", "--index", "{root}/i3", "--model", "{model}", "--detector", "{pickledetr}"], "pickles"),
    ([*INDEX, "--batch-size", "0"], "--batch-size"),
    ([*INDEX, "--max-boxes", "0"], "--max-boxes"),
    ([*INDEX, "--detector-threshold", "nan"], "score threshold"),
    ([*INDEX, "--faiss", "nope"], "unknown FAISS index kind"),
    ([*INDEX, "--alpha", "inf"], "finite"),
    ([*INDEX, "--device", "tpu9"], "unknown device"),
    ([*INDEX, "--annotations", "{list}"], "COCO instances"),
    ([*INDEX, "--annotations", "{coco_bad}"], "file_name"),
    (["index", "{bomb}", "--model", "{model}", "--detector", "none"], "not a folder"),
    (["index", "{photos}", "--index", "{list}", "--model", "{model}", "--detector", "none"], "File exists"),
    (["index", "{photos}", "--index", "{nosettings}", "--model", "{model}", "--detector", "none"], "damaged"),
    (
        ["index", "{photos}", "--index", "{corrupt}", "--model", "{model}", "--detector", "none", "--device", "cpu"],
        "damaged",
    ),
    (["search", "{index}", "q", "--k", "-1"], "--k"),
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
    (["demo", "--k", "0"], "--k"),
]


@pytest.mark.parametrize(
    "args, message", BAD_INPUTS, ids=lambda v: " ".join(v[:1] + v[-2:]) if isinstance(v, list) else ""
)
def test_bad_inputs_end_in_one_error_line(bad_inputs, args, message, capsys, monkeypatch):
    """Each mistake: exit code 2, exactly one ``error:`` line naming it, no traceback (a server that would
    start fails the test instead of running)."""
    from qpert.search.server import SearchServer

    monkeypatch.setattr(SearchServer, "serve_forever", lambda self: pytest.fail("the server started"))
    run = run_in_process(monkeypatch, capsys, *(a.format(**{k: str(v) for k, v in bad_inputs.items()}) for a in args))
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2, run
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert "Traceback" not in run.stdout + run.stderr
