"""Adapters: find a model's cross-attention modules and hook Q-Pert into them.

BERT-style ``query``/``key`` linears (BLIP-2, BLIP) and ``nn.MultiheadAttention`` (CoCa, SigLIP).
"""
from .bert import BertCrossAttentionSite, find_bert_cross_attentions
from .handle import CrossAttentionSite, QPertHandle, attach_sites
from .mha import MultiheadAttentionSite, find_multihead_attentions

__all__ = ["BertCrossAttentionSite", "CrossAttentionSite", "MultiheadAttentionSite", "QPertHandle", "attach_sites",
           "find_bert_cross_attentions", "find_multihead_attentions"]
