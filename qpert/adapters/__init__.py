"""Adapters: find a model's cross-attention modules and hook Q-Pert into them."""
from .bert import BertCrossAttentionSite, find_bert_cross_attentions
from .handle import CrossAttentionSite, QPertHandle, attach_sites

__all__ = ["BertCrossAttentionSite", "CrossAttentionSite", "QPertHandle", "attach_sites", "find_bert_cross_attentions"]
