"""``ImageObjects``: a batch of images, their boxes and one Q-Pert setting, the one flow every caller shares.

Scoring, evaluation, indexing and search all do the same: build each image's subspaces once from its
tokens and boxes (with the family's key transform), then perturb forward passes over those images,
or over batches of (image, text) pairs that pick them by index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..config import QPertConfig
from ..core import Subspaces
from ..core.geometry import BoxesLike
from .handle import QPertHandle


@dataclass(frozen=True)
class ImageObjects:
    """The objects of a batch of images under one setting, ready to perturb any pass over them.

    handle: the attached handle; subspaces: one row per image; config: alpha, weight and the rest
    (its rank rule, compat and projector are the subspaces').
    """

    handle: QPertHandle
    subspaces: Subspaces
    config: QPertConfig

    @classmethod
    def from_boxes(
        cls,
        handle: QPertHandle,
        image_tokens: torch.Tensor,
        boxes: Sequence[BoxesLike],
        image_sizes: Sequence[Sequence[float]],
        config: Optional[QPertConfig] = None,
    ) -> ImageObjects:
        """Subspaces from the family's image tokens (B, N, C) and one box list per image."""
        config = config or handle.config
        return cls(handle, handle.compute_subspaces(image_tokens, boxes, image_sizes, config), config)

    def perturb(self, index: Union[slice, torch.Tensor, Iterable[int], None] = None) -> AbstractContextManager:
        """The block inside which forward passes are perturbed: over these images (``index`` None), a
        slice of them, or a batch whose row p is image ``index[p]`` (e.g. ITM pairs)."""
        subspaces = self.subspaces if index is None else self.subspaces.select(index)
        return self.handle.objects(subspaces=subspaces, config=self.config)
