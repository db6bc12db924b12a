"""Q-Pert on InternVL-G's QLLaMA cross-attention.

InternVL-G is remote code (``trust_remote_code``) that cannot be imported here, so this file holds
a tiny stand-in with the module structure, attribute names and forward signatures of
``modeling_qllama.py`` (OpenGVLab/InternVL, ``LlamaCrossAttention`` / ``LlamaDecoderLayer``) and of
``InternVLModel`` as far as Q-Pert reads them; the cross-attention forward is the real one, minus
the KV cache and attention mask that its retrieval pass never uses.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

import qpert
from contract import BOXES, SIZES, assert_detach_restores, assert_inactive_is_bit_identical
from qpert.errors import UnsupportedModelError
from qpert.models.registry import MODELS, family_of
from qpert.models.tiny import randomize
from reference_hooks import _perturb_batch, stretch_objects

HIDDEN, VISION, HEADS, LAYERS, QUERIES, IMAGE, PATCH = 32, 24, 4, 4, 6, 28, 7
CONFIGS = [
    dict(alpha=1.0, weight="constant", threshold=0.99, keep_norm=False, mode="enhance"),
    dict(alpha=0.6, weight="inv_area", threshold=0.8, keep_norm=True, mode="enhance"),
    dict(alpha=0.8, weight="centered", threshold=2, keep_norm=False, mode="enhance"),
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
    """Self-attention replaced by a linear; the cross-attention call is the real one."""

    def __init__(self, use_cross_attn: bool):
        super().__init__()
        self.self_attn = nn.Linear(HIDDEN, HIDDEN)
        self.cross_attn = LlamaCrossAttention(HIDDEN, HEADS, VISION) if use_cross_attn else None
        self.num_query_token = QUERIES

    def forward(self, hidden_states, vision_hidden_states, attention_mask=None, position_ids=None,
                past_key_value=None, output_attentions=False, use_cache=False, repeat_time=1):
        hidden_states = hidden_states + self.self_attn(hidden_states)
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


class InternVisionModel(nn.Module):
    """CLS + patch tokens, as InternViT's ``last_hidden_state``."""

    def __init__(self):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, VISION))
        self.patch_embedding = nn.Conv2d(3, VISION, kernel_size=PATCH, stride=PATCH)

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return torch.cat([self.class_embedding.expand(len(patches), 1, -1), patches], dim=1)


class InternVLModel(nn.Module):
    """What Q-Pert reads of InternVL's ``InternVLModel``: config, vision_model, qllama.model.layers."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=IMAGE, patch_size=PATCH),
                                      force_image_size=None)
        self.vision_model = InternVisionModel()
        self.qllama = nn.Module()
        self.qllama.model = nn.Module()
        self.qllama.model.layers = nn.ModuleList([LlamaDecoderLayer(i % 2 == 0) for i in range(LAYERS)])
        self.query_tokens = nn.Parameter(torch.zeros(1, QUERIES, HIDDEN))

    def forward(self, pixel_values, repeat_time=1):
        """The query features of ``get_image_features`` (with the queries tiled ``repeat_time`` times)."""
        image_embeds = self.vision_model(pixel_values)
        hidden = self.query_tokens.repeat(repeat_time * len(pixel_values), 1, 1)
        for layer in self.qllama.model.layers:
            hidden = layer(hidden, image_embeds, repeat_time=repeat_time)[0]
        return hidden


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(InternVLModel(), 3).eval()


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
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c['weight']}-{c['threshold']}-{c['mode']}-kn{c['keep_norm']}")
def test_matches_plain_reference(model, pixels, cfg, repeat_time):
    base = run(model, pixels, repeat_time)
    ref = Reference(model, cfg)
    try:
        expected = run(model, pixels, repeat_time)
    finally:
        ref.remove()
    assert (expected - base).abs().max() > 1e-3, "the reference must change the outputs, else the test is vacuous"
    handle = qpert.attach(model, qpert.QPertConfig(**cfg))
    try:
        assert handle.num_layers == LAYERS // 2 and handle.layout.num_tokens == 1 + (IMAGE // PATCH) ** 2
        with handle.objects(BOXES, SIZES):
            got = run(model, pixels, repeat_time)
        subspaces = handle.compute_subspaces(model.vision_model(pixels), BOXES, SIZES)  # raw tokens, as cached
        with handle.objects(subspaces=subspaces):
            reused = run(model, pixels, repeat_time)
    finally:
        handle.detach()
    assert (got - expected).abs().max() <= 1e-5
    assert (reused - expected).abs().max() <= 1e-5


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
    assert spec.alpha_grid == (0.2, 0.4, 0.6, 0.8, 1.0)


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
