"""Model-agnostic Q-Pert math: pure tensors in, tensors out, no model imports."""
from .boxes import BoxBatch, Layout, PerImageLayout, QPertWarning, TokenLayout, prepare_boxes, token_weights
from .perturb import perturb_queries, perturbation_matrix
from .subspaces import Subspaces, compute_subspaces, key_autocorrelation, pooled_projectors, projectors

__all__ = [
    "BoxBatch", "Layout", "PerImageLayout", "QPertWarning", "Subspaces", "TokenLayout", "compute_subspaces",
    "key_autocorrelation", "perturb_queries", "perturbation_matrix", "pooled_projectors", "prepare_boxes", "projectors",
    "token_weights",
]
