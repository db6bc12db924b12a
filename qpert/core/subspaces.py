"""Object K-subspaces from keys and token weights (DESIGN.md §1, step 2), fully batched.

Every weight function is affine in the object area, w(a) = c0 + c1 a, so the whole query
perturbation of an image, layer and head is the matrix c0 * S0 + c1 * S1 with
S0 = mean_i P_i and S1 = mean_i a_i P_i over the kept objects. Storing (S0, S1) instead of
per-object projectors makes the cache independent of alpha and the weight function, and
applying it costs one d x d product per query.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..config import QPertConfig
from ..errors import ConfigError
from .official import official_projectors

#: Objects per eigen-batch are chosen so the pooled keys stay under this many bytes.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def _decode(tensor: Optional[torch.Tensor], default: str) -> str:
    return default if tensor is None else bytes(tensor.tolist()).decode()


@dataclass
class Subspaces:
    """Per-image Q-Pert operators, reusable for every text the image is matched with.

    mean_projector (S0) and area_projector (S1): one (B, H, d, d) float32 tensor per attached
    cross-attention layer (layers may differ in heads H and head size d); active: (B,) bool, False
    for images without kept objects (their queries are left bit-identical); threshold, rank, compat
    and projector: the recipe they were built with (a config asking for another cannot use them).
    """

    mean_projector: tuple[torch.Tensor, ...]
    area_projector: tuple[torch.Tensor, ...]
    active: torch.Tensor
    threshold: float
    rank: Optional[int] = None
    compat: str = "paper"
    projector: str = "paper"

    def __len__(self) -> int:
        return self.active.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.mean_projector)

    def recipe(self) -> tuple:
        """What decides the operators besides the image and its boxes."""
        return self.threshold, self.rank, self.compat, self.projector

    def _with(self, fn) -> Subspaces:
        return Subspaces(
            tuple(fn(t) for t in self.mean_projector),
            tuple(fn(t) for t in self.area_projector),
            fn(self.active),
            *self.recipe(),
        )

    def select(self, index: Union[torch.Tensor, Iterable[int], slice]) -> Subspaces:
        """Rows for a batch of (image, text) pairs, e.g. ``subspaces.select(image_index_of_pair)``."""
        if not isinstance(index, (torch.Tensor, slice)):
            index = torch.as_tensor(list(index), dtype=torch.long)
        if isinstance(index, torch.Tensor):
            index = index.to(self.active.device)
        return self._with(lambda t: t[index])

    def to(self, device: Union[str, torch.device]) -> Subspaces:
        return self._with(lambda t: t.to(device))

    @staticmethod
    def cat(parts: list[Subspaces]) -> Subspaces:
        if not parts:
            raise ConfigError("cannot concatenate an empty list of Subspaces")
        recipes = {p.recipe() for p in parts}
        if len(recipes) != 1:
            raise ConfigError(
                f"cannot concatenate subspaces built differently (threshold, rank, compat, projector): {recipes}"
            )
        layers = range(parts[0].num_layers)
        return Subspaces(
            tuple(torch.cat([p.mean_projector[i] for p in parts]) for i in layers),
            tuple(torch.cat([p.area_projector[i] for p in parts]) for i in layers),
            torch.cat([p.active for p in parts]),
            *parts[0].recipe(),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly): one pair per layer; the recipe travels as small tensors."""
        state = {
            "active": self.active.contiguous(),
            "threshold": torch.tensor(self.threshold, dtype=torch.float64),
            "rank": torch.tensor(-1 if self.rank is None else self.rank),
            "compat": _encode(self.compat),
            "projector": _encode(self.projector),
        }
        for i, (s0, s1) in enumerate(zip(self.mean_projector, self.area_projector)):
            state[f"mean_projector.{i}"] = s0.clone().contiguous()
            state[f"area_projector.{i}"] = s1.clone().contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Subspaces:
        rank = int(state["rank"])
        layers = sum(1 for k in state if k.startswith("mean_projector."))
        return cls(
            tuple(state[f"mean_projector.{i}"].float() for i in range(layers)),
            tuple(state[f"area_projector.{i}"].float() for i in range(layers)),
            state["active"].bool(),
            float(state["threshold"]),
            None if rank < 0 else rank,
            _decode(state.get("compat"), "paper"),
            _decode(state.get("projector"), "paper"),
        )


def key_autocorrelation(keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """C_i = K̃_iᵀ K̃_i with K̃_i = diag(m_i) K (the d x d form of step 2).

    keys: (O, L, H, N, d), the keys of each object's image; weights: (O, N) token weights m_i.
    Returns (O, L, H, d, d).
    """
    pooled = keys * weights[:, None, None, :, None]
    return pooled.transpose(-1, -2) @ pooled


def _rank_mask(evals: torch.Tensor, threshold: float, rank: Optional[int]) -> torch.Tensor:
    """(…, n) bool: which of the descending eigenvalues span the K-subspace.

    The first ``rank`` directions, or as many as keep the cumulative eigenvalue ratio below
    ``threshold`` (at least one). Directions with numerically zero eigenvalue are never included
    (a box covering t < d tokens spans at most t directions), so an all-zero input gives an
    empty subspace.
    """
    n = evals.shape[-1]
    numerical_rank = (evals > evals[..., :1] * n * torch.finfo(evals.dtype).eps).sum(-1)
    if rank is not None:
        kept = torch.full_like(numerical_rank, rank)
    else:
        ratio = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp_min(1e-30)
        kept = (ratio < threshold).sum(-1).clamp_min(1)
    kept = torch.minimum(kept, numerical_rank)
    return torch.arange(n, device=evals.device) < kept[..., None]


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh of trace-normalized symmetric matrices, largest first; non-finite input -> zeros."""
    scale = matrix.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    ok = torch.isfinite(scale) & (scale > 0)
    normalized = torch.where(ok, matrix / scale.clamp_min(1e-30), torch.zeros_like(matrix))
    evals, evecs = torch.linalg.eigh(normalized)
    return evals.flip(-1).clamp_min(0), evecs.flip(-1)


def projectors(autocorr: torch.Tensor, threshold: float = 0.99, rank: Optional[int] = None) -> torch.Tensor:
    """P = U_r U_rᵀ for each (…, d, d) autocorrelation C = U Λ Uᵀ (r by ``rank`` or ``threshold``)."""
    evals, evecs = _descending_eigh(autocorr)
    basis = evecs * _rank_mask(evals, threshold, rank)[..., None, :]
    return basis @ basis.transpose(-1, -2)


def pooled_projectors(pooled: torch.Tensor, threshold: float = 0.99, rank: Optional[int] = None) -> torch.Tensor:
    """Projectors from pooled keys K̃ (…, T, d), through the cheaper eigen-problem.

    With fewer tokens than dimensions (T < d) the basis comes from the T x T Gram matrix
    K̃ K̃ᵀ = V Λ Vᵀ as u_j = K̃ᵀ v_j / |K̃ᵀ v_j|: same nonzero spectrum, smaller problem.
    """
    t, d = pooled.shape[-2:]
    if t >= d:
        return projectors(pooled.transpose(-1, -2) @ pooled, threshold, rank)
    evals, v = _descending_eigh(pooled @ pooled.transpose(-1, -2))
    pooled = torch.nan_to_num(pooled, nan=0.0, posinf=0.0, neginf=0.0)
    basis = pooled.transpose(-1, -2) @ v
    basis = basis / basis.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    basis = basis * _rank_mask(evals, threshold, rank)[..., None, :]
    return basis @ basis.transpose(-1, -2)


def _ranks(pooled: torch.Tensor, threshold: float, rank: Optional[int]) -> torch.Tensor:
    """(…,) the rank the paper's rule gives each object's K-subspace."""
    gram = (
        pooled @ pooled.transpose(-1, -2) if pooled.shape[-2] < pooled.shape[-1] else pooled.transpose(-1, -2) @ pooled
    )
    return _rank_mask(_descending_eigh(gram)[0], threshold, rank).sum(-1)


def random_projectors(
    pooled: torch.Tensor, seeds: list[int], threshold: float = 0.99, rank: Optional[int] = None
) -> torch.Tensor:
    """Projectors onto random orthonormal subspaces of the ranks the object keys would give.

    The ablation control for "the object subspace matters": same rank, same weights, no key
    information. ``seeds`` (one per object, leading dimension) make each object's subspaces
    depend on nothing but the seed, whatever batch it is computed in.
    """
    d = pooled.shape[-1]
    ranks = _ranks(pooled.float(), threshold, rank)
    gaussians = torch.stack(
        [torch.randn(*ranks.shape[1:], d, d, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    ).to(pooled.device)
    basis = torch.linalg.qr(gaussians).Q * (torch.arange(d, device=pooled.device) < ranks[..., None])[..., None, :]
    return basis @ basis.transpose(-1, -2)


def _bucket_sizes(covered: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Next power of two >= the number of covered tokens (capped at N): few, reusable shapes."""
    sizes = torch.pow(2, torch.ceil(torch.log2(covered.clamp_min(1).double()))).long()
    return sizes.clamp_max(n_tokens)


def _seeds(weights: torch.Tensor) -> list[int]:
    """A seed per object from its token weights (its box on the patch grid), for ``random_projectors``."""
    return [zlib.crc32(row.tobytes()) for row in weights.detach().float().cpu().numpy()]


def compute_subspaces(
    keys: torch.Tensor,
    weights: torch.Tensor,
    areas: torch.Tensor,
    valid: torch.Tensor,
    config: QPertConfig,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Subspaces:
    """Build the per-image operators (S0, S1) from keys and object token weights.

    keys: (B, L, H, N, d) keys of L layers x H heads (any dtype; math in float32);
    weights: (B, M, N) token weights; areas: (B, M) normalized areas; valid: (B, M) bool.
    ``config`` gives the recipe: rank rule (``threshold`` or ``rank``), ``projector`` and
    ``compat``. An object whose weights are all zero (it covers no token) is dropped, as in
    DESIGN.md §1, except with ``compat="official"``, which keeps it as the official code does.
    Only the tokens an object covers are gathered, and objects are batched by that count (a
    handful of power-of-two buckets), so small objects cost little.
    """
    b, n_layers, n_heads, n_tokens, d = keys.shape
    weights = weights.to(keys.device, torch.float32)
    kept = valid.to(keys.device)
    if config.compat != "official":
        kept = kept & (weights.sum(-1) > 0)
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
            p = _projectors(pooled.permute(0, 2, 3, 1, 4), config, obj_weights[chunk])
            c = coef[chunk][:, None, None, None, None]
            s0.index_add_(0, image_of[chunk], p * c)
            s1.index_add_(0, image_of[chunk], p * (c * obj_area[chunk][:, None, None, None, None]))
    return Subspaces(
        tuple(s0.unbind(1)),
        tuple(s1.unbind(1)),
        count > 0,
        config.threshold,
        config.rank,
        config.compat,
        config.projector,
    )


def _projectors(pooled: torch.Tensor, config: QPertConfig, weights: torch.Tensor) -> torch.Tensor:
    """(O, L, H, d, d) projectors of O objects from their pooled keys (O, L, H, T, d)."""
    threshold, rank = config.threshold, config.rank
    if config.projector == "paper":
        return pooled_projectors(pooled, threshold, rank)
    if config.projector == "official":
        return official_projectors(pooled, threshold, rank)
    if config.projector == "random":
        return random_projectors(pooled, _seeds(weights), threshold, rank)
    d = pooled.shape[-1]  # "identity"
    return torch.eye(d, device=pooled.device).expand(*pooled.shape[:-2], d, d)
