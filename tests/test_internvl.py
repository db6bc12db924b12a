"""Q-Pert on InternVL-G's QLLaMA cross-attention.

InternVL-G is remote code (``trust_remote_code``) that cannot be imported here, so this file holds
a tiny stand-in with the module structure, attribute names and forward signatures of
``modeling_qllama.py`` (OpenGVLab/InternVL, ``LlamaCrossAttention`` / ``LlamaDecoderLayer`` /
``LlamaModel.forward_train``) and of ``InternVLModel`` (``get_image_features``, ``get_text_features``,
``encode_image``, ``encode_text``) as far as Q-Pert reads them. The cross-attention forward and the
encode methods and the attention pooling (``AttentionPoolingBlock``, ``CrossAttention``) are the real
ones' logic; self-attention and MLP are simplified (a causal mean, a linear), which the retrieval
interface never looks into.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import LlamaTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling

import qpert
from contract import BOXES, SIZES, assert_detach_restores, assert_inactive_is_bit_identical, assert_matches_reference
from qpert.errors import UnsupportedModelError
from qpert.models import internvl
from qpert.models.registry import MODELS, LoadedModel, family_of, retrieval_heads
from qpert.models.tiny import randomize
from qpert.scoring import score
from reference_hooks import _perturb_batch, stretch_objects

HIDDEN, VISION, HEADS, LAYERS, QUERIES, IMAGE, PATCH, EMBED = 32, 24, 4, 4, 6, 28, 7, 16
POOL_HEADS = 2  # attention-pooling heads of 12 dims, beside QLLaMA's 4 x 8: sites of two shapes
#: A character-level LLaMA tokenizer: unk (also the pad id 0), bos, eos, then one token per character.
CHARACTERS = "▁abcdefghijklmnopqrstuvwxyz:"
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(CHARACTERS)}}
CONFIGS = [
    dict(alpha=1.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=0.6, weight="inv_area", threshold=0.8, keep_norm=True, mode="enhance"),
    dict(alpha=0.8, weight="centered", rank=2, keep_norm=False, mode="enhance"),
    dict(alpha=1.0, weight="constant", threshold=0.95, keep_norm=False, mode="orthogonal"),
]


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


class LlamaCrossAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, vision_hidden_size: int):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim = hidden_size // num_heads
        self.vision_hidden_size = vision_hidden_size  # 3200 in InternVL-G
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.norm1 = LlamaRMSNorm(hidden_size)
        self.k_proj = nn.Linear(vision_hidden_size, num_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(vision_hidden_size, num_heads * self.head_dim, bias=False)
        self.norm2 = LlamaRMSNorm(vision_hidden_size)

    def forward(self, hidden_states, vision_hidden_states, repeat_time=1, attention_mask=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        hidden_states = self.norm1(hidden_states)
        bsz, q_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        vision_hidden_states = self.norm2(vision_hidden_states)
        bs_v, kv_len, _ = vision_hidden_states.size()
        key_states = self.k_proj(vision_hidden_states).view(bs_v, kv_len, self.num_heads, self.head_dim).transpose(1, 2)
        value_states = self.v_proj(vision_hidden_states).view(bs_v, kv_len, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = key_states.repeat(repeat_time, 1, 1, 1)
        value_states = value_states.repeat(repeat_time, 1, 1, 1)
        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
        attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).reshape(bsz, q_len, self.hidden_size)
        return self.o_proj(attn_output), None, None


class LlamaDecoderLayer(nn.Module):
    """Self-attention replaced by a linear of the causal mean (right padding is then masked by itself);
    the cross-attention call is the real one."""

    def __init__(self, use_cross_attn: bool):
        super().__init__()
        self.self_attn = nn.Linear(HIDDEN, HIDDEN)
        self.cross_attn = LlamaCrossAttention(HIDDEN, HEADS, VISION) if use_cross_attn else None
        self.num_query_token = QUERIES

    def forward(self, hidden_states, vision_hidden_states, attention_mask=None, position_ids=None,
                past_key_value=None, output_attentions=False, use_cache=False, repeat_time=1):
        steps = torch.arange(1, hidden_states.shape[1] + 1, dtype=hidden_states.dtype)[:, None]
        hidden_states = hidden_states + self.self_attn(hidden_states.cumsum(1) / steps)
        if self.cross_attn is not None and hidden_states.size(1) >= self.num_query_token \
                and vision_hidden_states is not None:
            query_feats = hidden_states[:, :self.num_query_token, :]
            text_feats = hidden_states[:, self.num_query_token:, :]
            residual = query_feats
            query_feats, _, _ = self.cross_attn(hidden_states=query_feats, vision_hidden_states=vision_hidden_states,
                                                attention_mask=None, past_key_value=past_key_value,
                                                output_attentions=output_attentions, use_cache=use_cache,
                                                repeat_time=repeat_time)
            hidden_states = torch.cat([residual + query_feats, text_feats], dim=1)
        return (hidden_states,)


class LlamaModel(nn.Module):
    """QLLaMA's decoder: ``forward_train`` is the pass ``get_image_features``/``get_text_features`` run."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(len(VOCAB), HIDDEN)
        self.layers = nn.ModuleList([LlamaDecoderLayer(i % 2 == 0) for i in range(LAYERS)])
        self.norm = LlamaRMSNorm(HIDDEN)

    def forward_train(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                      inputs_embeds=None, vision_hidden_states=None, repeat_time=1, use_cache=None,
                      output_attentions=None, output_hidden_states=None, return_dict=None):
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, vision_hidden_states, attention_mask=attention_mask,
                                  position_ids=position_ids, repeat_time=repeat_time)[0]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))


class InternVisionModel(nn.Module):
    """CLS + patch tokens, as InternViT's ``last_hidden_state``."""

    def __init__(self):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, VISION))
        self.patch_embedding = nn.Conv2d(3, VISION, kernel_size=PATCH, stride=PATCH)

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None, pixel_embeds=None):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(len(patches), 1, -1), patches], dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens[:, 0])


class CrossAttention(nn.Module):
    """InternVL's attention-pooling attention: q/k/v weights used through F.linear with separate biases."""

    def __init__(self, dim, num_heads, out_dim):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(dim)) for _ in range(3))
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, out_dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, k=None, v=None):
        B, N, C = x.shape
        N_k, N_v = k.shape[1], v.shape[1]
        q = nn.functional.linear(input=x, weight=self.q.weight, bias=self.q_bias)
        q = q.reshape(B, N, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        k = nn.functional.linear(input=k, weight=self.k.weight, bias=self.k_bias)
        k = k.reshape(B, N_k, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        v = nn.functional.linear(input=v, weight=self.v.weight, bias=self.v_bias)
        v = v.reshape(B, N_v, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        q = q * self.scale
        attn = (q @ k.transpose(-2, -1))
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


class AttentionPoolingBlock(nn.Module):
    """InternVL's ``AttentionPoolingBlock`` (an ``AttentiveBlock``): the mean token queries all tokens."""

    def __init__(self, dim, out_dim, num_heads=POOL_HEADS):
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.cross_attn = CrossAttention(dim, num_heads, out_dim)

    def forward(self, x):
        x_q = self.norm1_q(x.mean(1, keepdim=True) + 0)
        x_k, x_v = self.norm1_k(x + 0), self.norm1_v(x)
        return self.cross_attn(x_q, k=x_k, v=x_v).squeeze(1)


class InternVLModel(nn.Module):
    """What Q-Pert and its retriever read of InternVL's ``InternVLModel``."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=IMAGE, patch_size=PATCH),
                                      force_image_size=None)
        self.vision_model = InternVisionModel()
        self.qllama = nn.Module()  # LlamaForCausalLM
        self.qllama.model = LlamaModel()
        self.query_tokens = nn.Parameter(torch.zeros(1, QUERIES, HIDDEN))
        self.text_projection = nn.Parameter(torch.empty(HIDDEN, EMBED))
        self.clip_projector = AttentionPoolingBlock(VISION, EMBED)
        self.clip_projector2 = AttentionPoolingBlock(HIDDEN, EMBED)

    def forward(self, pixel_values, repeat_time=1):
        """The query features of ``get_image_features`` (with the queries tiled ``repeat_time`` times)."""
        image_embeds = self.vision_model(pixel_values=pixel_values)[0]
        hidden = self.query_tokens.repeat(repeat_time * len(pixel_values), 1, 1)
        return self.qllama.model.forward_train(inputs_embeds=hidden, vision_hidden_states=image_embeds,
                                               repeat_time=repeat_time).last_hidden_state

    def get_image_features(self, pixel_values, output_attentions=None, output_hidden_states=None, return_dict=None):
        backbone_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True)[0]
        input_embeds = self.query_tokens.repeat(backbone_embeds.shape[0], 1, 1)
        attention_mask = torch.zeros(len(input_embeds), 1, QUERIES, QUERIES)  # _expand_mask of all ones
        outputs = self.qllama.model.forward_train(inputs_embeds=input_embeds, vision_hidden_states=backbone_embeds,
                                                  attention_mask=attention_mask, return_dict=True).last_hidden_state
        return backbone_embeds, outputs

    def get_text_features(self, input_ids, attention_mask, output_attentions=None, output_hidden_states=None,
                          return_dict=None):
        input_embeds = self.qllama.model.embed_tokens(input_ids)
        return self.qllama.model.forward_train(inputs_embeds=input_embeds, vision_hidden_states=None,
                                               attention_mask=attention_mask, return_dict=True).last_hidden_state

    def encode_image(self, image, mode):
        assert mode == "InternVL-G"
        backbone_embeds, image_embeds = self.get_image_features(pixel_values=image, return_dict=True)
        backbone_embeds = self.clip_projector(backbone_embeds)
        image_embeds = self.clip_projector2(image_embeds)
        backbone_embeds = backbone_embeds / backbone_embeds.norm(dim=1, keepdim=True)
        image_embeds = image_embeds / image_embeds.norm(dim=1, keepdim=True)
        return image_embeds + backbone_embeds

    def encode_text(self, text):
        attention_mask = text > 0
        text_embeds = self.get_text_features(input_ids=text, attention_mask=attention_mask, return_dict=True)
        text_embeds = text_embeds[torch.arange(text_embeds.shape[0]), attention_mask.sum(1) - 1]
        return text_embeds @ self.text_projection


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


def tiny_internvl() -> InternVLModel:
    torch.manual_seed(0)
    model = randomize(InternVLModel(), 3).eval()
    with torch.no_grad():
        model.qllama.model.norm.weight.fill_(1.0)  # a final RMSNorm of random ~0 weights would hide every change
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def run(model, pixels, repeat_time=1):
    with torch.no_grad():
        return model(pixels, repeat_time)


class Reference:
    """The plain reference (tests/reference.py) on each cross_attn: keys k_proj(norm2(tokens)), row i of
    the queries against image i % B, as the module's ``repeat(repeat_time, 1, 1, 1)`` pairs them."""

    def __init__(self, model, cfg):
        objects = stretch_objects(BOXES, SIZES, input_size=IMAGE, grid=IMAGE // PATCH, patch=PATCH, prefix=1)
        self.handles = []
        for layer in model.qllama.model.layers:
            if layer.cross_attn is not None:
                self._hook(layer.cross_attn, objects, cfg)
        self._hook_pooling(model.clip_projector.cross_attn, objects, cfg)

    def _hook_pooling(self, attn, objects, cfg):
        """clip_projector: the whole attention recomputed with the reference's perturbed mean-token query."""

        def post(_m, args, kwargs, out):
            x, k, v = args[0], kwargs["k"], kwargs["v"]
            heads = attn.num_heads
            q = nn.functional.linear(x, attn.q.weight, attn.q_bias).unflatten(-1, (heads, -1))
            keys = nn.functional.linear(k, attn.k.weight, attn.k_bias).unflatten(-1, (heads, -1))
            values = nn.functional.linear(v, attn.v.weight, attn.v_bias).unflatten(-1, (heads, -1))
            q = _perturb_batch(q, keys, objects, cfg).to(keys.dtype)
            weights = torch.einsum("bthd,bnhd->bhtn", q * attn.scale, keys).softmax(-1)
            return attn.proj(torch.einsum("bhtn,bnhd->bthd", weights, values).flatten(-2))

        self.handles.append(attn.register_forward_hook(post, with_kwargs=True))

    def _hook(self, attn, objects, cfg):
        seen = {}

        def pre(_m, _args, kwargs):
            seen.update(tokens=kwargs["vision_hidden_states"], repeat=kwargs["repeat_time"])

        def post(_m, _inputs, out):
            tokens, repeat = seen["tokens"], seen["repeat"]
            keys = attn.k_proj(attn.norm2(tokens)).view(*tokens.shape[:2], attn.num_heads, attn.head_dim)
            q = out.view(*out.shape[:2], attn.num_heads, attn.head_dim)
            new = _perturb_batch(q, keys.repeat(repeat, 1, 1, 1), objects * repeat, cfg)
            return new.reshape(out.shape).to(out.dtype)

        self.handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.q_proj.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("repeat_time", [1, 2])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c.get('rank') or c['threshold']}-{c['mode']}-kn{c['keep_norm']}")
def test_matches_plain_reference(model, pixels, cfg, repeat_time):
    handle = assert_matches_reference(model, lambda: run(model, pixels, repeat_time), lambda: Reference(model, cfg), cfg)
    assert handle.num_layers == LAYERS // 2 + 1 and handle.layout.num_tokens == 1 + (IMAGE // PATCH) ** 2
    handle = qpert.attach(model, qpert.QPertConfig(**cfg))
    try:  # subspaces computed once from the tokens (as an evaluation caches them) perturb the same
        with handle.objects(BOXES, SIZES):
            on_the_fly = run(model, pixels, repeat_time)
        subspaces = handle.compute_subspaces(model.vision_model(pixel_values=pixels)[0], BOXES, SIZES)
        with handle.objects(subspaces=subspaces):
            reused = run(model, pixels, repeat_time)
    finally:
        handle.detach()
    assert (reused - on_the_fly).abs().max() <= 1e-6


def test_bit_identical_when_inactive(model, pixels):
    assert_inactive_is_bit_identical(model, lambda: run(model, pixels), alpha=1.0)
    base = run(model, pixels)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=1.0))
    try:
        with handle.objects([BOXES[0], [], BOXES[2]], SIZES):
            mixed = run(model, pixels, repeat_time=2)
    finally:
        handle.detach()
    tiled = base.repeat(2, 1, 1)  # rows 1 and 4 belong to image 1, which has no boxes
    assert torch.equal(mixed[[1, 4]], tiled[[1, 4]]) and (mixed[0] - tiled[0]).abs().max() > 1e-3


def test_detach_restores_model(model, pixels):
    assert_detach_restores(model, lambda: run(model, pixels), BOXES, SIZES)


def test_family_needs_qllama():
    """transformers' own InternVLModel (the chat models) shares the class name but has no QLLaMA."""
    InternVLModel = type("InternVLModel", (nn.Module,), {})
    with pytest.raises(UnsupportedModelError, match="QLLaMA"):
        family_of(InternVLModel())


def test_registry_entry():
    spec = MODELS["internvl-g"]
    assert spec.source == "OpenGVLab/InternVL-14B-224px" and spec.remote_code and spec.image_size == 224
    assert spec.alphas == (0.2, 0.4, 0.6, 0.8, 1.0)
    assert spec.family.retrieval.load_processor is internvl.load_processor and not spec.family.retrieval.has_itm


def test_remote_code_is_an_explicit_opt_in(tmp_path):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        qpert.load_model("internvl-g")
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["InternVLModel"], "auto_map": {"AutoModel": "modeling_internvl.InternVLModel"}}))
    with pytest.raises(ValueError, match="--trust-remote-code"):
        qpert.load_model(str(tmp_path))
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    out = subprocess.run([sys.executable, "-c", "from qpert.cli import main; main()", "score", str(image),
                          "-t", "x", "--model", "internvl-g"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--trust-remote-code" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------- retrieval (qpert score / eval)
TEXTS = ["a small red square", "the green box", "a big blue square in the corner"]


def tiny_tokenizer_dir(path) -> str:
    """A folder holding a character-level LLaMA tokenizer without EOS: ``load_processor`` must add it."""
    LlamaTokenizer(vocab=VOCAB, merges=[]).save_pretrained(path)
    return str(path)


def tiny_loaded(path) -> LoadedModel:
    return LoadedModel("tiny-internvl-g", tiny_internvl(), internvl.load_processor(tiny_tokenizer_dir(path)), None)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return tiny_loaded(tmp_path_factory.mktemp("internvl"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def own_itc(model, pixels, ids):
    """ITC of clip_benchmark's evaluation: normalized encode_image(mode="InternVL-G") x normalized encode_text."""
    with torch.no_grad():
        image = nn.functional.normalize(model.encode_image(pixels, mode="InternVL-G"), dim=-1)
        text = nn.functional.normalize(model.encode_text(ids), dim=-1)
    return image @ text.T


def test_tokenize_as_clip_benchmark(loaded):
    ids, mask = retrieval_heads(loaded.model).tokenize(loaded.model, loaded.processor, TEXTS)
    lengths = mask.sum(1)
    assert ids.shape == (3, 80) and torch.equal(mask, (ids > 0).long())
    assert torch.equal(mask, (torch.arange(80) < lengths[:, None]).long())  # padded on the right
    assert (ids[torch.arange(3), lengths - 1] == loaded.processor.tokenizer.eos_token_id).all()
    assert loaded.processor.tokenizer.decode(ids[2], skip_special_tokens=True) == "summarize:" + TEXTS[2]


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3]], ids=lambda c: f"{c['weight']}-{c['mode']}")
def test_scores_match_own_encoders_and_the_reference(loaded, images, cfg):
    """Baseline: the model's own encoders; Q-Pert: the same with the plain reference in every cross-attention."""
    model, retriever = loaded.model, retrieval_heads(loaded.model)
    pixels = retriever.preprocess(model, loaded.processor, images)
    ids, _ = retriever.tokenize(model, loaded.processor, TEXTS)
    got = score(loaded, images, BOXES, TEXTS, qpert.QPertConfig(**cfg))
    baseline = own_itc(model, pixels, ids)
    ref = Reference(model, cfg)
    try:
        expected = own_itc(model, pixels, ids)
    finally:
        ref.remove()
    assert (expected - baseline).abs().max() > 1e-4, "the reference must change the scores, else the test is vacuous"
    assert got["baseline"].itm is None and (got["baseline"].itc - baseline).abs().max() <= 1e-5
    assert (got["qpert"].itc - expected).abs().max() <= 1e-5


def test_preprocess_stretches_to_the_input_size(loaded, images):
    pixels = retrieval_heads(loaded.model).preprocess(loaded.model, loaded.processor, images)
    assert pixels.shape == (3, 3, IMAGE, IMAGE)


def test_object_embeddings_read_the_object_tokens_alone(model, pixels):
    tokens = internvl.image_tokens(model, pixels)
    keep = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    keep[0, 3:9], keep[1, 1:], keep[2] = True, True, True
    roi = internvl.roi_embeddings(model, tokens, keep)
    assert (roi[2] - internvl.image_embeddings(model, tokens)[2]).abs().max() <= 1e-6, "all kept: the image"
    noisy = tokens.clone()
    noisy[~keep] = torch.randn(int((~keep).sum()), tokens.shape[-1])
    assert (internvl.roi_embeddings(model, noisy, keep) - roi).abs().max() <= 1e-6, "other tokens are not read"
    changed = tokens.clone()
    changed[0, 4] += 1.0
    assert (internvl.roi_embeddings(model, changed, keep)[0] - roi[0]).abs().max() > 1e-4


def test_clip_projector_is_perturbed_unless_excluded(loaded, images):
    """The supplement's pooling site: its own head shape, it changes the scores, and exclude= leaves it alone."""
    model, retriever = loaded.model, retrieval_heads(loaded.model)
    tokens = retriever.image_tokens(model, retriever.preprocess(model, loaded.processor, images))
    ids, mask = retriever.tokenize(model, loaded.processor, TEXTS)
    text = retriever.text_embeddings(model, ids, mask)
    config = qpert.QPertConfig(**CONFIGS[0])
    scores = {}
    for exclude in ((), ("clip_projector",)):
        handle = qpert.attach(model, config, exclude=exclude)
        try:
            subspaces = handle.compute_subspaces(tokens, BOXES, SIZES)
            with handle.objects(subspaces=subspaces):
                scores[exclude] = retriever.itc_scores(retriever.image_embeddings(model, tokens), text)
        finally:
            handle.detach()
        shapes = [tuple(t.shape[1:3]) for t in subspaces.mean_projector]
        assert shapes == [(HEADS, HIDDEN // HEADS)] * (LAYERS // 2) + [(POOL_HEADS, VISION // POOL_HEADS)] * (not exclude)
    assert (scores[()] - scores[("clip_projector",)]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no cross-attention of this model is named"):
        qpert.attach(model, config, exclude=("clip_projectr",))
