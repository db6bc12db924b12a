"""Images reach the models exactly as LAVIS / the original evaluations prepare them: PIL bicubic, then normalize.

transformers 5 makes the torchvision image processors the default; qpert loads the PIL ones. The
references here are plain PIL + numpy, on an odd-sized photo, for the processors as saved on the hub
(``BlipImageProcessor``, ``SiglipImageProcessor``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessor, BlipProcessor, Blip2Processor, SiglipImageProcessor, SiglipProcessor

import qpert
from qpert.models.registry import retrieval_heads
from qpert.models.tiny import tiny_blip2, tiny_processor
from helpers.models import tiny_blip
from helpers.models import tiny_siglip

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def photo():
    """500 x 333, the shape of many Flickr30K photos: the resize is neither an identity nor an integer factor."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (333, 500, 3), dtype=np.uint8))


def pil_reference(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """LAVIS ``blip_image_eval``: Resize((size, size), BICUBIC) on the PIL image, ToTensor, Normalize."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    normalized = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(normalized.transpose(2, 0, 1).copy())


def save(model, processor, folder) -> qpert.LoadedModel:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return qpert.load_model(str(folder))


def preprocess(loaded, image):
    return retrieval_heads(loaded.model).preprocess(loaded.model, loaded.processor, [image])[0]


def test_blip2_pixels_equal_pil_bicubic(photo, tmp_path):
    tokenizer = tiny_processor(["a"], str(tmp_path)).tokenizer
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 364, "width": 364}),
                               tokenizer=tokenizer)
    loaded = save(tiny_blip2(image_size=364, patch_size=14), processor, tmp_path)
    assert torch.equal(preprocess(loaded, photo), pil_reference(photo, 364, OPENAI_MEAN, OPENAI_STD))
    torchvision_pixels = processor.image_processor([photo], return_tensors="pt").pixel_values[0]
    assert not torch.equal(torchvision_pixels, pil_reference(photo, 364, OPENAI_MEAN, OPENAI_STD)), \
        "the torchvision backend must differ, else this test shows nothing"


def test_blip_pixels_equal_pil_bicubic(photo, tmp_path):
    tokenizer = tiny_processor(["a"], str(tmp_path)).tokenizer
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 28, "width": 28}), tokenizer=tokenizer)
    loaded = save(tiny_blip(), processor, tmp_path)
    assert torch.equal(preprocess(loaded, photo), pil_reference(photo, 28, OPENAI_MEAN, OPENAI_STD))


def test_siglip_pixels_equal_pil_bicubic(photo, tmp_path):
    tokenizer = tiny_processor(["a"], str(tmp_path)).tokenizer
    processor = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 30, "width": 30}),
                                tokenizer=tokenizer)
    loaded = save(tiny_siglip(), processor, tmp_path)
    assert torch.equal(preprocess(loaded, photo), pil_reference(photo, 30, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
