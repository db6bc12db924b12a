"""A tiny stand-in for InternVL-G (remote code that cannot be imported here).

It has the module structure, attribute names and forward signatures of ``modeling_qllama.py``
(OpenGVLab/InternVL, ``LlamaCrossAttention`` / ``LlamaDecoderLayer`` / ``LlamaModel.forward_train``)
and of ``InternVLModel`` (``get_image_features``, ``get_text_features``, ``encode_image``,
``encode_text``) as far as Q-Pert reads them. The cross-attention forward, the encode methods and the
attention pooling (``AttentionPoolingBlock``, ``CrossAttention``) are the real ones' logic;
self-attention and MLP are simplified (a causal mean, a linear), which the retrieval interface never
looks into.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn
from transformers import LlamaTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling

from qpert.models import internvl
from qpert.models.registry import LoadedModel
from qpert.models.tiny import randomize

HIDDEN, VISION, HEADS, LAYERS, QUERIES, IMAGE, PATCH, EMBED = 32, 24, 4, 4, 6, 28, 7, 16
POOL_HEADS = 2  # attention-pooling heads of 12 dims, beside QLLaMA's 4 x 8: sites of two shapes


#: A character-level LLaMA tokenizer: unk (also the pad id 0), bos, eos, then one token per character.
CHARACTERS = "▁abcdefghijklmnopqrstuvwxyz:"


VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(CHARACTERS)}}


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

    def forward(
        self,
        hidden_states,
        vision_hidden_states,
        repeat_time=1,
        attention_mask=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
    ):
        hidden_states = self.norm1(hidden_states)
        bsz, q_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        vision_hidden_states = self.norm2(vision_hidden_states)
        bs_v, kv_len, _ = vision_hidden_states.size()
        key_states = self.k_proj(vision_hidden_states).view(bs_v, kv_len, self.num_heads, self.head_dim).transpose(1, 2)
        value_states = (
            self.v_proj(vision_hidden_states).view(bs_v, kv_len, self.num_heads, self.head_dim).transpose(1, 2)
        )
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

    def forward(
        self,
        hidden_states,
        vision_hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_value=None,
        output_attentions=False,
        use_cache=False,
        repeat_time=1,
    ):
        steps = torch.arange(1, hidden_states.shape[1] + 1, dtype=hidden_states.dtype)[:, None]
        hidden_states = hidden_states + self.self_attn(hidden_states.cumsum(1) / steps)
        if (
            self.cross_attn is not None
            and hidden_states.size(1) >= self.num_query_token
            and vision_hidden_states is not None
        ):
            query_feats = hidden_states[:, : self.num_query_token, :]
            text_feats = hidden_states[:, self.num_query_token :, :]
            residual = query_feats
            query_feats, _, _ = self.cross_attn(
                hidden_states=query_feats,
                vision_hidden_states=vision_hidden_states,
                attention_mask=None,
                past_key_value=past_key_value,
                output_attentions=output_attentions,
                use_cache=use_cache,
                repeat_time=repeat_time,
            )
            hidden_states = torch.cat([residual + query_feats, text_feats], dim=1)
        return (hidden_states,)


class LlamaModel(nn.Module):
    """QLLaMA's decoder: ``forward_train`` is the pass ``get_image_features``/``get_text_features`` run."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(len(VOCAB), HIDDEN)
        self.layers = nn.ModuleList([LlamaDecoderLayer(i % 2 == 0) for i in range(LAYERS)])
        self.norm = LlamaRMSNorm(HIDDEN)

    def forward_train(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_hidden_states=None,
        repeat_time=1,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                vision_hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                repeat_time=repeat_time,
            )[0]
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
        B, N, _ = x.shape
        N_k, N_v = k.shape[1], v.shape[1]
        q = nn.functional.linear(input=x, weight=self.q.weight, bias=self.q_bias)
        q = q.reshape(B, N, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        k = nn.functional.linear(input=k, weight=self.k.weight, bias=self.k_bias)
        k = k.reshape(B, N_k, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        v = nn.functional.linear(input=v, weight=self.v.weight, bias=self.v_bias)
        v = v.reshape(B, N_v, 1, self.num_heads, -1).permute(2, 0, 3, 1, 4).squeeze(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
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
        self.config = SimpleNamespace(
            vision_config=SimpleNamespace(image_size=IMAGE, patch_size=PATCH), force_image_size=None
        )
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
        return self.qllama.model.forward_train(
            inputs_embeds=hidden, vision_hidden_states=image_embeds, repeat_time=repeat_time
        ).last_hidden_state

    def get_image_features(self, pixel_values, output_attentions=None, output_hidden_states=None, return_dict=None):
        backbone_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True)[0]
        input_embeds = self.query_tokens.repeat(backbone_embeds.shape[0], 1, 1)
        attention_mask = torch.zeros(len(input_embeds), 1, QUERIES, QUERIES)  # _expand_mask of all ones
        outputs = self.qllama.model.forward_train(
            inputs_embeds=input_embeds,
            vision_hidden_states=backbone_embeds,
            attention_mask=attention_mask,
            return_dict=True,
        ).last_hidden_state
        return backbone_embeds, outputs

    def get_text_features(
        self, input_ids, attention_mask, output_attentions=None, output_hidden_states=None, return_dict=None
    ):
        input_embeds = self.qllama.model.embed_tokens(input_ids)
        return self.qllama.model.forward_train(
            inputs_embeds=input_embeds, vision_hidden_states=None, attention_mask=attention_mask, return_dict=True
        ).last_hidden_state

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


def tiny_internvl() -> InternVLModel:
    torch.manual_seed(0)
    model = randomize(InternVLModel(), 3).eval()
    with torch.no_grad():
        model.qllama.model.norm.weight.fill_(1.0)  # a final RMSNorm of random ~0 weights would hide every change
    return model


def tiny_tokenizer_dir(path) -> str:
    """A folder holding a character-level LLaMA tokenizer without EOS: ``load_processor`` must add it."""
    LlamaTokenizer(vocab=VOCAB, merges=[]).save_pretrained(path)
    return str(path)


def tiny_loaded(path) -> LoadedModel:
    return LoadedModel("tiny-internvl-g", tiny_internvl(), internvl.load_processor(tiny_tokenizer_dir(path)), None)


def own_itc(model, pixels, ids):
    """ITC of clip_benchmark's evaluation: normalized encode_image(mode="InternVL-G") x normalized encode_text."""
    with torch.no_grad():
        image = nn.functional.normalize(model.encode_image(pixels, mode="InternVL-G"), dim=-1)
        text = nn.functional.normalize(model.encode_text(ids), dim=-1)
    return image @ text.T
