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
    """C_i = K̃_iᵀ K̃_i with K̃_i = diag(m_i) K (the d x d form of step 2).

    keys: (O, L, H, N, d), the keys of each object's image; weights: (O, N) token weights m_i.
    Returns (O, L, H, d, d).
    """
    pooled = keys * weights[:, None, None, :, None]
    return pooled.transpose(-1, -2) @ pooled


def _rank_mask(evals: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """(…, n) bool: which of the descending eigenvalues span the K-subspace.

    Directions with numerically zero eigenvalue are never included (a box covering t < d
    tokens spans at most t directions), so an all-zero input gives an empty subspace.
    """
    n = evals.shape[-1]
    numerical_rank = (evals > evals[..., :1] * n * torch.finfo(evals.dtype).eps).sum(-1)
    if isinstance(threshold, int):
        rank = torch.full_like(numerical_rank, threshold)
    else:
        ratio = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp_min(1e-30)
        rank = (ratio < threshold).sum(-1).clamp_min(1)
    rank = torch.minimum(rank, numerical_rank)
    return torch.arange(n, device=evals.device) < rank[..., None]


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of trace-normalized symmetric matrices, largest first; non-finite input -> zeros."""
    scale = matrix.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    ok = torch.isfinite(scale) & (scale > 0)
    normalized = torch.where(ok, matrix / scale.clamp_min(1e-30), torch.zeros_like(matrix))
    evals, evecs = torch.linalg.eigh(normalized)
    return evals.flip(-1).clamp_min(0), evecs.flip(-1)


def projectors(autocorr: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """P = U_r U_rᵀ for each (…, d, d) autocorrelation C = U Λ Uᵀ."""
    evals, evecs = _descending_eigh(autocorr)
    basis = evecs * _rank_mask(evals, threshold)[..., None, :]
    return basis @ basis.transpose(-1, -2)


def pooled_projectors(pooled: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Projectors from pooled keys K̃ (…, T, d), through the cheaper eigen-problem.

    With fewer tokens than dimensions (T < d) the basis comes from the T x T Gram matrix
    K̃ K̃ᵀ = V Λ Vᵀ as u_j = K̃ᵀ v_j / |K̃ᵀ v_j|: same nonzero spectrum, smaller problem.
    """
    t, d = pooled.shape[-2:]
    if t >= d:
        return projectors(pooled.transpose(-1, -2) @ pooled, threshold)
    evals, v = _descending_eigh(pooled @ pooled.transpose(-1, -2))
    pooled = torch.nan_to_num(pooled, nan=0.0, posinf=0.0, neginf=0.0)
    basis = pooled.transpose(-1, -2) @ v
    basis = basis / basis.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    basis = basis * _rank_mask(evals, threshold)[..., None, :]
    return basis @ basis.transpose(-1, -2)


def _bucket_sizes(covered: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Next power of two >= the number of covered tokens (capped at N): few, reusable shapes."""
    sizes = torch.pow(2, torch.ceil(torch.log2(covered.clamp_min(1).double()))).long()
    return sizes.clamp_max(n_tokens)


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
    Only the tokens an object covers are gathered, and objects are batched by that count
    (a handful of power-of-two buckets), so small objects cost little.
    """
    b, n_layers, n_heads, n_tokens, d = keys.shape
    weights = weights.to(keys.device, torch.float32)
    kept = valid.to(keys.device) & (weights.sum(-1) > 0)
    count = kept.sum(1)
    s0 = keys.new_zeros(b, n_layers, n_heads, d, d, dtype=torch.float32)
    s1 = torch.zeros_like(s0)
    image_of, object_of = kept.nonzero(as_tuple=True)
    obj_weights = weights[image_of, object_of]
    coef = (1.0 / count.clamp_min(1).float())[image_of]
    obj_area = areas.to(keys.device, torch.float32)[image_of, object_of]
    sizes = _bucket_sizes((obj_weights > 0).sum(-1), n_tokens)
    tokens_first = keys.permute(0, 3, 1, 2, 4)  # (B, N, L, H, d), a view
    for size in sizes.unique().tolist():
        members = (sizes == size).nonzero(as_tuple=True)[0]
        per_chunk = max(1, chunk_bytes // (n_layers * n_heads * size * d * 4 * 3))
        for chunk in members.split(per_chunk):
            values, index = obj_weights[chunk].topk(size, dim=-1)
            pooled = tokens_first[image_of[chunk, None], index].float() * values[..., None, None, None]
            p = pooled_projectors(pooled.permute(0, 2, 3, 1, 4), threshold)
            c = coef[chunk][:, None, None, None, None]
            s0.index_add_(0, image_of[chunk], p * c)
            s1.index_add_(0, image_of[chunk], p * (c * obj_area[chunk][:, None, None, None, None]))
    return Subspaces(s0, s1, count > 0, threshold)
