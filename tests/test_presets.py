"""`qpert index --preset laptop|quality` and the choice made without one: tiny random stand-ins of each preset's
real architectures (SigLIP / SigLIP 2 NaFlex + Faster R-CNN MobileNetV3 320; BLIP-2 + Faster R-CNN ResNet-50
FPN v2) through index -> search -> serve, and the reader pool that feeds the models."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode
from urllib.request import urlopen

import numpy as np
import pytest
import torch
from helpers.bench import run_in_process
from helpers.models import tiny_siglip, tiny_siglip2, tiny_siglip2_processor
from helpers.search_fixtures import photo_folder, save_siglip_folder, save_tiny_blip2
from PIL import Image

import qpert
from qpert.errors import ConfigError
from qpert.models.registry import MODELS
from qpert.search import presets
from qpert.search.indexer import _ordered
from qpert.search.presets import PRESETS, Preset, choose_models, get_preset
from qpert.search.searcher import PhotoIndex
from qpert.search.server import make_server

QUERY = "a red square"


def save_detector(architecture: str, path: Path) -> Path:
    """The preset's torchvision architecture with random weights, at a small input size (test speed)."""
    from torchvision.models import get_model

    from qpert.search.detectors import save_torchvision_detector

    torch.manual_seed(0)
    small = {"min_size": 64, "max_size": 96, "box_score_thresh": 0.0}
    model = get_model(architecture, weights=None, weights_backbone=None, num_classes=3, **small)
    save_torchvision_detector(model, architecture, ["__background__", "dog", "cat"], path, **small)
    return path


def save_siglip(path: Path) -> Path:
    return save_siglip_folder(tiny_siglip(seed=0), path)


def save_siglip2_naflex(path: Path) -> Path:
    path.mkdir(parents=True)
    tiny_siglip2(seed=0).save_pretrained(path)
    tiny_siglip2_processor(str(path)).save_pretrained(path)
    return path


def architecture(spec: str) -> str:
    return spec.split(":", 1)[1]


def test_presets_name_registered_models_and_torchvision_detectors():
    import torchvision

    detectors = torchvision.models.list_models(module=torchvision.models.detection)
    assert set(PRESETS) >= {"laptop", "quality"}
    for preset in PRESETS.values():
        assert preset.model in MODELS and architecture(preset.detector) in detectors
    assert MODELS[get_preset("laptop").model].image_size == 224 and get_preset("quality").model == "blip2-coco"
    for name in ("siglip-base", "siglip2-base", "siglip2-base-naflex"):
        assert MODELS[name].source.startswith("google/siglip")
    with pytest.raises(ConfigError, match="unknown preset 'tiny'"):
        get_preset("tiny")
    with pytest.raises(ConfigError, match="is registered"):
        presets.register_preset(Preset("laptop", "blip2", "none", "again"))


def test_without_a_choice_a_gpu_takes_quality_a_cpu_laptop_and_a_rerun_its_index(tmp_path, monkeypatch):
    gpu = choose_models(tmp_path / "index", "cuda")
    assert (gpu.model, gpu.detector) == (PRESETS["quality"].model, PRESETS["quality"].detector)
    assert "preset quality (a GPU is available)" in gpu.why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = choose_models(tmp_path / "index", "auto")
    assert (cpu.model, cpu.detector) == (PRESETS["laptop"].model, PRESETS["laptop"].detector)
    assert "preset laptop (no GPU" in cpu.why and "--preset" in cpu.why
    named = choose_models(tmp_path / "index", "cpu", preset="quality")
    assert (named.model, named.why) == ("blip2-coco", "")
    model_only = choose_models(tmp_path / "index", "cpu", model="blip2")
    assert model_only.model == "blip2" and model_only.detector == PRESETS["laptop"].detector
    assert "detector" in model_only.why and "model blip2" not in model_only.why
    assert choose_models(tmp_path / "index", "cpu", model="blip2", detector="none").why == ""
    # An index keeps its models on a re-run, whatever the machine.
    (tmp_path / "index").mkdir()
    stored = {"model": "siglip2-base", "detector": "torchvision:ssdlite320_mobilenet_v3_large"}
    manifest = {"format": 1, "photos": str(tmp_path), "settings": _settings_json(**stored)}
    (tmp_path / "index" / "index.json").write_text(json.dumps(manifest))
    again = choose_models(tmp_path / "index", "cuda")
    assert (again.model, again.detector) == (stored["model"], stored["detector"])
    assert again.why.startswith("following the index")
    assert choose_models(tmp_path / "index", "cuda", preset="quality").model == "blip2-coco"


def _settings_json(model: str, detector: str) -> dict:
    from qpert.search.indexer import IndexSettings

    return IndexSettings(model=model, detector=detector).to_json()


@pytest.mark.parametrize("family", ["siglip", "siglip2-naflex"])
def test_the_laptop_preset_is_taken_on_a_cpu_and_indexes_searches_and_serves(family, tmp_path, monkeypatch, capsys):
    model_dir = (save_siglip if family == "siglip" else save_siglip2_naflex)(tmp_path / family)
    laptop = PRESETS["laptop"]
    detector_dir = save_detector(architecture(laptop.detector), tmp_path / "detector")
    monkeypatch.setitem(PRESETS, "laptop", Preset("laptop", str(model_dir), str(detector_dir), "tiny stand-ins"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    photos = photo_folder(tmp_path / "photos", count=5)
    options = ("--detector-threshold", "0", "--max-boxes", "3", "--batch-size", "2")
    run = run_in_process(monkeypatch, capsys, "index", photos, *options)
    assert run.returncode == 0, run.stderr
    assert f"preset laptop (no GPU: indexing runs on the CPU): model {model_dir}, detector {detector_dir}" in run.stderr
    assert "5 photos indexed: 5 added" in run.stdout

    index = PhotoIndex(photos / ".qpert-index", device="cpu")
    try:
        assert (index.settings.model, index.settings.detector) == (str(model_dir), str(detector_dir))
        rows = sorted(index.rows.values(), key=lambda r: r.path)
        assert any(len(r.detections.boxes) for r in rows), "the detector's boxes reach the index"
        images = [Image.open(index.photos_dir / r.path).convert("RGB") for r in rows]
        loaded = qpert.load_model(str(model_dir))
        config = index.settings.qpert
        reference = qpert.score(loaded, images, [r.detections.boxes for r in rows], [QUERY], config)["qpert"]
        expected = [rows[i].path for i in np.argsort(-reference.itc[:, 0].numpy(), kind="stable")]
        assert [h.path for h in index.search(QUERY, k=5)] == expected
        server = make_server(index)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with urlopen(server.url + "api/search?" + urlencode({"q": QUERY, "k": 5}), timeout=60) as response:
                served = json.loads(response.read())
        finally:
            server.shutdown()
            server.server_close()
        assert [h["path"] for h in served["qpert"]] == expected
    finally:
        index.close()

    # A re-run on a machine with a GPU keeps the index's models (and finds nothing to do).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    again = run_in_process(monkeypatch, capsys, "index", photos, "--device", "cpu", *options)
    assert again.returncode == 0, again.stderr
    assert "following the index" in again.stderr and "5 unchanged" in again.stdout


def test_the_quality_preset_indexes_and_reranks_by_itm(tmp_path, monkeypatch, capsys):
    quality = PRESETS["quality"]
    model_dir = save_tiny_blip2(tmp_path / "blip2")
    detector_dir = save_detector(architecture(quality.detector), tmp_path / "detector")
    monkeypatch.setitem(PRESETS, "quality", Preset("quality", str(model_dir), str(detector_dir), "tiny stand-ins"))
    photos = photo_folder(tmp_path / "photos", count=4)
    run = run_in_process(
        monkeypatch, capsys, "index", photos, "--preset", "quality", "--device", "cpu", "--detector-threshold", "0"
    )
    assert run.returncode == 0, run.stderr
    assert "preset" not in run.stderr  # the user chose: nothing to explain
    index = PhotoIndex(photos / ".qpert-index", device="cpu")
    try:
        assert index.settings.model == str(model_dir) and index.settings.detector == str(detector_dir)
        assert len(index.search(QUERY, k=4, itm=True, candidates=4)) == 4
    finally:
        index.close()


def test_readers_keep_the_order_and_stay_a_bounded_distance_ahead():
    consumed = 0
    ahead_seen = []
    lock = threading.Lock()

    def read(item: int) -> int:
        with lock:
            ahead_seen.append(item - consumed)
        time.sleep(0.001 * (item % 3))  # out-of-order completion
        return item * 10

    with ThreadPoolExecutor(3) as pool:
        results = []
        for result in _ordered(pool, read, list(range(40)), ahead=5):
            results.append(result)
            consumed += 1
            time.sleep(0.002)  # a slow consumer: readers must wait, not race ahead
    assert results == [i * 10 for i in range(40)]
    assert max(ahead_seen) <= 5
