"""Adapters: find a model's cross-attention modules and hook Q-Pert into them.

BERT-style ``query``/``key`` linears (BLIP-2, BLIP), ``nn.MultiheadAttention`` (CoCa, SigLIP) and
LLaMA-style ``q_proj``/``k_proj`` cross-attention (InternVL-G's QLLaMA), and InternVL's attention
pooling (InternVL-G's ``clip_projector``).
"""

from .bert import BertCrossAttentionSite, find_bert_cross_attentions
from .handle import QPertHandle, attach_sites
from .mha import MultiheadAttentionSite, find_multihead_attentions
from .objects import ImageObjects
from .pooling import AttentionPoolingSite
from .qllama import LlamaCrossAttentionSite, find_llama_cross_attentions
from .site import CrossAttentionSite, KeyTokens, same_tokens

__all__ = [
    "AttentionPoolingSite",
    "BertCrossAttentionSite",
    "CrossAttentionSite",
    "ImageObjects",
    "KeyTokens",
    "LlamaCrossAttentionSite",
    "MultiheadAttentionSite",
    "QPertHandle",
    "attach_sites",
    "find_bert_cross_attentions",
    "find_llama_cross_attentions",
    "find_multihead_attentions",
    "same_tokens",
]
