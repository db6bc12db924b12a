"""Query enhancement (DESIGN.md §1, step 3): q̂ = q + (1/M') Σ_i w(a_i) P_i q, batched."""

from __future__ import annotations

import torch

from ..config import QPertConfig


def perturbation_matrix(
    mean_projector: torch.Tensor, area_projector: torch.Tensor, config: QPertConfig
) -> torch.Tensor:
    """A with q̂ = q + A q, from S0 = mean_i P_i and S1 = mean_i a_i P_i (any leading shape)."""
    if config.mode == "orthogonal":
        return -mean_projector
    c0, c1 = config.weight_coefficients
    return c0 * mean_projector + c1 * area_projector


def perturb_queries(queries: torch.Tensor, matrix: torch.Tensor, active: torch.Tensor, keep_norm: bool) -> torch.Tensor:
    """Perturb per-head queries.

    queries: (B, T, H, d) in any dtype; matrix: (B, H, d, d) float32; active: (B,) bool.
    Math runs in float32; rows of inactive images are returned bit-identical.
    """
    q = queries.float()
    out = q + torch.einsum("bthd,bhed->bthe", q, matrix)
    if keep_norm:
        norm_in = q.norm(dim=-1, keepdim=True)
        norm_out = out.norm(dim=-1, keepdim=True)
        out = out * (norm_in / norm_out.clamp_min(torch.finfo(out.dtype).tiny))
    if queries.dtype != torch.float32 and queries.is_floating_point():
        info = torch.finfo(queries.dtype)  # keep half-precision models free of inf
        out = out.clamp(info.min, info.max)
    out = out.to(queries.dtype)
    return torch.where(active.to(queries.device)[:, None, None, None], out, queries)
