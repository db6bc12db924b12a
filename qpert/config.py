"""Q-Pert hyper-parameters (DESIGN.md §1), and which computation of them to run."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

from .errors import ConfigError

#: Each weight function is affine in the normalized object area a: w(a) = alpha * (c0 + c1 * a).
#: Keeping only (c0, c1) lets cached subspaces serve every weight function and alpha at once.
WEIGHT_COEFFICIENTS: dict[str, tuple[float, float]] = {
    "constant": (1.0, 0.0),
    "area": (0.0, 1.0),
    "inv_area": (1.0, -1.0),
    "centered": (-0.5, 1.0),
    "inv_centered": (0.5, -1.0),
}
#: The official code's ``NORM_AREA_INV`` is -alpha * a (its comment says 1 - a, its code computes -a).
OFFICIAL_WEIGHT_COEFFICIENTS: dict[str, tuple[float, float]] = {**WEIGHT_COEFFICIENTS, "inv_area": (0.0, -1.0)}

#: The largest |alpha| float32 holds: a larger one makes every perturbed query, and every score, non-finite.
MAX_ALPHA = 3.4028234663852886e38

MODES = ("enhance", "orthogonal")
Weight = Literal["constant", "area", "inv_area", "centered", "inv_centered"]
Compat = Literal["paper", "official"]
COMPATS: tuple[str, ...] = ("paper", "official")
Projector = Literal["paper", "official", "random", "identity"]
#: paper: U_r U_rᵀ of the object's keys (the paper's equations); official: the official code's Vᵀ D_S V;
#: random: a random orthonormal subspace of the same rank (control: does the object subspace matter?);
#: identity: P = I, i.e. plain query scaling q̂ = (1 + w̄) q (control: is it only sharper attention?).
PROJECTORS: tuple[str, ...] = ("paper", "official", "random", "identity")


@dataclass(frozen=True)
class QPertConfig:
    """How queries are perturbed.

    alpha: scale of the weight function; 0 turns Q-Pert off (the model is bit-identical). Finite, and at
        most ``MAX_ALPHA`` (float32's largest) in magnitude: beyond it no score could be finite.
    weight: one of ``constant``, ``area``, ``inv_area``, ``centered``, ``inv_centered``.
    threshold: the contribution-ratio threshold tau in (0, 1) that picks each subspace's rank.
    rank: a fixed rank k >= 1 for every subspace instead (None: use ``threshold``).
    keep_norm: rescale every perturbed query (per head) back to its original norm.
    mode: ``enhance`` (the paper's Q-Pert) or ``orthogonal`` (OrQ-Pert ablation:
        q - mean_i P_i q; alpha and weight are then unused except alpha=0 meaning off).
    compat: ``paper`` computes the paper's equations; ``official`` what the official code
        (NEC-N-SOGI/query-perturbation, which produced the published numbers) computes: its
        projector Vᵀ D_S V (with deterministic eigenvector signs), ``inv_area`` = -alpha * a, and
        binarised box masks as token weights (``qpert.core.official``).
    projector: which projector each object gets (default: the one ``compat`` names); ``random`` and
        ``identity`` are the ablation controls of ``qpert demo --ablation``. Only ``compat="paper"``
        takes another projector than its own.
    """

    alpha: float = 8.0
    weight: str = "constant"
    threshold: float = 0.99
    rank: Optional[int] = None
    keep_norm: bool = False
    mode: str = "enhance"
    compat: str = "paper"
    projector: Optional[str] = None

    def __post_init__(self) -> None:
        if self.weight not in WEIGHT_COEFFICIENTS:
            raise ConfigError(f"unknown weight function {self.weight!r}; choose one of {sorted(WEIGHT_COEFFICIENTS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}")
        if self.compat not in COMPATS:
            raise ConfigError(f"unknown compat {self.compat!r}; choose one of {list(COMPATS)}")
        if self.projector is None:
            object.__setattr__(self, "projector", self.compat)
        if self.projector not in PROJECTORS:
            raise ConfigError(f"unknown projector {self.projector!r}; choose one of {list(PROJECTORS)}")
        if self.compat == "official" and self.projector != "official":
            raise ConfigError(
                "compat='official' runs the official code's own projector; the ablation projectors "
                f"({self.projector!r}) run with compat='paper'"
            )
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            raise ConfigError(f"threshold is a contribution ratio in (0, 1), got {t!r}; a fixed rank is rank=k")
        object.__setattr__(self, "threshold", float(t))
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank is a fixed subspace rank, an int >= 1 (or None), got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"alpha must be a finite real number, got {self.alpha!r}")
        if abs(self.alpha) > MAX_ALPHA:
            raise ConfigError(
                f"alpha={self.alpha:g} overflows: beyond {MAX_ALPHA:.3g} it is infinite in float32, so Q-Pert's scores "
                "would not be finite; choose a smaller alpha (the paper's grids reach 10)"
            )

    @property
    def enabled(self) -> bool:
        return self.alpha != 0

    @property
    def weight_coefficients(self) -> tuple[float, float]:
        """(c0, c1) with w(a) = alpha * (c0 + c1 * a)."""
        table = OFFICIAL_WEIGHT_COEFFICIENTS if self.compat == "official" else WEIGHT_COEFFICIENTS
        c0, c1 = table[self.weight]
        return self.alpha * c0, self.alpha * c1

    def weight_of(self, area: float) -> float:
        c0, c1 = self.weight_coefficients
        return c0 + c1 * area

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rank_rule(self) -> str:
        """How subspace ranks are picked, for names and messages: ``t0.99`` or ``rank8``."""
        return f"rank{self.rank}" if self.rank is not None else f"t{self.threshold:g}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QPertConfig:
        """Also reads configs saved by earlier versions: without ``compat``, ``projector`` or ``rank``
        (the paper's, and no fixed rank), and with an integer ``threshold`` meaning a fixed rank."""
        if not isinstance(d, dict):
            raise ConfigError(f"a Q-Pert config is a JSON object of settings, got {type(d).__name__}")
        known = {"alpha", "weight", "threshold", "rank", "keep_norm", "mode", "compat", "projector"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown Q-Pert config keys {sorted(unknown)}; expected {sorted(known)}")
        d = dict(d)
        old = d.get("threshold")
        if isinstance(old, int) and not isinstance(old, bool) and "rank" not in d:
            d["rank"], d["threshold"] = old, 0.99  # earlier versions: an int threshold was a fixed rank
        elif isinstance(old, float) and old >= 1.0:
            raise ConfigError(
                f"threshold {old} is neither a contribution ratio in (0, 1) nor, as a float, a rank: "
                f"write threshold (0, 1) or rank (an int) in the config file"
            )
        return cls(**d)


def compat_dtype(compat: str, dtype: Optional[str]) -> Optional[str]:
    """The dtype to load a model in: the official code runs in float32, so ``compat="official"``
    loads models in float32 and refuses another dtype rather than silently differ from it."""
    if compat != "official":
        return dtype
    if dtype not in (None, "fp32"):
        raise ConfigError(f"compat 'official' runs in float32 as the official code does; drop dtype {dtype!r}")
    return "fp32"
