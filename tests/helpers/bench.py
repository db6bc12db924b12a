"""The fixture benchmark in the real on-disk formats (Flickr30K + Entities), and two CLI runners.

Shared by the evaluation, retrieval-family, object-baseline, captioning, CLI-error and CUDA tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qpert import cli
from qpert.data.box_sources import flickr30k_entities_boxes
from qpert.data.datasets import load_dataset
from qpert.data.layout import DataLayout
from qpert.models.tiny import tiny_blip2, tiny_processor

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 210), "green": (30, 190, 40), "yellow": (230, 220, 40)}


IDS = ["1000092795", "10002456", "1000268201", "1000344755", "1000366164", "1000523639", "1000919630"]


WORDS = [
    "a",
    "an",
    "the",
    "small",
    "big",
    "red",
    "blue",
    "green",
    "yellow",
    "square",
    "box",
    "in",
    "corner",
    "left",
    "right",
    "photo",
    "of",
    "with",
]


def entities_xml(width, height, boxes):
    objects = "".join(
        f"<object><name>{i + 1}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for i, (x0, y0, x1, y1) in enumerate(boxes)
    )
    scene = "<object><name>99</name><scene>1</scene></object>"
    return (
        f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}{scene}</annotation>"
    )


def build_bench(root: Path) -> tuple[Path, Path]:
    """7 Flickr-style images with coloured squares, LAVIS captions, Entities XML and Sentences, detector
    JSON, and a tiny BLIP-2 saved with its processor: (data root, model folder). ``bench`` in conftest.py."""
    rng = np.random.default_rng(0)
    layout = DataLayout(root)
    for folder in (layout.image_folder("flickr30k"), layout.entities_annotations, layout.entities_sentences):
        folder.mkdir(parents=True, exist_ok=True)
    entries, detections = [], []
    for n, image_id in enumerate(IDS):
        w, h = int(rng.integers(60, 140)), int(rng.integers(60, 140))
        pixels = rng.integers(80, 150, size=(h, w, 3), dtype=np.uint8)
        boxes, caps = [], []
        for j, colour in enumerate(rng.choice(list(COLOURS), size=2, replace=False)):
            side = int(rng.integers(6, min(w, h) // (2 - j % 2 + 1)))
            x0, y0 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            pixels[y0 : y0 + side, x0 : x0 + side] = COLOURS[colour]
            boxes.append((x0, y0, x0 + side, y0 + side))
            caps.append(f"a {'small' if side * side < 0.1 * w * h else 'big'} {colour} square")
        path = layout.image_folder("flickr30k") / f"{image_id}.jpg"
        Image.fromarray(pixels).save(path, quality=95)
        (layout.entities_annotations / f"{image_id}.xml").write_text(entities_xml(w, h, boxes))
        # entity 2 is mentioned only in image 0
        mentioned = "[/EN#1/other a square]" + (" and [/EN#2/other another]" if n == 0 else "")
        (layout.entities_sentences / f"{image_id}.txt").write_text(mentioned + " .\n")
        entries.append(
            {
                "image": str(path.relative_to(layout.images_dir("flickr30k"))),
                "caption": [
                    caps[0],
                    caps[1],
                    f"{caps[0]} with {caps[1]}",
                    f"a photo of {caps[1]}",
                    f"{caps[1]} in the corner",
                ],
            }
        )
        detections += [
            {"image_id": int(image_id), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.9 - 0.1 * j, "category_id": 1}
            for j, (x0, y0, x1, y1) in enumerate(boxes)
        ]
    layout.annotations_dir("flickr30k").mkdir(parents=True, exist_ok=True)
    layout.annotation_file("flickr30k", "test").write_text(json.dumps(entries))
    (root / "detections.json").write_text(json.dumps(detections))
    model_dir = root / "model"
    tiny_blip2(seed=11).save_pretrained(model_dir)
    tiny_processor(WORDS, str(model_dir)).save_pretrained(model_dir)
    return root, model_dir


def eval_args(model, root, *extra: str, dataset: str = "flickr30k") -> list[str]:
    """`qpert eval` on a model folder and data root; each test adds the options it varies."""
    return ["eval", "--model", str(model), "--dataset", dataset, "--data-root", str(root), *extra]


def qpert_cli(*args):
    return subprocess.run(
        [sys.executable, "-c", "from qpert.cli import main; main()", *args], capture_output=True, text=True, timeout=600
    )


def run_in_process(monkeypatch, capsys, *args) -> subprocess.CompletedProcess:
    """``qpert ARGS`` through ``cli.main()`` in this process, without an interpreter start-up: for error
    paths and short commands (``qpert_cli`` where logging or child processes matter)."""
    monkeypatch.setattr(sys, "argv", ["qpert", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, exit_info.value.code, out, err)


def fixture_data(root):
    dataset = load_dataset("flickr30k", root, split="test")
    return dataset, flickr30k_entities_boxes(DataLayout(root).entities_annotations, dataset.image_ids)


def reranked(final: torch.Tensor, itc: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """ITM + ITC on each query's top k by ITC, -inf elsewhere (DESIGN.md §2)."""
    t2i, i2t = torch.full_like(itc, -torch.inf), torch.full_like(itc, -torch.inf)
    for t in range(itc.shape[1]):
        top = itc[:, t].topk(k).indices
        t2i[top, t] = final[top, t]
    for i in range(itc.shape[0]):
        top = itc[i].topk(k).indices
        i2t[i, top] = final[i, top]
    return t2i.numpy(), i2t.numpy()
