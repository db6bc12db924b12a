"""Shared material of the photo-search tests: a tiny BLIP-2, a tiny DETR, and a folder of photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

from qpert.models.tiny import tiny_blip2, tiny_processor

WORDS = [
    "a",
    "red",
    "green",
    "blue",
    "square",
    "circle",
    "dog",
    "cat",
    "on",
    "the",
    "left",
    "right",
    "of",
    "small",
    "large",
    "photo",
]


def save_tiny_blip2(path: Path) -> Path:
    tiny_blip2(seed=3).save_pretrained(path)
    tiny_processor(WORDS, str(path)).save_pretrained(path)
    return path


def save_siglip_folder(model, path: Path, image_size: int = 30) -> Path:
    """A SigLIP model (tiny, or a real architecture with random weights) saved with a processor whose word-level
    tokenizer knows :data:`WORDS` and whose images are ``image_size`` pixels square."""
    from transformers import SiglipImageProcessor, SiglipProcessor

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tiny_processor(WORDS, str(path)).tokenizer,
    ).save_pretrained(path)
    return path


def save_tiny_detr(path: Path, seed: int = 0) -> Path:
    """A randomly initialized transformers DETR (ResNet backbone, no timm): real post-processing."""
    import torch

    torch.manual_seed(seed)
    config = DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], out_features=["stage4"]
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=8,
        num_labels=3,
        id2label={0: "dog", 1: "cat", 2: "ball"},
        label2id={"dog": 0, "cat": 1, "ball": 2},
    )
    DetrForObjectDetection(config).save_pretrained(path)
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(path)
    return path


def write_photo(path: Path, seed: int, size: tuple[int, int] = (48, 64), fmt: str | None = None) -> Path:
    """A noisy photo with one coloured square; ``size`` is (height, width)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(80, 160, size=(*size, 3), dtype=np.uint8)
    y, x = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
    pixels[y : y + 12, x : x + 12] = rng.integers(0, 255, size=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def photo_folder(root: Path, count: int = 6) -> Path:
    """JPEG, PNG and WebP photos in nested folders."""
    suffixes = [".jpg", ".png", ".webp"]
    for i in range(count):
        write_photo(root / f"album{i % 2}" / f"photo{i}{suffixes[i % 3]}", seed=i)
    return root


def save_tiny_owlv2(path: Path) -> Path:
    """A randomly initialized OWLv2 with a tiny CLIP BPE tokenizer: open-vocabulary detection offline."""
    import json

    import torch
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}  # OWL treats queries starting with id 0 as padding
    merges = []
    for c in sorted(set("".join(WORDS))):
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), pad_token="!")  # as OWLv2 pads
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(
            small, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0
        ),
        vision_config=dict(small, image_size=32, patch_size=8),
        projection_dim=32,
    )
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # random box heads saturate; small ones keep OWLv2's prior: one box per patch
        for p in model.box_head.parameters():
            p.mul_(0.01)
    model.save_pretrained(path)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(path)
    return path
