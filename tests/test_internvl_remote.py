"""InternVL-G on its real remote code: a tiny random instance of the code the checkpoint ships.

The code is not part of the repository: ``helpers/internvl_remote.py`` finds it (``QPERT_INTERNVL_SOURCE``,
the Hugging Face cache, a local mirror) and these tests skip without it. What they check: loading
through ``qpert.load_model`` on this transformers gives the model the code's own classes build;
every QLLaMA cross-attention and ``clip_projector`` are hooked, named by their paths; Q-Pert matches
the plain reference; images without boxes are bit-identical in float32, bfloat16 and float16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.contract import BOXES, SIZES, assert_detach_restores, assert_inactive_is_bit_identical
from helpers.internvl_reference import Reference
from helpers.internvl_remote import IMAGE, LAYERS, PATCH, SKIP_REASON, build_tiny_remote, copy_remote_code
from helpers.internvl_standin import own_itc
from PIL import Image

import qpert
from qpert.models import internvl

CONFIGS = [
    dict(alpha=1.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=0.6, weight="inv_area", threshold=0.8, keep_norm=True, mode="orthogonal"),
]
TEXTS = ["a small red square", "the green box"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(folder of the tiny checkpoint, the model its classes build on the CPU)."""
    folder = tmp_path_factory.mktemp("internvl-remote")
    model = build_tiny_remote(folder)
    if model is None:
        pytest.skip(SKIP_REASON)
    return folder, model


@pytest.fixture(scope="module")
def loaded(built):
    return qpert.load_model(str(built[0]), trust_remote_code=True)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def encode(model, pixels):
    with torch.no_grad():
        return model.encode_image(pixels.to(model.query_tokens.dtype), mode="InternVL-G")


def test_loads_as_the_code_builds_it(built, loaded, pixels):
    """transformers 5 builds the model on the meta device (rotary tables left empty) and needs what
    ``post_init`` records: the loaded model must still compute what the code's own classes do."""
    model = loaded.model
    assert type(model).__name__ == "InternVLModel" and type(model).__module__ == type(built[1]).__module__
    assert not model.training
    assert all(t.device.type == "cpu" for t in [*model.state_dict().values(), *model.buffers()])
    expected = encode(built[1], pixels)
    assert torch.isfinite(expected).all() and torch.equal(encode(model, pixels), expected)
    ids, _ = internvl.tokenize(model, loaded.processor, TEXTS)
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids), built[1].encode_text(ids))


def test_sites_are_named_by_their_path(loaded):
    model, config = loaded.model, qpert.QPertConfig()
    qllama = [f"qllama.model.layers.{i}.cross_attn" for i in range(0, LAYERS, 2)]
    for exclude, names in [((), [*qllama, "clip_projector"]), (("qllama",), ["clip_projector"])]:
        with qpert.attach(model, config, exclude=exclude) as handle:
            assert handle.site_names == names  # clip_projector2 pools QLLaMA's outputs, not image tokens
    with qpert.attach(model, config, exclude=("clip_projector",)) as handle:
        assert handle.site_names == qllama


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c['mode']}")
def test_matches_plain_reference(loaded, pixels, cfg):
    model = loaded.model
    base = encode(model, pixels)
    reference = Reference(model, cfg, BOXES, SIZES, input_size=IMAGE, patch=PATCH)
    try:
        expected = encode(model, pixels)
    finally:
        reference.remove()
    with qpert.attach(model, qpert.QPertConfig(**cfg)) as handle, handle.objects(BOXES, SIZES):
        got = encode(model, pixels)
    assert (expected - base).abs().max() > 1e-3, "the reference must change the embedding, else the test is vacuous"
    assert (got - expected).abs().max() <= 1e-5


def test_inactive_is_bit_identical_and_detach_restores(loaded, pixels):
    forward = lambda: encode(loaded.model, pixels)
    assert_inactive_is_bit_identical(loaded.model, forward, alpha=1.0)
    assert_detach_restores(loaded.model, forward, BOXES, SIZES)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rows_without_boxes_are_bit_identical_in_half_precision(built, pixels, dtype):
    model = qpert.load_model(str(built[0]), dtype=dtype, trust_remote_code=True).model
    base = encode(model, pixels)
    with qpert.attach(model, qpert.QPertConfig(alpha=1.0)) as handle, handle.objects([BOXES[0], [], BOXES[2]], SIZES):
        mixed = encode(model, pixels)
    assert torch.equal(mixed[1], base[1]) and (mixed[0] - base[0]).abs().max() > 1e-3


def test_scores_through_qpert_score(loaded):
    """The whole path of ``qpert score``: the baseline is the model's own encoders, Q-Pert changes it."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
    model = loaded.model
    got = qpert.score(loaded, images, BOXES, TEXTS, qpert.QPertConfig(**CONFIGS[0]))
    ids, _ = internvl.tokenize(model, loaded.processor, TEXTS)
    baseline = own_itc(model, internvl.preprocess(model, loaded.processor, images), ids)
    assert (got["baseline"].itc - baseline).abs().max() <= 1e-5
    assert (got["qpert"].itc - baseline).abs().max() > 1e-4


def test_flash_attn_is_optional(tmp_path):
    """Its flash_attention.py imports flash_attn outside any try, which transformers' import check of a
    Hub checkpoint refuses; the code falls back to plain attention, so qpert leaves it out of the check."""
    from transformers.dynamic_module_utils import check_imports

    if copy_remote_code(tmp_path) is None:
        pytest.skip(SKIP_REASON)
    if not internvl.missing_packages(internvl.FLASH_ATTN):
        pytest.skip("flash_attn is installed: nothing to leave out")
    with pytest.raises(ImportError, match="flash_attn"):
        check_imports(tmp_path / "flash_attention.py")
    with internvl._flash_attn_optional():
        check_imports(tmp_path / "flash_attention.py")
