"""Q-Pert hyper-parameters (DESIGN.md §1)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Union

#: Each weight function is affine in the normalized object area a: w(a) = alpha * (c0 + c1 * a).
#: Keeping only (c0, c1) lets cached subspaces serve every weight function and alpha at once.
WEIGHT_COEFFICIENTS: dict[str, tuple[float, float]] = {
    "constant": (1.0, 0.0),
    "area": (0.0, 1.0),
    "inv_area": (1.0, -1.0),
    "centered": (-0.5, 1.0),
    "inv_centered": (0.5, -1.0),
}

MODES = ("enhance", "orthogonal")


@dataclass(frozen=True)
class QPertConfig:
    """How queries are perturbed.

    alpha: scale of the weight function; 0 turns Q-Pert off (the model is bit-identical).
    weight: one of ``constant``, ``area``, ``inv_area``, ``centered``, ``inv_centered``.
    threshold: a float in (0, 1) is the contribution-ratio threshold tau that picks each
        subspace's rank; an int >= 1 is a fixed rank k.
    keep_norm: rescale every perturbed query (per head) back to its original norm.
    mode: ``enhance`` (the paper's Q-Pert) or ``orthogonal`` (OrQ-Pert ablation:
        q - mean_i P_i q; alpha and weight are then unused except alpha=0 meaning off).
    """

    alpha: float = 8.0
    weight: str = "constant"
    threshold: Union[float, int] = 0.99
    keep_norm: bool = False
    mode: str = "enhance"

    def __post_init__(self) -> None:
        if self.weight not in WEIGHT_COEFFICIENTS:
            raise ValueError(f"unknown weight function {self.weight!r}; choose one of {sorted(WEIGHT_COEFFICIENTS)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ValueError(f"threshold must be a float in (0, 1) or an int rank >= 1, got {t!r}")
        if isinstance(t, int) and t < 1:
            raise ValueError(f"an integer threshold is a fixed rank and must be >= 1, got {t}")
        if isinstance(t, float) and not 0.0 < t < 1.0:
            raise ValueError(f"a float threshold is a contribution ratio and must lie in (0, 1), got {t}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):  # inf, nan: NaN scores
            raise ValueError(f"alpha must be a finite real number, got {self.alpha!r}")

    @property
    def enabled(self) -> bool:
        return self.alpha != 0

    @property
    def weight_coefficients(self) -> tuple[float, float]:
        """(c0, c1) with w(a) = alpha * (c0 + c1 * a)."""
        c0, c1 = WEIGHT_COEFFICIENTS[self.weight]
        return self.alpha * c0, self.alpha * c1

    def weight_of(self, area: float) -> float:
        c0, c1 = self.weight_coefficients
        return c0 + c1 * area

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QPertConfig":
        known = {"alpha", "weight", "threshold", "keep_norm", "mode"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Q-Pert config keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)
