"""What the official Q-Pert code computes where it differs from the paper (``compat="official"``).

The published numbers come from NEC-N-SOGI/query-perturbation (commit c6e0294); this module
reproduces its computations so they can be compared with the paper's equations:

* projector (``base_qpert.py`` ``pca`` / ``get_projection_mat``): ``torch.linalg.eigh`` of the
  uncentred key autocorrelation gives eigenvectors as *columns* of V; after sorting them by
  descending eigenvalue, ``_vec[~ev_sel] = 0`` zeroes *rows* of V, so the projector is
  ``Vᵀ D_S V`` (D_S selects the first r indices), not the paper's ``U_r U_rᵀ``. It projects onto
  the span of the first r rows of V, which depends on the sign of every eigenvector (and, when a
  box covers fewer tokens than the head dimension, on the basis LAPACK picks for the zero
  eigenvalues). qpert fixes the signs deterministically: each eigenvector's entry of largest
  magnitude is made positive (the first such entry on ties).
* rank rule (``get_n_pc``): a threshold tau keeps indices whose cumulative eigenvalue ratio is
  below tau, plus the first; a fixed rank k keeps the first k. No clamping, no numerical-rank cut.
* token weights (``get_key_weight``): a 0/1 mask ``[int(y0):int(y1), int(x0):int(x1)]`` at the
  original image size, resized bilinearly without antialiasing to the model's input (the
  torchvision 0.16 tensor default), binarised (> 0 -> 1) and averaged over each patch.
* boxes are neither clipped nor dropped (``prepare_boxes(clip=False)``): the Entities loaders'
  "- 1" turns a box at the image's left or top edge into x0 or y0 = -1, which Python's slicing
  reads as the last column or row, so its mask is empty; zero-width boxes are empty too.
* an object whose mask covers no token is kept (its pooled keys are zero; eigh of the zero
  matrix gives it a rank-1 projector onto the last coordinate), and counts in the mean over objects.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .geometry import BoxBatch, Layout, TokenLayout


def canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column of (…, d, d) so that its entry of largest magnitude is positive."""
    pivot = vectors.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(vectors.gather(-2, pivot) < 0, -1.0, 1.0).to(vectors.dtype)
    return vectors * sign


def official_rank_mask(evals: torch.Tensor, threshold: float, rank: Optional[int] = None) -> torch.Tensor:
    """(…, d) bool: ``get_n_pc`` on descending eigenvalues (a NaN ratio selects only the first)."""
    selected = torch.zeros_like(evals, dtype=torch.bool)
    if rank is not None:
        selected[..., :rank] = True
        return selected
    selected = evals.cumsum(-1) / evals.sum(-1, keepdim=True) < threshold
    selected[..., 0] = True
    return selected


def official_projectors(pooled: torch.Tensor, threshold: float = 0.99, rank: Optional[int] = None) -> torch.Tensor:
    """``Vᵀ D_S V`` from pooled keys (…, T, d), in float32 as the official run."""
    pooled = pooled.float()
    autocorr = pooled.transpose(-1, -2) @ pooled
    finite = torch.isfinite(autocorr).flatten(-2).all(-1)[..., None, None]
    evals, evecs = torch.linalg.eigh(torch.where(finite, autocorr, torch.zeros_like(autocorr)))
    evals, evecs = evals.flip(-1), canonical_signs(evecs.flip(-1))
    rows = evecs * official_rank_mask(evals, threshold, rank)[..., :, None]  # zero the rows, as _vec[~ev_sel] = 0
    return rows.transpose(-1, -2) @ rows


def _resize_masks(masks: torch.Tensor, height: int, width: int, layout: TokenLayout) -> torch.Tensor:
    """(M, 1, h, w) masks through the layout's resize (and centre crop) to its input size, bilinear."""
    in_h, in_w = layout.input_size
    if layout.resize == "stretch":
        return F.interpolate(masks, size=(in_h, in_w), mode="bilinear", align_corners=False, antialias=False)
    side = min(in_h, in_w)
    new_h, new_w = (side, int(side * width / height)) if height <= width else (int(side * height / width), side)
    resized = F.interpolate(masks, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=False)
    top, left = round((new_h - in_h) / 2), round((new_w - in_w) / 2)
    return resized[..., top : top + in_h, left : left + in_w]


def official_token_weights(batch: BoxBatch, layout: Layout, num_tokens: Optional[int] = None) -> torch.Tensor:
    """(B, M, N) token weights as ``get_key_weight``: binarised, resized box masks averaged per patch."""
    sizes = batch.image_sizes.round().int().tolist()
    n = num_tokens if num_tokens is not None else layout.num_tokens
    out = torch.zeros(len(batch), batch.boxes.shape[1], n)
    for i, (h, w) in enumerate(sizes):
        fixed = layout if isinstance(layout, TokenLayout) else layout.for_image(h, w, n)
        kept = batch.valid[i].nonzero().flatten().tolist()
        if not kept:
            continue
        masks = torch.zeros(len(kept), 1, h, w)
        for row, m in enumerate(kept):  # Python's slicing, as the official code's: -1 is the last row
            x0, y0, x1, y1 = (int(v) for v in batch.boxes[i, m].tolist())
            masks[row, 0, y0:y1, x0:x1] = 1.0
        binary = (_resize_masks(masks, h, w, fixed) > 0).float()
        cover = F.avg_pool2d(binary, kernel_size=fixed.patch, stride=fixed.patch).flatten(1)
        start = fixed.num_prefix_tokens
        out[i, kept, start : start + cover.shape[1]] = cover
    return out
