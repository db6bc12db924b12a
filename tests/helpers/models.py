"""Tiny, randomly initialized models of the real classes the tests share (BLIP-2's are in qpert.models.tiny)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    BlipConfig,
    BlipForImageTextRetrieval,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2Processor,
    SiglipConfig,
    SiglipModel,
)

from qpert.models.tiny import randomize, tiny_processor


def tiny_blip(seed: int = 0) -> BlipForImageTextRetrieval:
    config = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=7,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=120,
            max_position_embeddings=64,
            encoder_hidden_size=32,
            bos_token_id=118,
            sep_token_id=3,
            pad_token_id=0,
            eos_token_id=3,
        ),  # [DEC] 118, [ENC] 119
        image_text_hidden_size=16,
    )
    torch.manual_seed(seed)
    return randomize(BlipForImageTextRetrieval(config), seed).eval()


def tiny_siglip_config() -> SiglipConfig:
    return SiglipConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=100,
            max_position_embeddings=16,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=30,
            patch_size=7,
        ),
    )


def tiny_siglip(seed: int = 0) -> SiglipModel:
    torch.manual_seed(seed)
    return randomize(SiglipModel(tiny_siglip_config()), seed).eval()


PATCH, MAX_PATCHES, TEXT_LENGTH = 4, 20, 16


def tiny_siglip2(seed: int = 0) -> Siglip2Model:
    config = Siglip2Config(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=100,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_patches=16,
            patch_size=PATCH,
        ),
    )
    torch.manual_seed(seed)
    return randomize(Siglip2Model(config), seed, std=0.5).eval()


def tiny_siglip2_processor(vocab_dir: str) -> Siglip2Processor:
    tokenizer = tiny_processor(["a", "small", "red", "square", "the", "green", "box"], vocab_dir).tokenizer
    return Siglip2Processor(
        image_processor=Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES), tokenizer=tokenizer
    )


# The pooler's queries are 24-d (embed_dim) and its keys come from 32-d ViT tokens, so the MHA
# keeps separate q/k/v projection weights, as coca_ViT-L-14 does (768 vs 1024).
MODEL_CFG = dict(
    embed_dim=24,
    vision_cfg=dict(
        image_size=28,
        layers=1,
        width=32,
        patch_size=7,
        head_width=8,
        attentional_pool=True,
        attn_pooler_heads=4,
        attn_pooler_queries=5,
        output_tokens=True,
    ),
    text_cfg=dict(context_length=8, vocab_size=64, width=24, heads=4, layers=1, embed_cls=True, output_tokens=True),
    multimodal_cfg=dict(context_length=8, vocab_size=64, width=24, heads=4, layers=1, attn_pooler_heads=4),
)


def tiny_coca_dir(path):
    """A tiny CoCa saved in OpenCLIP's folder layout; the full vocabulary so its own tokenizer fits."""
    open_clip = pytest.importorskip("open_clip")

    cfg = dict(
        MODEL_CFG,
        text_cfg=dict(MODEL_CFG["text_cfg"], vocab_size=49408),
        multimodal_cfg=dict(MODEL_CFG["multimodal_cfg"], vocab_size=49408),
    )
    torch.manual_seed(0)
    model = randomize(open_clip.CoCa(**cfg), 0, std=0.5)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(cfg, custom_text=True)}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")
    return path
