"""Adapters: find a model's cross-attention modules and hook Q-Pert into them.

BERT-style ``query``/``key`` linears (BLIP-2, BLIP), ``nn.MultiheadAttention`` (CoCa, SigLIP) and
LLaMA-style ``q_proj``/``k_proj`` cross-attention (InternVL-G's QLLaMA), and InternVL's attention
pooling (InternVL-G's ``clip_projector``).
"""
from .bert import BertCrossAttentionSite, find_bert_cross_attentions
from .handle import CrossAttentionSite, QPertHandle, attach_sites
from .mha import MultiheadAttentionSite, find_multihead_attentions
from .pooling import AttentionPoolingSite
from .qllama import LlamaCrossAttentionSite, find_llama_cross_attentions

__all__ = ["AttentionPoolingSite", "BertCrossAttentionSite", "CrossAttentionSite", "LlamaCrossAttentionSite", "MultiheadAttentionSite",
           "QPertHandle", "attach_sites", "find_bert_cross_attentions", "find_llama_cross_attentions",
           "find_multihead_attentions"]
