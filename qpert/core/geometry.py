"""Boxes in original-image pixels -> per-token coverage on a model's patch grid.

Q-Pert pools the keys of the tokens an object covers (DESIGN.md §1, step 1). A token's weight
is the exact fraction of its patch that the box covers once the box has gone through the same
resize/crop as the pixels, so boxes land on the tokens the model actually sees.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, Union

import numpy as np
import torch

from ..errors import ConfigError

BoxesLike = Union[None, np.ndarray, torch.Tensor, Sequence[Sequence[float]]]


class QPertWarning(UserWarning):
    """Raised (as a warning) when input boxes are dropped or repaired."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens of an image sit in a vision encoder's output sequence.

    grid: (rows, cols) of patch tokens; patch: (height, width) of one patch in model-input pixels;
    num_prefix_tokens: CLS/register tokens before the patches (weight 0), num_suffix_tokens after.
    resize: ``stretch`` (resize to the input size, aspect ignored: BLIP, BLIP-2) or
    ``shortest_edge`` (shortest edge to the input size, then centre crop: CLIP-style).
    """

    grid: tuple[int, int]
    patch: tuple[int, int]
    num_prefix_tokens: int = 1
    num_suffix_tokens: int = 0
    resize: str = "stretch"

    def __post_init__(self) -> None:
        if self.resize not in ("stretch", "shortest_edge"):
            raise ConfigError(f"unknown resize mode {self.resize!r}")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch[0], self.grid[1] * self.patch[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid[0] * self.grid[1] + self.num_suffix_tokens

    def to_input_coords(self, boxes: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Map (B, M, 4) xyxy boxes from original pixels to model-input pixels."""
        in_h, in_w = self.input_size
        h, w = image_sizes[:, 0, None], image_sizes[:, 1, None]
        if self.resize == "stretch":
            sx, sy = in_w / w, in_h / h
            ox = oy = torch.zeros_like(sx)
        else:
            # Shortest edge resized to the crop size (as torchvision truncates), then a centre crop.
            short = torch.minimum(h, w)
            side = float(min(in_h, in_w))
            new_h = torch.where(h <= w, torch.full_like(h, side), torch.floor(side * h / short))
            new_w = torch.where(w < h, torch.full_like(w, side), torch.floor(side * w / short))
            sx, sy = new_w / w, new_h / h
            ox = torch.round((new_w - in_w) / 2)
            oy = torch.round((new_h - in_h) / 2)
        x0 = boxes[..., 0] * sx - ox
        y0 = boxes[..., 1] * sy - oy
        x1 = boxes[..., 2] * sx - ox
        y1 = boxes[..., 3] * sy - oy
        out = torch.stack([x0, y0, x1, y1], dim=-1)
        limits = torch.tensor([in_w, in_h, in_w, in_h], dtype=out.dtype, device=out.device)
        return torch.minimum(out.clamp_min(0), limits)


class PerImageLayout(Protocol):
    """A token layout that depends on the image: SigLIP 2 NaFlex gives every image its own patch
    grid (chosen from its size) inside a sequence padded to a fixed length. ``for_image`` returns
    the fixed layout of one image of ``height`` x ``width`` pixels in a sequence of ``num_tokens``."""

    def for_image(self, height: int, width: int, num_tokens: int) -> TokenLayout: ...


Layout = Union[TokenLayout, PerImageLayout]


@dataclass
class BoxBatch:
    """Sanitized boxes of a batch, padded to the largest object count.

    boxes: (B, M, 4) float32 xyxy in original pixels, clipped to the image (zeros where invalid);
    valid: (B, M) bool; image_sizes: (B, 2) float32 (height, width).
    """

    boxes: torch.Tensor
    valid: torch.Tensor
    image_sizes: torch.Tensor

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def areas(self) -> torch.Tensor:
        """(B, M) box area / image area, clipped to [0, 1]."""
        wh = (self.boxes[..., 2:] - self.boxes[..., :2]).clamp_min(0)
        img = (self.image_sizes[:, 0] * self.image_sizes[:, 1])[:, None]
        return (wh[..., 0] * wh[..., 1] / img).clamp(0, 1) * self.valid


def _as_box_array(b: BoxesLike, index: int) -> np.ndarray:
    if b is None:
        return np.zeros((0, 4), dtype=np.float64)
    if isinstance(b, torch.Tensor):
        b = b.detach().cpu().double().numpy()
    arr = np.asarray(b, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ConfigError(f"boxes[{index}] must have shape (M, 4) as x0, y0, x1, y1; got shape {arr.shape}")
    return arr


def _as_image_size(size: Sequence[float], index: int) -> tuple[float, float]:
    try:
        h, w = (float(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"image_sizes[{index}] must be (height, width), got {size!r}") from None
    if not (math.isfinite(h) and math.isfinite(w) and h > 0 and w > 0):
        raise ConfigError(f"image_sizes[{index}] must be positive (height, width), got {size!r}")
    return h, w


def prepare_boxes(boxes: Sequence[BoxesLike], image_sizes: Sequence[Sequence[float]], clip: bool = True) -> BoxBatch:
    """Validate, clip and pad one list of xyxy boxes per image.

    Boxes reaching outside the image are clipped to it. NaN/inf, inverted and zero-area boxes
    (also those with no area left inside the image) are dropped with a :class:`QPertWarning`.
    ``clip=False`` (``compat="official"``) keeps every finite box as given, in float64, as the
    official code does: its masks slice them with Python's rules, negative indices included.
    A mismatch between the number of box lists and of image sizes raises ``ConfigError``.
    """
    if isinstance(boxes, (np.ndarray, torch.Tensor)) and boxes.ndim == 2:
        raise ConfigError("boxes must be one (M, 4) array per image (a list), not a single 2-D array")
    if len(boxes) != len(image_sizes):
        raise ConfigError(
            f"got {len(boxes)} box lists but {len(image_sizes)} image sizes: give one (M, 4) box array "
            "and one (height, width) per image of the batch"
        )
    sizes = [_as_image_size(s, i) for i, s in enumerate(image_sizes)]
    kept: list[np.ndarray] = []
    for i, (b, (h, w)) in enumerate(zip(boxes, sizes)):
        arr = _as_box_array(b, i)
        finite = np.isfinite(arr).all(axis=1)
        inverted = finite & ((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])) & clip
        clipped = arr.copy()
        if clip:
            clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, w)
            clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, h)
        empty = finite & ~inverted & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])) & clip
        for what, mask in (
            ("non-finite", ~finite),
            ("inverted (x1 < x0 or y1 < y0)", inverted),
            ("zero-area or outside the image", empty),
        ):
            if mask.any():
                warnings.warn(
                    f"image {i}: dropped {int(mask.sum())} {what} box(es): {arr[mask].tolist()}",
                    QPertWarning,
                    stacklevel=3,
                )
        kept.append(clipped[finite & ~inverted & ~empty])
    m = max((len(k) for k in kept), default=0)
    out = torch.zeros(len(kept), m, 4, dtype=torch.float32 if clip else torch.float64)
    valid = torch.zeros(len(kept), m, dtype=torch.bool)
    for i, k in enumerate(kept):
        out[i, : len(k)] = torch.from_numpy(k).to(out.dtype)
        valid[i, : len(k)] = True
    return BoxBatch(out, valid, torch.tensor(sizes, dtype=torch.float32).reshape(-1, 2))


def _overlap_1d(lo: torch.Tensor, hi: torch.Tensor, cells: int, cell: float) -> torch.Tensor:
    """(…, cells) length of [lo, hi] inside each grid cell [j*cell, (j+1)*cell]."""
    edges = torch.arange(cells + 1, dtype=lo.dtype, device=lo.device) * cell
    return (torch.minimum(hi[..., None], edges[1:]) - torch.maximum(lo[..., None], edges[:-1])).clamp_min(0)


def _grid_weights(
    boxes: torch.Tensor, valid: torch.Tensor, image_sizes: torch.Tensor, layout: TokenLayout
) -> torch.Tensor:
    """(B, M, N) coverage of boxes of images that share one fixed layout."""
    boxes = layout.to_input_coords(boxes.double(), image_sizes.double())
    (rows, cols), (ph, pw) = layout.grid, layout.patch
    ox = _overlap_1d(boxes[..., 0], boxes[..., 2], cols, pw) / pw
    oy = _overlap_1d(boxes[..., 1], boxes[..., 3], rows, ph) / ph
    cover = (oy[..., :, None] * ox[..., None, :]).flatten(-2) * valid[..., None]
    b, m = cover.shape[:2]
    out = torch.zeros(b, m, layout.num_tokens, dtype=torch.float32)
    out[..., layout.num_prefix_tokens : layout.num_prefix_tokens + rows * cols] = cover.float()
    return out


def token_weights(
    batch: BoxBatch, layout: Layout, device: Optional[torch.device] = None, *, num_tokens: Optional[int] = None
) -> torch.Tensor:
    """(B, M, N) fraction of each token's patch covered by each box; prefix/suffix tokens get 0.

    A :class:`PerImageLayout` needs ``num_tokens``, the sequence length the images were padded to.
    """
    if isinstance(layout, TokenLayout):
        out = _grid_weights(batch.boxes, batch.valid, batch.image_sizes, layout)
    elif num_tokens is None:
        raise ConfigError("a per-image token layout needs num_tokens, the length of the image-token sequence")
    else:
        out = torch.zeros(len(batch), batch.boxes.shape[1], num_tokens)
        for i, (h, w) in enumerate(batch.image_sizes.round().int().tolist()):
            sl = slice(i, i + 1)
            out[sl] = _grid_weights(
                batch.boxes[sl], batch.valid[sl], batch.image_sizes[sl], layout.for_image(h, w, num_tokens)
            )
    return out if device is None else out.to(device)
