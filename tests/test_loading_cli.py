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

WORDS = ["a", "small", "red", "square", "large", "blue", "rectangle", "green", "circle"]


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
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        qpert.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(TypeError, match="supports"):
        qpert.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        qpert.load_model("blip2", dtype="fp8")


def qpert_cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from qpert.cli import main; main()", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_score_end_to_end(saved_model, image_file):
    out = qpert_cli(
        "score",
        str(image_file),
        "--model",
        str(saved_model),
        "-t",
        "a small red square",
        "-t",
        "a green circle",
        "--box",
        "5,5,30,20",
        "--box",
        "40,10,80,50",
        "--alpha",
        "6",
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith(("a small", "a green"))]
    assert len(rows) == 2
    deltas = [float(r.split()[-1]) for r in rows]
    assert any(abs(d) > 0 for d in deltas)


@pytest.mark.parametrize(
    "args,message",
    [
        (["score", "{img}", "--model", "{model}", "-t", "x", "--box", "1,2,3"], "x0,y0,x1,y1"),
        (["score", "{bad}", "--model", "{model}", "-t", "x"], "not a readable image"),
        (["score", "{img}", "--model", "{model}", "-t", "x", "--threshold", "1.5"], "(0, 1)"),
        (["score", "{img}", "--model", "no-such-model", "-t", "x"], "unknown model"),
    ],
)
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
