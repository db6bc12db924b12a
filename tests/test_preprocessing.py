"""Images reach the models exactly as the reference implementations prepared them.

LAVIS's ``blip_image_eval`` (BLIP-2, BLIP) resizes with PIL bicubic to S x S, then torchvision's
ToTensor (x / 255 in float32) and Normalize ((x - mean) / std in float32). Each test saves a processor
as the hub checkpoints hold it, loads it through ``qpert.load_model`` and the family's ``preprocess``
(what scoring, evaluation and search use), and compares the pixels with that recipe written out here
on an odd-sized 500 x 333 image. PIL's resize and these float32 steps are deterministic, so the
comparison is exact (``torch.equal``), no tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.models import tiny_blip, tiny_siglip, tiny_siglip2
from PIL import Image
from transformers import (
    AutoImageProcessor,
    Blip2Processor,
    BlipImageProcessor,
    BlipProcessor,
    Siglip2ImageProcessor,
    Siglip2Processor,
    SiglipImageProcessor,
    SiglipProcessor,
)

import qpert
from qpert.models.registry import MODELS, retrieval_heads
from qpert.models.tiny import tiny_blip2, tiny_processor
from qpert.synthetic import make_scenes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP and BLIP-2 (LAVIS's blip_image_eval)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """500 x 333 of noise: every resampling difference shows somewhere."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (333, 500, 3), dtype=np.uint8))


def reference(image: Image.Image, width: int, height: int, mean, std, resample=Image.BICUBIC) -> torch.Tensor:
    """(3, H, W): PIL resize, then x / 255 and (x - mean) / std in float32, channels first."""
    x = torch.from_numpy(np.asarray(image.resize((width, height), resample), dtype=np.float32)) / 255
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(2, 0, 1)


def loaded_pixels(folder, image: Image.Image):
    loaded = qpert.load_model(str(folder))
    return retrieval_heads(loaded.model).preprocess(loaded.model, loaded.processor, [image])


def test_blip2_pixels_equal_lavis(tmp_path, image):
    tiny_blip2(seed=0).save_pretrained(tmp_path)
    tokenizer = tiny_processor(["a", "cat"], str(tmp_path)).tokenizer
    # as the hub holds it: the plain class name, 364 px as blip2-itm-vit-g-coco
    Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 364, "width": 364}), tokenizer=tokenizer
    ).save_pretrained(tmp_path)
    assert torch.equal(loaded_pixels(tmp_path, image)[0], reference(image, 364, 364, CLIP_MEAN, CLIP_STD))


def test_blip_pixels_equal_lavis_and_the_default_processor_does_not(tmp_path, image):
    tiny_blip(seed=0).save_pretrained(tmp_path)
    tokenizer = tiny_processor(["a", "cat"], str(tmp_path)).tokenizer
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer
    ).save_pretrained(tmp_path)
    expected = reference(image, 384, 384, CLIP_MEAN, CLIP_STD)
    assert torch.equal(loaded_pixels(tmp_path, image)[0], expected)
    # Why the loader asks for the PIL processor: transformers' default (torchvision) resize differs.
    default = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt").pixel_values[0]
    assert not torch.equal(default, expected)


def test_siglip_pixels_equal_pil_bicubic(tmp_path, image):
    tiny_siglip(seed=0).save_pretrained(tmp_path)
    tokenizer = tiny_processor(["a", "cat"], str(tmp_path)).tokenizer
    SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer
    ).save_pretrained(tmp_path)
    assert torch.equal(loaded_pixels(tmp_path, image)[0], reference(image, 384, 384, HALF, HALF))


def test_siglip2_naflex_patches_equal_pil_bilinear(tmp_path, image):
    """NaFlex: each image resized (PIL bilinear, the processor's default) to its own grid of 16-px patches,
    normalized, cut into patches row by row, each flattened (row, column, channel), then padding."""
    patch, max_patches = 16, 256
    tiny_siglip2(seed=0).save_pretrained(tmp_path)
    tokenizer = tiny_processor(["a", "cat"], str(tmp_path)).tokenizer
    Siglip2Processor(
        image_processor=Siglip2ImageProcessor(patch_size=patch, max_num_patches=max_patches), tokenizer=tokenizer
    ).save_pretrained(tmp_path)
    out = loaded_pixels(tmp_path, image)
    rows, cols = out["spatial_shapes"][0].tolist()
    assert rows * cols <= max_patches and cols > rows  # the aspect ratio is kept
    x = reference(image, cols * patch, rows * patch, HALF, HALF, Image.BILINEAR).permute(1, 2, 0)
    patches = x.reshape(rows, patch, cols, patch, 3).permute(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    assert torch.equal(out["pixel_values"][0, : rows * cols], patches)
    assert not out["pixel_values"][0, rows * cols :].any()
    assert out["pixel_attention_mask"][0].tolist() == [1] * (rows * cols) + [0] * (max_patches - rows * cols)


def test_the_shipped_toy_sees_the_same_pixels_up_to_float_rounding():
    """blip2-shapes was trained through the torchvision processor; its 64 px scenes need no resize, so the
    PIL processor differs from it only in the rounding of rescale + normalize (below 1e-6)."""
    scene = Image.fromarray(make_scenes(2000, 1)[0].image)
    pixels = loaded_pixels("blip2-shapes", scene)[0]
    assert torch.equal(pixels, reference(scene, 64, 64, CLIP_MEAN, CLIP_STD))
    trained_with = AutoImageProcessor.from_pretrained(MODELS["blip2-shapes"].source, backend="torchvision")
    assert (trained_with(scene, return_tensors="pt").pixel_values[0] - pixels).abs().max() < 1e-6
