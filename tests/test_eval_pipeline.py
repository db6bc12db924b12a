"""The benchmark harness end to end on a fixture dataset in the real on-disk formats."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.bench import IDS, WORDS, eval_args, fixture_data, qpert_cli, run_in_process
from helpers.contract import needs_cpp_compiler
from helpers.disk import full_disk_for
from helpers.processes import kill_when
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_file_bytes

import qpert
from qpert.data.box_sources import flickr30k_entities_boxes
from qpert.data.datasets import load_dataset
from qpert.eval import cache as cache_module
from qpert.eval.metrics import retrieval_metrics
from qpert.eval.pipeline import EvalOptions, evaluate
from qpert.models.tiny import tiny_blip2, tiny_processor

#: What the evaluation caches, one folder each.
KINDS = ("tokens", "text", "subspaces", "itc", "itm")


def reference_scores(model, processor, dataset, boxes, config, k):
    """ITC of every pair and ITM re-ranking through the plain HF forward, one pair at a time."""
    images = [Image.open(p).convert("RGB") for p in dataset.image_paths]
    px = processor.image_processor(images, return_tensors="pt").pixel_values
    sizes = [(im.height, im.width) for im in images]
    n_img, n_txt = len(images), len(dataset.texts)
    itc, itm = torch.zeros(n_img, n_txt), torch.zeros(n_img, n_txt)
    handle = qpert.attach(model, config) if config else None
    try:
        for i in range(n_img):
            for t, text in enumerate(dataset.texts):
                tok = processor.tokenizer([text], return_tensors="pt")
                ctx = handle.objects([boxes[dataset.image_ids[i]].boxes], [sizes[i]]) if handle else _null()
                with torch.no_grad(), ctx:
                    itc[i, t] = model(pixel_values=px[i : i + 1], **tok).logits_per_image[0, 0]
                    itm[i, t] = model(
                        pixel_values=px[i : i + 1], use_image_text_matching_head=True, **tok
                    ).logits_per_image[0, 1]
    finally:
        if handle:
            handle.detach()
    t2i = torch.full_like(itc, -torch.inf)
    for t in range(n_txt):
        top = itc[:, t].topk(k).indices
        t2i[top, t] = itm[top, t] + itc[top, t]
    i2t = torch.full_like(itc, -torch.inf)
    for i in range(n_img):
        top = itc[i].topk(k).indices
        i2t[i, top] = itm[i, top] + itc[i, top]
    return itc.numpy(), t2i.numpy(), i2t.numpy()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("itm", [False, True], ids=["itc", "itm"])
def test_pipeline_matches_plain_per_pair_reference(bench, itm):
    root, model_dir = bench
    dataset = load_dataset("flickr30k", root, split="test")
    boxes = flickr30k_entities_boxes(root / "flickr30k/Annotations", dataset.image_ids)
    loaded = qpert.load_model(str(model_dir))
    config = qpert.QPertConfig(alpha=8.0, weight="inv_area", threshold=0.95)
    options = EvalOptions(itm=itm, k=3, batch_size=3, itm_batch_size=5, shard_size=3, progress=False)
    result = evaluate(loaded, dataset, boxes, {"baseline": None, "qpert": config}, options)
    max_areas = boxes.max_areas(dataset.image_ids)
    for name, cfg in (("baseline", None), ("qpert", config)):
        itc, t2i, i2t = reference_scores(loaded.model, loaded.processor, dataset, boxes, cfg, 3)
        expected = retrieval_metrics(
            t2i if itm else itc, dataset.text_to_image, max_areas, i2t_scores=i2t if itm else None
        )
        got = result.metrics[name]
        for d in ("t2i", "i2t"):
            assert np.array_equal(got.ranks[d], expected.ranks[d]), (name, d)
            assert got.to_dict()[d] == expected.to_dict()[d]
    assert not np.array_equal(result.metrics["qpert"].ranks["t2i"], result.metrics["baseline"].ranks["t2i"]) or itm, (
        "Q-Pert should change some ITC ranking on this fixture"
    )


@needs_cpp_compiler
@pytest.mark.slow
def test_compiled_vision_encoder_scores_as_eager(bench, tmp_path):
    """``compile_vision``: the vision encoder runs through torch.compile (inductor, here on the CPU) and the
    evaluation gives the eager run's scores (ranks may swap on this random model's near-ties); the Q-Former with
    Q-Pert's hooks stays eager. ``qpert eval --compile`` reaches it."""
    root, model_dir = bench
    dataset = load_dataset("flickr30k", root, split="test")
    boxes = flickr30k_entities_boxes(root / "flickr30k/Annotations", dataset.image_ids)
    methods = {"baseline": None, "qpert": qpert.QPertConfig(alpha=8.0, threshold=0.95)}
    results = {}
    for compiled in (False, True):
        loaded = qpert.load_model(str(model_dir))
        options = EvalOptions(
            itm=True,
            k=3,
            batch_size=3,
            itm_batch_size=5,
            shard_size=3,
            progress=False,
            keep_scores=True,
            compile_vision=compiled,
        )
        results[compiled] = evaluate(loaded, dataset, boxes, methods, options)
        assert (getattr(loaded.model.vision_model, "_compiled_call_impl", None) is not None) == compiled
        assert getattr(loaded.model.qformer, "_compiled_call_impl", None) is None
    assert results[True].settings["compiled"] and not results[False].settings["compiled"]
    for name in methods:
        np.testing.assert_allclose(results[True].scores[name], results[False].scores[name], rtol=1e-4, atol=1e-5)
    assert not np.allclose(results[True].scores["qpert"], results[True].scores["baseline"])
    out = qpert_cli(
        *eval_args(model_dir, root),
        "--no-cache",
        "--no-itm",
        "--compile",
        "--output",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["compiled"] is True


def test_compile_without_a_cpp_compiler_is_a_clear_error(bench, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(OSError, match="needs a C\\+\\+ compiler"):
        qpert.compile_vision_encoder(qpert.load_model(str(bench[1])).model)


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing(bench, tmp_path, monkeypatch):
    root, model_dir = bench
    dataset = load_dataset("flickr30k", root, split="test")
    boxes = flickr30k_entities_boxes(root / "flickr30k/Annotations", dataset.image_ids)
    loaded = qpert.load_model(str(model_dir))
    methods = {"baseline": None, "qpert": qpert.QPertConfig(alpha=6.0)}
    options = EvalOptions(itm=True, k=3, batch_size=2, shard_size=2, cache_dir=tmp_path / "cache", progress=False)
    clean = evaluate(loaded, dataset, boxes, methods, EvalOptions(**{**options.__dict__, "cache_dir": None}))

    real_save = cache_module.FeatureStore.save
    saves = []

    def dying_save(self, kind, key, tensors):
        if len(saves) == 9:  # the process "dies" mid-way, while writing its 10th file
            path = self._path(kind, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_name(path.name + ".tmp999").write_bytes(b"half a file")
            raise KeyboardInterrupt
        saves.append(kind)
        real_save(self, kind, key, tensors)

    monkeypatch.setattr(cache_module.FeatureStore, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        evaluate(loaded, dataset, boxes, methods, options)
    monkeypatch.setattr(cache_module.FeatureStore, "save", real_save)
    assert list((tmp_path / "cache").rglob("*.tmp999"))

    calls = []
    hook = loaded.model.vision_model.register_forward_hook(lambda m, args, out: calls.append(args))
    try:
        resumed = evaluate(loaded, dataset, boxes, methods, options)
    finally:
        hook.remove()
    shards_before_death = saves.count("tokens")
    assert len(calls) == sum(1 for s in range(0, 7, 2)) - shards_before_death, (
        "only the shards the killed run had not finished may be encoded again"
    )
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
    for name in methods:
        assert resumed.to_dict()[name] == clean.to_dict()[name]
    again = evaluate(loaded, dataset, boxes, methods, options)
    assert again.to_dict()["qpert"] == clean.to_dict()["qpert"]


def flip_tensor_bytes(path, count: int = 64) -> None:
    """What a bad sector or a partial copy does: ``count`` bytes inside the tensor data inverted, size unchanged."""
    blob = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(blob[:8], "little")  # safetensors: header length, header, then the data
    at = start + max(0, (len(blob) - start - count) // 2)
    blob[at : at + count] = bytes(b ^ 0xFF for b in blob[at : at + count])
    size = path.stat().st_size
    path.write_bytes(bytes(blob))
    assert path.stat().st_size == size


def test_damaged_cache_files_are_recomputed_not_read(bench, tmp_path, caplog):
    """Issue #23: 64 bytes flipped in a file of each kind, and a file written without a checksum (an older
    qpert's): the next run gives the undamaged numbers, saying which file it recomputed."""
    root, model_dir = bench
    dataset, boxes = fixture_data(root)
    loaded = qpert.load_model(str(model_dir))
    methods = {"baseline": None, "qpert": qpert.QPertConfig(alpha=6.0)}

    def run(cache):
        options = EvalOptions(itm=True, k=3, batch_size=4, shard_size=4, cache_dir=cache, progress=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qpert.eval.cache"):
            result = evaluate(loaded, dataset, boxes, methods, options).to_dict()
        return [result[m] for m in methods], [r.getMessage() for r in caplog.records]

    clean, _ = run(None)
    for kind in KINDS:
        cache = tmp_path / kind
        assert run(cache)[0] == clean
        damaged = sorted(cache.glob(f"*/{kind}/*.safetensors"))[-1]
        flip_tensor_bytes(damaged)
        if kind == "subspaces":  # read only to make what is missing: ITC embeddings
            for itc in cache.glob("*/itc/*.safetensors"):
                itc.unlink()
        again, warned = run(cache)
        assert again == clean
        assert len(warned) == 1 and str(damaged) in warned[0] and "checksum mismatch" in warned[0], warned

    old = sorted((tmp_path / "text").glob("*/text/*.safetensors"))[0]  # as written before checksums
    old.write_bytes(save_file_bytes(load_file(old)))
    again, warned = run(tmp_path / "text")
    assert again == clean and len(warned) == 1 and "no checksum" in warned[0], warned
    assert cache_module.CHECKSUM in (safe_open(old, "pt").metadata() or {})  # recomputed, checksummed


def test_corrupt_image_is_a_counted_logged_skip(bench, tmp_path, caplog):
    root, model_dir = bench
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(root / "flickr30k", copy / "flickr30k")
    (copy / "flickr30k/images/flickr30k-images" / f"{IDS[2]}.jpg").write_bytes(b"this is not a jpeg")
    dataset = load_dataset("flickr30k", copy, split="test")
    boxes = flickr30k_entities_boxes(copy / "flickr30k/Annotations", dataset.image_ids)
    result = evaluate(
        qpert.load_model(str(model_dir)), dataset, boxes, {"baseline": None}, EvalOptions(itm=False, progress=False)
    )
    assert result.skipped_images == [IDS[2]]
    assert result.settings["num_images"] == 6 and result.settings["num_texts"] == 30
    assert result.settings["k"] == 64  # no k given, no registered spec: BLIP-2's (the paper's) re-ranking depth
    assert "skipping unreadable image" in caplog.text


@pytest.mark.slow
def test_cli_eval_and_tune_end_to_end(bench, tmp_path):
    root, model_dir = bench
    common = [
        "--model",
        str(model_dir),
        "--dataset",
        "flickr30k",
        "--data-root",
        str(root),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--k",
        "3",
    ]
    out = qpert_cli("eval", *common, "--boxes", "entities", "--itm", "--output", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    for method in ("baseline", "qpert"):
        for d in ("t2i", "i2t"):
            assert set(data[method][d]) >= {"R@1", "R@5", "R@10", "mR@1", "mR@5", "mR@10", "small_R@1", "median_rank"}
    assert data["settings"]["itm"] is True and data["settings"]["methods"]["qpert"]["alpha"] == 8.0
    assert "t2i R@1" in out.stdout

    # tuning reads the same layout (here the test split stands in for val)
    out = qpert_cli(
        "tune",
        *common,
        "--split",
        "test",
        "--boxes",
        f"coco-json:{root / 'detections.json'}",
        "--alphas",
        "2,8",
        "--thresholds",
        "0.9,0.99",
        "--weights",
        "constant,area",
        "--output",
        str(tmp_path / "best.json"),
    )
    assert out.returncode == 0, out.stderr
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["qpert"]["alpha"] in (2.0, 8.0) and best["selected_by"] == "t2i mR@1"
    assert sum(line.startswith("qpert-a") for line in out.stdout.splitlines()) == 8
    out = qpert_cli("eval", *common, "--boxes", "entities", "--no-itm", "--config", str(tmp_path / "best.json"))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data-root", "{tmp}/nothing", "--boxes", "entities"], "flickr30k"),
        (["--data-root", "{root}", "--boxes", "yolo:x.json"], "unknown box source"),
        (["--data-root", "{root}", "--boxes", "coco-json"], "needs a file"),
    ],
)
def test_cli_eval_bad_layouts_are_clear(bench, tmp_path, args, message):
    root, model_dir = bench
    args = [a.format(tmp=tmp_path, root=root) for a in args]
    out = qpert_cli("eval", "--model", str(model_dir), "--dataset", "flickr30k", *args, "--no-cache")
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_run_killed_by_sigkill_resumes_identically(bench, tmp_path):
    """Kill a real `qpert eval` process as soon as its first cache file lands, then run again."""
    root, model_dir = bench
    cache = tmp_path / "cache"
    args = [
        sys.executable,
        "-c",
        "from qpert.cli import main; main()",
        *eval_args(model_dir, root),
        "--boxes",
        "entities",
        "--k",
        "3",
        "--shard-size",
        "1",
        "--batch-size",
        "1",
    ]
    kill_when(
        args + ["--cache-dir", str(cache), "--output", str(tmp_path / "killed.json")],
        lambda: bool(list(cache.rglob("*.safetensors"))),
    )
    assert not (tmp_path / "killed.json").exists()
    done = len(list(cache.rglob("*.safetensors")))
    assert 1 <= done < len(IDS)
    resumed = qpert_cli(*args[3:], "--cache-dir", str(cache), "--output", str(tmp_path / "resumed.json"))
    clean = qpert_cli(*args[3:], "--no-cache", "--output", str(tmp_path / "clean.json"))
    assert resumed.returncode == 0 and clean.returncode == 0, resumed.stderr + clean.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("resumed.json", "clean.json"))
    assert a["baseline"] == b["baseline"] and a["qpert"] == b["qpert"]


def test_bin_boxes_place_images_by_another_source(bench, tmp_path):
    """Perturb with detector boxes, bin by Entities (the paper's protocol): the bins follow the bin boxes."""
    root, model_dir = bench
    dataset = load_dataset("flickr30k", root, split="test")
    entities = flickr30k_entities_boxes(root / "flickr30k/Annotations", dataset.image_ids)
    whole = [{"image_id": int(i), "bbox": [0, 0, 500, 500], "score": 1.0, "category_id": 1} for i in IDS]
    (tmp_path / "whole.json").write_text(json.dumps(whole))  # one box covering every image: all in the last bin
    common = [
        *eval_args(model_dir, root),
        "--no-cache",
        "--no-itm",
        "--boxes",
        f"coco-json:{tmp_path / 'whole.json'}",
    ]
    out = qpert_cli(*common, "--bin-boxes", "entities", "--output", str(tmp_path / "binned.json"))
    assert out.returncode == 0, out.stderr
    assert "binned by flickr30k-entities" in out.stdout
    binned = json.loads((tmp_path / "binned.json").read_text())
    assert binned["settings"]["bin_boxes"] == "flickr30k-entities" and binned["settings"]["boxes"] == "detector"
    expected = np.bincount(np.floor(entities.max_areas(dataset.image_ids) * 10).astype(int), minlength=10) * 5
    assert binned["baseline"]["t2i"]["bins"]["count"] == expected.tolist()
    out = qpert_cli(*common, "--output", str(tmp_path / "own.json"))
    assert out.returncode == 0, out.stderr
    own = json.loads((tmp_path / "own.json").read_text())
    assert own["baseline"]["t2i"]["bins"]["count"] == [0] * 9 + [35] and own["settings"]["bin_boxes"] == "detector"


def test_bin_boxes_on_a_coco_layout(tmp_path):
    """COCO images: perturb with COCO instances, bin by detector results (the paper bins COCO by CO-DINO)."""
    rng = np.random.default_rng(1)
    entries, instances, detections = [], {"images": [], "annotations": [], "categories": []}, []
    for n in range(4):
        image_id = 100 + n
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
            _mkdir(tmp_path / "coco/images/val2014") / name
        )
        entries.append({"image": f"val2014/{name}", "caption": [f"a photo of a {w} square" for w in WORDS[4:9]]})
        instances["images"].append({"id": image_id, "height": 40, "width": 50, "file_name": name})
        instances["annotations"].append(
            {"id": n, "image_id": image_id, "bbox": [0, 0, 10, 10], "category_id": 1, "iscrowd": 0, "area": 100}
        )
        side = [10, 20, 30, 45][n]  # detector areas 0.04, 0.16, 0.36, 0.81 of the 50 x 40 image
        detections.append({"image_id": image_id, "bbox": [0, 0, side, side * 40 / 50], "score": 0.9, "category_id": 1})
    (_mkdir(tmp_path / "coco/annotations") / "coco_karpathy_test.json").write_text(json.dumps(entries))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "codino.json").write_text(json.dumps(detections))
    model_dir = tmp_path / "model"
    tiny_blip2(seed=2).save_pretrained(model_dir)
    tiny_processor(WORDS, str(model_dir)).save_pretrained(model_dir)
    out = qpert_cli(
        *eval_args(model_dir, tmp_path, dataset="coco"),
        "--no-cache",
        "--no-itm",
        "--boxes",
        f"coco-instances:{tmp_path / 'instances.json'}",
        "--bin-boxes",
        f"coco-json:{tmp_path / 'codino.json'}",
        "--output",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["settings"]["bin_boxes"] == "detector" and result["settings"]["boxes"] == "coco-instances"
    assert result["qpert"]["i2t"]["bins"]["count"] == [1, 1, 0, 1, 0, 0, 0, 0, 1, 0]  # not the instances' 0.05


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.slow
def test_official_compat_end_to_end(bench, tmp_path):
    """--compat official: official box rules and conventions, float32, its own cache entries."""
    root, model_dir = bench
    dataset = load_dataset("flickr30k", root, split="test")
    common = [
        *eval_args(model_dir, root),
        "--k",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    for compat in ("paper", "official", "official"):
        out = qpert_cli(*common, "--compat", compat, "--output", str(tmp_path / f"{compat}.json"))
        assert out.returncode == 0, out.stderr
    official = json.loads((tmp_path / "official.json").read_text())
    s = official["settings"]
    assert s["compat"] == "official" and s["dtype"] == "float32" and s["methods"]["qpert"]["compat"] == "official"
    assert "official-code rules" in s["boxes_summary"] and official["qpert"]["convention"] == "official"
    fresh = qpert_cli(*common[:-2], "--no-cache", "--compat", "official", "--output", str(tmp_path / "fresh.json"))
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads((tmp_path / "fresh.json").read_text())["qpert"] == official["qpert"]  # cache keyed by compat
    boxes = flickr30k_entities_boxes(root / "flickr30k/Annotations", dataset.image_ids, rules="official")
    assert [len(boxes[i].boxes) for i in IDS] == [2] + [1] * 6  # only the entities the Sentences mention
    out = qpert_cli(*common, "--compat", "official", "--dtype", "fp16")
    assert out.returncode == 2 and out.stderr.count("error:") == 1 and "float32" in out.stderr
    out = qpert_cli(*common, "--compat", "official", "--projector", "random")
    assert out.returncode == 2 and "--compat paper" in out.stderr and "Traceback" not in out.stderr


def test_a_second_run_on_the_cache_keeps_the_first_runs_temporaries(tmp_path):
    """Two `qpert eval` sharing a cache: the one starting second removes only temporaries whose writer is gone
    (here a killed run's), never those another live process is still writing."""
    root = tmp_path / "cache"
    final = root / "tokens" / "live.safetensors"
    final.parent.mkdir(parents=True)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, torch; from pathlib import Path; from safetensors.torch import save; "
            "from qpert.atomic import atomic_write\n"
            f"with atomic_write(Path({str(final)!r})) as f:\n"
            "    f.write(save({'x': torch.arange(3.0)})); print('writing', flush=True)\n"
            "    sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline() == "writing\n"
        (live,) = final.parent.glob("live.safetensors.tmp*")
        dead = root / "tokens" / "dead.safetensors.tmp999"  # what a kill -9 mid-write leaves
        dead.write_bytes(b"half a file")
        cache_module.FeatureStore(root)  # the second run starts
        assert live.exists() and not dead.exists()
        writer.stdin.close()
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert not live.exists() and torch.equal(load_file(final)["x"], torch.arange(3.0))


def test_a_full_disk_names_the_cache_file_and_a_rerun_resumes(bench, tmp_path, monkeypatch, capsys):
    """Issue #23: ENOSPC while writing the feature cache: one line after the progress bar, naming the file."""
    root, model_dir = bench
    args = eval_args(model_dir, root, "--cache-dir", str(tmp_path / "cache"), "--shard-size", "4", "--device", "cpu")
    with full_disk_for(monkeypatch, lambda path: "/text/" in path):
        run = run_in_process(monkeypatch, capsys, *args)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"no space left on the device while writing {tmp_path / 'cache'}" in errors[0] and "/text/" in errors[0]
    assert "run the same command again, it resumes" in errors[0] and "Errno" not in errors[0]
    assert "\nerror:" in "\n" + run.stderr, "the progress bar ends before the error"
    assert list((tmp_path / "cache").rglob("tokens/*.safetensors")), "what was finished is kept"
    assert run_in_process(monkeypatch, capsys, *args).returncode == 0


def test_get_returns_a_sound_entry_and_none_for_a_missing_or_damaged_one(tmp_path):
    store = cache_module.FeatureStore(tmp_path)
    assert store.get("tokens", "k") is None
    tensor = torch.arange(4096, dtype=torch.float32)
    store.save("tokens", "k", {"t": tensor})
    assert torch.equal(store.get("tokens", "k")["t"], tensor)
    path = next(tmp_path.rglob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-100:-36] = bytes(64)  # inside the tensor bytes, size unchanged
    path.write_bytes(bytes(data))
    fresh = cache_module.FeatureStore(tmp_path)  # another process: nothing verified yet
    assert fresh.get("tokens", "k") is None and not path.exists()
