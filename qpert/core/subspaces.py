"""Object K-subspaces from keys and token weights (DESIGN.md §1, step 2), fully batched.

Every weight function is affine in the object area, w(a) = c0 + c1 a, so the whole query
perturbation of an image, layer and head is the matrix c0 * S0 + c1 * S1 with
S0 = mean_i P_i and S1 = mean_i a_i P_i over the kept objects. Storing (S0, S1) instead of
per-object projectors makes the cache independent of alpha and the weight function, and
applying it costs one d x d product per query.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Union

import torch

Threshold = Union[float, int]

#: Objects per eigen-batch are chosen so the pooled keys stay under this many bytes.
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class Subspaces:
    """Per-image Q-Pert operators, reusable for every text the image is matched with.

    mean_projector (S0) and area_projector (S1): (B, L, H, d, d) float32, layers L and heads H
    of the attached cross-attentions; active: (B,) bool, False for images without kept objects
    (their queries are left bit-identical); threshold: the rank rule they were built with.
    """

    mean_projector: torch.Tensor
    area_projector: torch.Tensor
    active: torch.Tensor
    threshold: Threshold

    def __len__(self) -> int:
        return self.active.shape[0]

    def select(self, index: Union[torch.Tensor, Iterable[int], slice]) -> "Subspaces":
        """Rows for a batch of (image, text) pairs, e.g. ``subspaces.select(image_index_of_pair)``."""
        if not isinstance(index, (torch.Tensor, slice)):
            index = torch.as_tensor(list(index), dtype=torch.long)
        if isinstance(index, torch.Tensor):
            index = index.to(self.active.device)
        return Subspaces(self.mean_projector[index], self.area_projector[index], self.active[index], self.threshold)

    def to(self, device: Union[str, torch.device]) -> "Subspaces":
        return Subspaces(self.mean_projector.to(device), self.area_projector.to(device),
                         self.active.to(device), self.threshold)

    @staticmethod
    def cat(parts: list["Subspaces"]) -> "Subspaces":
        if not parts:
            raise ValueError("cannot concatenate an empty list of Subspaces")
        thresholds = {p.threshold for p in parts}
        if len(thresholds) != 1:
            raise ValueError(f"cannot concatenate subspaces built with different thresholds {thresholds}")
        return Subspaces(torch.cat([p.mean_projector for p in parts]), torch.cat([p.area_projector for p in parts]),
                         torch.cat([p.active for p in parts]), parts[0].threshold)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly); the threshold travels as a 0-d tensor."""
        return {"mean_projector": self.mean_projector.contiguous(), "area_projector": self.area_projector.contiguous(),
                "active": self.active.contiguous(),
                "threshold": torch.tensor(float(self.threshold), dtype=torch.float64),
                "threshold_is_rank": torch.tensor(isinstance(self.threshold, int))}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Subspaces":
        t = float(state["threshold"])
        threshold: Threshold = int(t) if bool(state["threshold_is_rank"]) else t
        return cls(state["mean_projector"].float(), state["area_projector"].float(), state["active"].bool(), threshold)


def key_autocorrelation(keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """C_i = K̃_iᵀ K̃_i with K̃_i = diag(m_i) K.

    keys: (O, L, H, N, d), the keys of each object's image; weights: (O, N) token weights m_i.
    Returns (O, L, H, d, d).
    """
    support = weights.sum(0) > 0  # tokens no object of this chunk touches add nothing
    keys = keys[..., support, :]
    w2 = (weights[:, support] ** 2)[:, None, None, :, None]
    return (keys * w2).transpose(-1, -2) @ keys


def projectors(autocorr: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """P = U_r U_rᵀ for each (…, d, d) autocorrelation, rank by contribution ratio or fixed k.

    Directions with numerically zero eigenvalue are never included (a box covering t < d
    tokens spans at most t directions), and an all-zero matrix gives P = 0, so nothing is NaN.
    """
    d = autocorr.shape[-1]
    scale = autocorr.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    finite = torch.isfinite(scale)
    normalized = torch.where(finite & (scale > 0), autocorr / scale.clamp_min(1e-30), torch.zeros_like(autocorr))
    evals, evecs = torch.linalg.eigh(normalized)
    evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
    numerical_rank = (evals > evals[..., :1] * d * torch.finfo(evals.dtype).eps).sum(-1)
    if isinstance(threshold, int):
        rank = torch.full_like(numerical_rank, threshold)
    else:
        ratio = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp_min(1e-30)
        rank = (ratio < threshold).sum(-1).clamp_min(1)
    rank = torch.minimum(rank, numerical_rank)
    keep = torch.arange(d, device=autocorr.device) < rank[..., None]
    basis = evecs * keep[..., None, :]
    return basis @ basis.transpose(-1, -2)


def compute_subspaces(
    keys: torch.Tensor,
    weights: torch.Tensor,
    areas: torch.Tensor,
    valid: torch.Tensor,
    threshold: Threshold,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Subspaces:
    """Build the per-image operators (S0, S1) from keys and object token weights.

    keys: (B, L, H, N, d) keys of L layers x H heads (any dtype; math in float32);
    weights: (B, M, N) token weights; areas: (B, M) normalized areas; valid: (B, M) bool.
    An object whose weights are all zero (it covers no token) is dropped, as in DESIGN.md §1.
    """
    b, n_layers, n_heads, n_tokens, d = keys.shape
    keys = keys.float()
    weights = weights.to(keys.device, torch.float32)
    kept = valid.to(keys.device) & (weights.sum(-1) > 0)
    count = kept.sum(1)
    s0 = keys.new_zeros(b, n_layers, n_heads, d, d)
    s1 = keys.new_zeros(b, n_layers, n_heads, d, d)
    image_of, object_of = kept.nonzero(as_tuple=True)
    per_object = max(1, chunk_bytes // max(1, n_layers * n_heads * n_tokens * d * 4))
    coef = 1.0 / count.clamp_min(1).float()
    area = areas.to(keys.device, torch.float32)
    for start in range(0, image_of.numel(), per_object):
        img, obj = image_of[start:start + per_object], object_of[start:start + per_object]
        p = projectors(key_autocorrelation(keys[img], weights[img, obj]), threshold)
        c = coef[img][:, None, None, None, None]
        s0.index_add_(0, img, p * c)
        s1.index_add_(0, img, p * (c * area[img, obj][:, None, None, None, None]))
    return Subspaces(s0, s1, count > 0, threshold)
