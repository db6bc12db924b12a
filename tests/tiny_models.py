"""Tiny, randomly initialized instances of the real model classes (no download)."""
from __future__ import annotations

import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Non-degenerate weights: HF initializes query tokens and biases to zero, which would make
    any query perturbation a no-op and tests vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if "layernorm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model


def tiny_blip2_config(image_size: int = 28, patch_size: int = 7, **overrides) -> Blip2Config:
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                            cross_attention_frequency=2, vocab_size=120, max_position_embeddings=64,
                            use_qformer_text_input=True),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=64, vocab_size=120),
        num_query_tokens=4,
        image_text_hidden_size=16,
        use_qformer_text_input=True,
        **overrides,
    )
    return config


def tiny_blip2(seed: int = 0, **kw) -> Blip2ForImageTextRetrieval:
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(tiny_blip2_config(**kw))
    return randomize(model, seed).eval()
