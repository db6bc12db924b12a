"""Tiny, randomly initialized BLIP-2 models of the real transformers classes (retrieval, captioning).

For the offline example, the test suite and the benchmarks: no download, seconds to build.
Their scores mean nothing; they show the mechanics and exercise the real code paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from transformers import (
    BertTokenizerFast,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
)

from .processing import pil_image_processor_class

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Non-degenerate weights: transformers initializes BLIP-2's query tokens and biases to zero,
    which would make any query perturbation a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if "layernorm" in name.lower() and name.endswith("weight") else noise)
    return model


#: Language models of the tiny captioners: decoder-only (OPT) and encoder-decoder (T5), as BLIP-2 ships.
LANGUAGE_MODELS = {
    "opt": dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64),
    "t5": dict(
        model_type="t5",
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        decoder_start_token_id=0,
    ),
}


def tiny_blip2_config(
    image_size: int = 28,
    patch_size: int = 7,
    vocab_size: int = 120,
    language_model: str = "opt",
    image_token_index: Optional[int] = None,
) -> Blip2Config:
    return Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            cross_attention_frequency=2,
            vocab_size=vocab_size,
            max_position_embeddings=64,
            use_qformer_text_input=True,
        ),
        text_config=dict(LANGUAGE_MODELS[language_model], vocab_size=vocab_size),
        num_query_tokens=4,
        image_text_hidden_size=16,
        use_qformer_text_input=True,
        image_token_index=image_token_index,
    )


def tiny_blip2(seed: int = 0, **config) -> Blip2ForImageTextRetrieval:
    torch.manual_seed(seed)
    return randomize(Blip2ForImageTextRetrieval(tiny_blip2_config(**config)), seed).eval()


def tiny_blip2_captioner(seed: int, language_model: str, image_token_index: int) -> Blip2ForConditionalGeneration:
    """``image_token_index``: the id of the processor's ``<image>`` token, which generation starts from."""
    torch.manual_seed(seed)
    config = tiny_blip2_config(language_model=language_model, image_token_index=image_token_index)
    return randomize(Blip2ForConditionalGeneration(config), seed).eval()


def tiny_processor(words: Iterable[str], vocab_dir: str, image_size: int = 28) -> Blip2Processor:
    """A word-level BERT tokenizer over ``words`` plus BLIP's image processor at ``image_size``."""
    vocab = SPECIAL_TOKENS + sorted({w.lower() for w in words} - set(SPECIAL_TOKENS))
    path = f"{vocab_dir}/vocab.txt"
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(path, do_lower_case=True)  # positional: vocab_file in 4.x, vocab in 5.x
    image_processor = pil_image_processor_class("BlipImageProcessor")(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer)
