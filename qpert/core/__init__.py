"""Model-agnostic Q-Pert math: pure tensors in, tensors out, no model imports."""

from .geometry import BoxBatch, Layout, PerImageLayout, QPertWarning, TokenLayout, prepare_boxes, token_weights
from .official import canonical_signs, official_projectors, official_rank_mask, official_token_weights
from .perturb import perturb_queries, perturbation_matrix
from .subspaces import (
    Subspaces,
    compute_subspaces,
    key_autocorrelation,
    pooled_projectors,
    projectors,
    random_projectors,
)

__all__ = [
    "BoxBatch",
    "Layout",
    "PerImageLayout",
    "QPertWarning",
    "Subspaces",
    "TokenLayout",
    "canonical_signs",
    "compute_subspaces",
    "key_autocorrelation",
    "official_projectors",
    "official_rank_mask",
    "official_token_weights",
    "perturb_queries",
    "perturbation_matrix",
    "pooled_projectors",
    "prepare_boxes",
    "projectors",
    "random_projectors",
    "token_weights",
]
