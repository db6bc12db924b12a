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

Loading (``load_remote_model``) runs the checkpoint's own code, which was written for transformers 4:
on transformers 5 it needs the ``post_init()`` its ``__init__`` leaves out and its rotary tables
refilled after loading, and its unguarded ``flash_attn`` import must not stop a machine without it.
Tested on a stand-in with the same module names and signatures (``tests/test_internvl.py``) and on a
tiny random instance of the real remote code (``clip_benchmark/models/internvl_huggingface`` of
OpenGVLab/InternVL, what the checkpoint ships; ``tests/test_internvl_remote.py``). Not run on the
real 14B checkpoint (no network here).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchvision import transforms as T

from ..adapters import AttentionPoolingSite, CrossAttentionSite, find_llama_cross_attentions
from ..core import TokenLayout
from ..errors import MissingDependencyError, UnsupportedModelError
from .family import POOLER_ALPHAS, ModelFamily, RetrievalHeads, cosine_scores

#: clip_benchmark's InternVL text setup.
TEXT_PREFIX, MAX_TEXT_TOKENS, PAD_TOKEN_ID = "summarize:", 80, 0
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: What the checkpoint's code imports, and what converts its sentencepiece tokenizer (module: package to
#: install): the ``qpert[internvl]`` extra. flash_attn is optional (``_flash_attn_optional``).
MODEL_PACKAGES = {"peft": "peft", "einops": "einops", "timm": "timm"}
TOKENIZER_PACKAGES = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}
FLASH_ATTN = {"flash_attn": "flash-attn"}


def internvl_sites(model: nn.Module) -> list[CrossAttentionSite]:
    """QLLaMA's cross-attentions, then ``clip_projector``'s attention pooling over the ViT tokens: the
    paper's supplement (A.2.1) perturbs both. ``clip_projector2`` pools QLLaMA's outputs, not image
    tokens, and is left alone. Names are paths in the model (``qllama.model.layers.0.cross_attn``), so
    ``exclude=("clip_projector",)`` perturbs QLLaMA alone and ``exclude=("qllama",)`` the pooling alone."""
    return [*find_llama_cross_attentions(model), AttentionPoolingSite("clip_projector", model.clip_projector)]


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


def missing_packages(modules: dict[str, str]) -> list[str]:
    """The packages (values) of ``modules`` (keys) that cannot be imported."""
    missing = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package (google for google.protobuf)
            found = False
        if not found:
            missing.append(package)
    return missing


def _missing_extra(what: str, missing: list[str]) -> MissingDependencyError:
    return MissingDependencyError(f"{what} needs {', '.join(missing)}: pip install 'qpert[internvl]'")


def load_processor(source: str) -> InternVLProcessor:
    """The tokenizer as InternVL's model card sets it up: an EOS after every text, id 0 for padding.

    The checkpoint ships a sentencepiece model, which transformers converts with sentencepiece and
    protobuf; without them its error names another package (tiktoken), so a failure says which are missing.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, add_eos_token=True)
    except Exception as error:
        missing = missing_packages(TOKENIZER_PACKAGES)
        if missing:
            raise _missing_extra("InternVL-G's sentencepiece tokenizer", missing) from error
        raise
    tokenizer.pad_token_id = PAD_TOKEN_ID
    return InternVLProcessor(tokenizer)


@contextmanager
def _flash_attn_optional() -> Iterator[None]:
    """Leave flash_attn out of transformers' check of remote code's imports when it is not installed.

    The checkpoint's ``flash_attention.py`` imports flash_attn outside any ``try``, so transformers
    refuses to load the model from the Hub without it; yet ``modeling_intern_vit.py`` imports that file
    inside a ``try`` and falls back to plain attention, which is all a CPU (or a GPU without it) can run.
    """
    from transformers import dynamic_module_utils

    if not missing_packages(FLASH_ATTN):
        yield
        return
    get_imports = dynamic_module_utils.get_imports
    dynamic_module_utils.get_imports = lambda filename: [m for m in get_imports(filename) if m != "flash_attn"]
    try:
        yield
    finally:
        dynamic_module_utils.get_imports = get_imports


def _with_post_init(remote: type) -> type:
    """``remote`` with the ``post_init()`` call its ``__init__`` leaves out (commented out upstream).

    transformers 5 reads what ``post_init`` records (``all_tied_weights_keys`` and the like) while it
    loads. Same class name and module, so the model is matched and saved as the checkpoint's class.
    """

    def __init__(self, config, *args, **kwargs):
        remote.__init__(self, config, *args, **kwargs)
        self.post_init()

    namespace = {"__init__": __init__, "__module__": remote.__module__, "__qualname__": remote.__qualname__}
    return type(remote.__name__, (remote,), namespace)


def _fill_rotary_caches(model: nn.Module) -> None:
    """Recompute QLLaMA's rotary tables as its ``FixedLlamaRotaryEmbedding.__init__`` does.

    transformers 5 builds the model on the meta device and fills what the checkpoint holds; these
    tables (a plain ``inv_freq`` attribute and non-persistent cos / sin buffers) are not in it and would
    stay meta or uninitialized (NaN outputs). On transformers 4 this rewrites the same values.
    """
    for module in model.modules():
        if callable(getattr(module, "_set_cos_sin_cache", None)) and hasattr(module, "inv_freq"):
            device = module.cos_cached.device
            exponents = torch.arange(0, module.dim, 2, device=device).float() / module.dim
            module.inv_freq = 1.0 / (module.base**exponents)
            module._set_cos_sin_cache(seq_len=module.max_position_embeddings, device=device, dtype=torch.float32)


def load_remote_model(source: str, dtype: Optional[torch.dtype]) -> nn.Module:
    """InternVL-G from its checkpoint's own code (the caller has the user's ``trust_remote_code``), on any
    transformers qpert allows: the packages that code imports checked first, flash_attn optional (and
    not asked for when absent, which would print a warning per ViT layer), ``post_init`` made, rotary
    tables refilled."""
    missing = missing_packages(MODEL_PACKAGES)
    if missing:
        raise _missing_extra("InternVL-G's own modeling code", missing)
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with _flash_attn_optional():
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=True)
        reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
        if reference is None:
            raise UnsupportedModelError(f"{source}: its config maps no AutoModel class to its own code (auto_map)")
        if missing_packages(FLASH_ATTN):
            config.vision_config.use_flash_attn = False
        remote = get_class_from_dynamic_module(reference, source)
        if int(transformers.__version__.split(".")[0]) >= 5:  # 4 loads it as is (and its post_init would
            remote = _with_post_init(remote)  # refuse the code's _keep_in_fp32_modules, which name no module)
        model = remote.from_pretrained(source, config=config, dtype=dtype)
    _fill_rotary_caches(model)
    return model


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
    load_remote=load_remote_model,
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
