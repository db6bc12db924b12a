"""Q-Pert on a CUDA device: agreement with the CPU in float32, and with float32 in fp16 / bf16.

Skipped without a GPU; ``bench/gpu_check.sh`` runs them on one. ``QPERT_TEST_DEVICE=cpu`` runs
them on the CPU instead, which checks the tests themselves (half precision then runs on the CPU).

Tolerances, stated once: float32 on the device agrees with the CPU within 1e-4 on every score;
in fp16 the ITC scores (cosines) stay within 0.01 and the ITM logits within 0.05 of float32, in
bf16 (8 mantissa bits) within 0.04 and 0.2 (measured on the CPU: fp16 0.003 / 0.02, bf16 0.018 / 0.08).
Q-Pert's subspaces are always built in float32.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers.bench import WORDS, fixture_data
from helpers.contract import needs_cpp_compiler
from PIL import Image
from transformers import Blip2Config, Blip2ForImageTextRetrieval

import qpert
from qpert.eval.pipeline import EvalOptions, evaluate
from qpert.models.registry import LoadedModel
from qpert.models.tiny import randomize, tiny_blip2, tiny_processor
from qpert.scoring import score

DEVICE = os.environ.get("QPERT_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="no CUDA device (bench/gpu_check.sh runs these on a GPU machine)",
    ),
]

HALF_TOLERANCE = {"fp16": (0.01, 0.05), "bf16": (0.04, 0.2)}  # (ITC, ITM) max |difference| to float32
CONFIG = qpert.QPertConfig(alpha=8.0, weight="constant", threshold=0.99)
TEXTS = ["a small red square", "a big blue square in the corner", "the green box", "a photo of a yellow square"]


def images_and_boxes(size: int = 96):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size + 16 * i, 3), dtype=np.uint8)) for i in range(3)]
    boxes = [[[4.0, 6.0, 30.0, 40.0], [50.0, 10.0, 90.0, 60.0]], [[10.0, 10.0, 20.0, 24.0]], []]
    return images, boxes


def medium_blip2() -> Blip2ForImageTextRetrieval:
    """Wide enough (hidden 256, 8 heads of 32) that half-precision rounding behaves as at full size."""
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=8,
            image_size=112,
            patch_size=14,
        ),
        qformer_config=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=8,
            cross_attention_frequency=2,
            vocab_size=120,
            max_position_embeddings=64,
            use_qformer_text_input=True,
            encoder_hidden_size=256,
        ),
        num_query_tokens=16,
        image_text_hidden_size=128,
        use_qformer_text_input=True,
    )
    return randomize(Blip2ForImageTextRetrieval(config), 0, std=0.1).eval()


def scores_on(model, processor, device: str, dtype: torch.dtype, compiled: bool = False) -> dict:
    loaded = LoadedModel("m", model.to(device, dtype), processor, None)
    if compiled:
        qpert.compile_vision_encoder(loaded.model)
    images, boxes = images_and_boxes()
    results = score(loaded, images, boxes, TEXTS, CONFIG, itm=True)
    return {f"{name}/{kind}": getattr(s, kind).float().cpu() for name, s in results.items() for kind in ("itc", "itm")}


def test_float32_on_the_device_matches_the_cpu(tmp_path):
    processor = tiny_processor(WORDS, str(tmp_path), image_size=28)
    cpu = scores_on(tiny_blip2(seed=1), processor, "cpu", torch.float32)
    dev = scores_on(tiny_blip2(seed=1), processor, DEVICE, torch.float32)
    for key in cpu:
        torch.testing.assert_close(dev[key], cpu[key], atol=1e-4, rtol=1e-4, msg=key)
    assert not torch.allclose(cpu["qpert/itc"], cpu["baseline/itc"]), "Q-Pert must change the scores"
    for kind in ("itc", "itm"):  # the third image has no boxes: on the device too, its scores are the baseline's
        assert torch.equal(dev[f"qpert/{kind}"][2], dev[f"baseline/{kind}"][2]), kind


@pytest.mark.parametrize(
    "half,compiled",
    [("fp16", False), ("bf16", False), pytest.param("bf16", True, marks=needs_cpp_compiler)],
    ids=["fp16", "bf16", "bf16-compiled"],
)
def test_half_precision_agrees_with_float32(half, compiled, tmp_path):
    """Also with the vision encoder torch.compile'd (``--compile``): the same tolerances hold."""
    processor = tiny_processor(WORDS, str(tmp_path), image_size=112)
    full = scores_on(medium_blip2(), processor, DEVICE, torch.float32)
    low = scores_on(medium_blip2(), processor, DEVICE, {"fp16": torch.float16, "bf16": torch.bfloat16}[half], compiled)
    itc_tol, itm_tol = HALF_TOLERANCE[half]
    for key in full:
        assert torch.isfinite(low[key]).all(), key
        diff = (low[key] - full[key]).abs().max().item()
        assert diff <= (itc_tol if key.endswith("itc") else itm_tol), f"{key}: {half} differs by {diff:.4f}"
    effect_full = full["qpert/itc"] - full["baseline/itc"]
    effect_low = low["qpert/itc"] - low["baseline/itc"]
    assert effect_full.abs().max() > 2.5 * itc_tol, "the test needs a Q-Pert effect larger than the rounding"
    assert torch.corrcoef(torch.stack([effect_full.flatten(), effect_low.flatten()]))[0, 1] > 0.95


def test_subspaces_on_the_device_match_the_cpu(tmp_path):
    images, boxes = images_and_boxes()
    model = tiny_blip2(seed=2)
    processor = tiny_processor(WORDS, str(tmp_path), image_size=28)
    pixels = processor.image_processor(images, return_tensors="pt").pixel_values
    subspaces = {}
    for device in ("cpu", DEVICE):
        model.to(device)
        handle = qpert.attach(model, CONFIG)
        tokens = model.vision_model(pixel_values=pixels.to(device)).last_hidden_state
        subspaces[device] = handle.compute_subspaces(tokens, boxes, [(im.height, im.width) for im in images]).to("cpu")
        handle.detach()
    torch.testing.assert_close(subspaces[DEVICE].mean_projector, subspaces["cpu"].mean_projector, atol=1e-4, rtol=0)
    torch.testing.assert_close(subspaces[DEVICE].area_projector, subspaces["cpu"].area_projector, atol=1e-4, rtol=0)
    assert torch.equal(subspaces[DEVICE].active, subspaces["cpu"].active)


def test_evaluation_on_the_device_ranks_as_on_the_cpu(bench):
    root, model_dir = bench
    dataset, boxes = fixture_data(root)
    methods = {"baseline": None, "qpert": CONFIG}
    options = EvalOptions(itm=True, k=3, batch_size=4, itm_batch_size=16, shard_size=4, progress=False)
    cpu = evaluate(qpert.load_model(str(model_dir)), dataset, boxes, methods, options)
    dev = evaluate(qpert.load_model(str(model_dir), device=DEVICE), dataset, boxes, methods, options)
    for name in methods:
        for direction in ("t2i", "i2t"):
            assert np.array_equal(dev.metrics[name].ranks[direction], cpu.metrics[name].ranks[direction])
