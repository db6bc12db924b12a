"""InternVL-G (``OpenGVLab/InternVL-14B-224px``, remote code): Q-Pert on every QLLaMA cross-attention
and on ``clip_projector``'s attention pooling.

The checkpoint's ``InternVLModel`` holds an InternViT-6B (``vision_model``: CLS + 16 x 16 patches
of 14 px at 224 px) and QLLaMA (``qllama``), whose 96 learned queries cross-attend to all of the
ViT's output tokens in every other decoder layer (see ``qpert.adapters.qllama``); ``clip_projector``
pools the ViT tokens with one query, their mean (``qpert.adapters.pooling``). The paper's
supplement (A.2.1) perturbs both, so qpert does by default.

Retrieval follows the model's own ``encode_image(image, mode="InternVL-G")`` and ``encode_text``
and InternVL's ``clip_benchmark`` retrieval setup: images through ``build_transform('retrieval')``
(a bicubic stretch to image_size x image_size, no crop, ImageNet mean/std; boxes are placed for
it), texts as ``"summarize:" + caption`` from the LLaMA tokenizer with an EOS appended, padded
with id 0 to 80 tokens. The image side is split after the ViT: ``image_embeddings`` runs what
``get_image_features`` runs after it (the queries through ``qllama.model.forward_train``), then
``clip_projector`` on the ViT tokens and ``clip_projector2`` on the queries, each normalized and
summed, as ``encode_image`` does. ITC only: the ITM head is not part of InternVL's retrieval
evaluation. The object-embedding baseline pools over an object's tokens alone (``roi_embeddings``),
which assumes, as the public code reads, that the cross-attention gives image tokens no position.

Checked against the public source of ``modeling_internvl.py`` / ``modeling_qllama.py`` and
``clip_benchmark/models/internvl_huggingface`` (OpenGVLab/InternVL on GitHub), and tested on a
stand-in with the same module names and signatures (``tests/test_internvl.py``). Not run on the
real checkpoint (no network here): in particular, that today's transformers loads its remote code
and converts its sentencepiece tokenizer unchanged is unverified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision import transforms as T

from ..adapters import AttentionPoolingSite, CrossAttentionSite, find_llama_cross_attentions
from ..core import TokenLayout
from ..errors import UnsupportedModelError
from .family import POOLER_ALPHAS, ModelFamily, RetrievalHeads, cosine_scores

#: clip_benchmark's InternVL text setup.
TEXT_PREFIX, MAX_TEXT_TOKENS, PAD_TOKEN_ID = "summarize:", 80, 0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def internvl_sites(model: nn.Module) -> list[CrossAttentionSite]:
    """QLLaMA's cross-attentions, then ``clip_projector``'s attention pooling over the ViT tokens: the
    paper's supplement (A.2.1) perturbs both. ``clip_projector2`` pools QLLaMA's outputs, not image
    tokens, and is left alone. ``qpert.attach(model, config, exclude=("clip_projector",))`` perturbs
    QLLaMA alone."""
    return [*find_llama_cross_attentions(model.qllama), AttentionPoolingSite("clip_projector", model.clip_projector)]


def _input_size(model: nn.Module) -> int:
    """``force_image_size`` when set, else the ViT's own size (as clip_benchmark's loader picks it)."""
    return getattr(model.config, "force_image_size", None) or model.config.vision_config.image_size


def internvl_token_layout(model: nn.Module) -> TokenLayout:
    """CLS + a square patch grid at the input size, stretched."""
    patch = model.config.vision_config.patch_size
    grid = _input_size(model) // patch
    return TokenLayout(grid=(grid, grid), patch=(patch, patch), num_prefix_tokens=1, resize="stretch")


@dataclass
class InternVLProcessor:
    """The checkpoint ships a LLaMA tokenizer and a CLIPImageProcessor (shortest edge + centre crop);
    retrieval uses only the tokenizer, and the stretch transform of ``preprocess``."""

    tokenizer: Any


def load_processor(source: str) -> InternVLProcessor:
    """The tokenizer as InternVL's model card sets it up: an EOS after every text, id 0 for padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, add_eos_token=True)
    tokenizer.pad_token_id = PAD_TOKEN_ID
    return InternVLProcessor(tokenizer)


def preprocess(model: nn.Module, processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """clip_benchmark's ``build_transform('retrieval')``: bicubic stretch, no crop, ImageNet normalization."""
    size = _input_size(model)
    transform = T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return torch.stack([transform(im.convert("RGB")) for im in images])


def tokenize(model: nn.Module, processor: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefixed, padded on the right (``encode_text`` reads the last non-pad position) to 80 tokens."""
    ids = processor.tokenizer(
        [TEXT_PREFIX + t for t in texts],
        max_length=MAX_TEXT_TOKENS,
        truncation=True,
        padding="max_length",
        padding_side="right",
        return_tensors="pt",
    ).input_ids
    return ids, (ids != PAD_TOKEN_ID).long()


@torch.no_grad()
def image_tokens(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, N, C) InternViT tokens (CLS + patches): what QLLaMA's cross-attention and ``clip_projector`` read."""
    param = model.query_tokens
    return model.vision_model(
        pixel_values=pixel_values.to(param.device, param.dtype), output_hidden_states=False, return_dict=True
    ).last_hidden_state


def _query_features(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """QLLaMA's output for the learned queries over ``tokens``, as ``get_image_features`` computes it."""
    decoder = model.qllama.model
    if type(decoder).__name__ == "LlamaForCausalLM":  # QLLaMA still wrapped for LoRA
        decoder = decoder.model
    queries = model.query_tokens.repeat(len(tokens), 1, 1)
    n = queries.shape[1]
    no_mask = queries.new_zeros(len(tokens), 1, n, n)  # the expanded all-ones mask get_image_features passes
    return decoder.forward_train(
        inputs_embeds=queries,
        vision_hidden_states=tokens,
        attention_mask=no_mask,
        output_attentions=False,
        output_hidden_states=False,
        return_dict=True,
    ).last_hidden_state


@torch.no_grad()
def image_embeddings(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, D) normalized ``encode_image(mode="InternVL-G")`` from cached ViT tokens (Q-Pert acts in QLLaMA)."""
    backbone = F.normalize(model.clip_projector(tokens), dim=-1)
    queries = F.normalize(model.clip_projector2(_query_features(model, tokens)), dim=-1)
    return F.normalize(backbone + queries, dim=-1)


@torch.no_grad()
def roi_embeddings(model: nn.Module, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``image_embeddings`` of each image over its kept tokens alone (the object-embedding baseline).

    Both poolings (QLLaMA's cross-attention, ``clip_projector``'s attention pooling) read the ViT
    tokens as an unordered set of keys, so removing a token is the same as masking it out; objects
    cover different numbers of tokens, so each goes through on its own.
    """
    return torch.cat([image_embeddings(model, t[k][None]) for t, k in zip(tokens, keep.to(tokens.device))])


@torch.no_grad()
def text_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(T, D) normalized ``encode_text``, which masks the pad id 0 itself."""
    return F.normalize(model.encode_text(input_ids.to(model.query_tokens.device)), dim=-1)


@dataclass(frozen=True)
class _QLLaMAFamily(ModelFamily):
    """Matched by class name *and* a ``qllama`` module: transformers' own ``InternVLModel``
    (the InternVL 2/3 chat models) shares the class name but has no cross-attention."""

    def supports(self, model: nn.Module) -> bool:
        if not super().supports(model):
            return False
        if not isinstance(getattr(model, "qllama", None), nn.Module):
            raise UnsupportedModelError(
                f"this {type(model).__name__} has no QLLaMA (qllama) with cross-attention: "
                "Q-Pert supports InternVL-G (OpenGVLab/InternVL-14B-224px), not the "
                "InternVL chat models"
            )
        return True


INTERNVL = _QLLaMAFamily(
    name="internvl",
    classes=("InternVLModel", "InternVL_G"),
    sites=internvl_sites,  # remote code: by class name
    token_layout=internvl_token_layout,
    alpha_grid=POOLER_ALPHAS,
    retrieval=RetrievalHeads(
        image_tokens=image_tokens,
        image_embeddings=image_embeddings,
        text_embeddings=text_embeddings,
        itc_scores=cosine_scores,
        tokenize=tokenize,
        preprocess=preprocess,
        roi_embeddings=roi_embeddings,
        vision_encoder=lambda model: model.vision_model,
        load_processor=load_processor,
    ),
)
