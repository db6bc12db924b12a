"""The attach/detach handle: turns boxes into subspaces and feeds them to the hooked layers."""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from ..config import QPertConfig
from ..core import BoxBatch, Layout, Subspaces, TokenLayout, compute_subspaces, perturb_queries, perturbation_matrix
from ..core.boxes import BoxesLike, prepare_boxes, token_weights
from ..core.official import official_token_weights

_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, QPertHandle]" = weakref.WeakKeyDictionary()

#: Images per chunk when keys of all layers are materialized to build subspaces.
IMAGES_PER_CHUNK = 16


class CrossAttentionSite(Protocol):
    """A hooked cross-attention. A site whose key projection reads transformed image tokens
    (QLLaMA normalizes them per layer) also has ``key_inputs(tokens) -> tokens``."""

    name: str
    num_heads: int
    head_dim: int

    def key_projection(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def install(self, on_image_tokens, on_queries) -> list[RemovableHandle]: ...


@dataclass
class _Objects:
    """What the current ``objects(...)`` block perturbs with."""

    boxes: Optional[BoxBatch]
    subspaces: Optional[Subspaces]
    source: Optional[torch.Tensor] = None  # image tokens the on-the-fly subspaces were built from
    current: Optional[Subspaces] = None
    any_active: Optional[bool] = None      # set once per block (or pass), never per layer; see _image_tokens_hook


class QPertHandle:
    """Q-Pert attached to one model. Inactive (bit-identical model) outside ``objects(...)``."""

    def __init__(self, model: nn.Module, config: QPertConfig, sites: Sequence[CrossAttentionSite], layout: Layout):
        self.model = model
        self.config = config
        self.sites = list(sites)
        self.layout = layout
        self._objects: Optional[_Objects] = None
        self._hooks: list[RemovableHandle] = []
        geometry: dict[tuple[int, int], list[int]] = {}
        for index, site in enumerate(self.sites):
            geometry.setdefault((site.num_heads, site.head_dim), []).append(index)
        self._layer_groups = list(geometry.values())  # layers whose keys stack into one (B, L, H, N, d) tensor
        for index, site in enumerate(self.sites):
            self._hooks += site.install(self._image_tokens_hook(), self._query_hook(index))

    # ----------------------------------------------------------------------------------- public
    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @contextmanager
    def objects(self, boxes: Optional[Sequence[BoxesLike]] = None,
                image_sizes: Optional[Sequence[Sequence[float]]] = None, *,
                subspaces: Optional[Subspaces] = None) -> Iterator["QPertHandle"]:
        """Perturb every forward pass inside the block with these objects.

        Either ``boxes`` (one (M_i, 4) xyxy array per image, original pixels) with
        ``image_sizes`` (one (height, width) per image), or precomputed ``subspaces``
        (from :meth:`compute_subspaces`, e.g. ``.select(pair_image_index)`` for ITM batches).
        """
        if self._hooks == []:
            raise RuntimeError("this Q-Pert handle was detached; call qpert.attach(model, config) again")
        if self._objects is not None:
            raise RuntimeError("objects(...) blocks cannot be nested")
        if (subspaces is None) == (boxes is None):
            raise ValueError("give either boxes (with image_sizes) or subspaces")
        if boxes is not None:
            if image_sizes is None:
                raise ValueError("image_sizes (one (height, width) per image) are needed with boxes")
            batch, subs = prepare_boxes(boxes, image_sizes), None
        else:
            self._check_subspaces(subspaces)
            batch, subs = None, subspaces
        self._objects = _Objects(batch, subs)
        try:
            yield self
        finally:
            self._objects = None

    def compute_subspaces(self, image_tokens: torch.Tensor, boxes: Sequence[BoxesLike],
                          image_sizes: Sequence[Sequence[float]]) -> Subspaces:
        """Subspaces of a batch of images from their vision-encoder tokens (B, N, C).

        They depend only on the image and its boxes: compute once, reuse for every text.
        """
        batch = prepare_boxes(boxes, image_sizes)
        self._check_batch(image_tokens, len(batch))
        return self._subspaces(image_tokens, batch)

    def detach(self) -> None:
        """Remove every hook: the model is exactly as before ``attach``."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        _ATTACHED.pop(self.model, None)

    # ----------------------------------------------------------------------------------- internals
    def _check_subspaces(self, subspaces: Subspaces) -> None:
        theirs = [tuple(t.shape[1:3]) for t in subspaces.mean_projector]
        ours = [(site.num_heads, site.head_dim) for site in self.sites]
        if theirs != ours:
            raise ValueError(f"these subspaces are for {len(theirs)} layers of (heads, dims) {sorted(set(theirs))}, "
                             f"the model has {len(ours)} of {sorted(set(ours))}")
        config = self.config
        if subspaces.recipe() != (config.threshold, isinstance(config.threshold, int), config.compat, config.projector):
            raise ValueError(f"subspaces were built with threshold {subspaces.threshold}, compat {subspaces.compat!r}, "
                             f"projector {subspaces.projector!r}; the config has {config.threshold}, "
                             f"{config.compat!r}, {config.projector!r}: recompute them")

    def _check_batch(self, image_tokens: torch.Tensor, batch_size: int) -> None:
        if image_tokens.shape[0] != batch_size:
            raise ValueError(f"Q-Pert got objects for {batch_size} images but the model's batch has "
                             f"{image_tokens.shape[0]}: give one box list per image in the batch")
        if isinstance(self.layout, TokenLayout) and image_tokens.shape[1] != self.layout.num_tokens:
            raise ValueError(f"the cross-attention sees {image_tokens.shape[1]} image tokens, the token layout "
                             f"expects {self.layout.num_tokens} (grid {self.layout.grid}); were the images "
                             "preprocessed to the model's own input size?")

    def _keys(self, image_tokens: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """(B, L, H, N, d) float32 keys of the attached ``layers`` (which share H and d)."""
        keys = []
        for site in (self.sites[i] for i in layers):
            weight, bias = site.key_projection()
            inputs = site.key_inputs(image_tokens) if hasattr(site, "key_inputs") else image_tokens
            k = F.linear(inputs.to(weight.device).float(), weight.float(), None if bias is None else bias.float())
            keys.append(k.view(*k.shape[:2], site.num_heads, site.head_dim).transpose(1, 2))
        return torch.stack(keys, dim=1)

    def _subspaces(self, image_tokens: torch.Tensor, batch: BoxBatch) -> Subspaces:
        config = self.config
        weigh = official_token_weights if config.compat == "official" else token_weights
        weights = weigh(batch, self.layout, num_tokens=image_tokens.shape[1])
        areas = batch.areas
        parts = []
        for s in range(0, max(1, len(batch)), IMAGES_PER_CHUNK):
            sl = slice(s, s + IMAGES_PER_CHUNK)
            covered = weights[sl].sum((0, 1)) > 0  # keys of other tokens are never used
            covered[0] |= not covered.any()  # objects covering nothing (kept by compat="official") need one key
            mean: list[torch.Tensor] = [torch.empty(0)] * self.num_layers
            area = list(mean)
            for layers in self._layer_groups:
                keys = self._keys(image_tokens[sl][:, covered.to(image_tokens.device)], layers)
                group = compute_subspaces(keys, weights[sl][..., covered], areas[sl], batch.valid[sl],
                                          config.threshold, projector=config.projector, compat=config.compat)
                for position, layer in enumerate(layers):
                    mean[layer], area[layer] = group.mean_projector[position], group.area_projector[position]
            parts.append(Subspaces(tuple(mean), tuple(area), group.active, group.threshold, group.compat,
                                   group.projector))
        return Subspaces.cat(parts)

    def _image_tokens_hook(self):
        def on_image_tokens(tokens: torch.Tensor) -> bool:
            state = self._objects
            if state is None or not self.config.enabled:
                return False
            if state.subspaces is not None:
                self._check_batch(tokens, len(state.subspaces))
                if state.subspaces.active.device != tokens.device:
                    state.subspaces = state.subspaces.to(tokens.device)
                if state.any_active is None:  # on a GPU, reading the flags would stall its queue once per pass;
                    # perturbing anyway is exact, since rows of inactive images come back bit-identical
                    state.any_active = tokens.device.type != "cpu" or bool(state.subspaces.active.any())
                return state.any_active
            if state.source is not tokens:  # first cross-attention of this pass: all layers at once
                self._check_batch(tokens, len(state.boxes))
                state.source = tokens
                state.current = self._subspaces(tokens, state.boxes)
                state.any_active = bool(state.current.active.any())
            return state.any_active
        return on_image_tokens

    def _query_hook(self, layer: int):
        def on_queries(queries: torch.Tensor) -> torch.Tensor:
            state = self._objects
            subs = state.subspaces if state.subspaces is not None else state.current
            matrix = perturbation_matrix(subs.mean_projector[layer], subs.area_projector[layer], self.config)
            return perturb_queries(queries, matrix, subs.active, self.config.keep_norm)
        return on_queries


def attach_sites(model: nn.Module, config: QPertConfig, sites: Sequence[CrossAttentionSite],
                 layout: Layout) -> QPertHandle:
    """Hook ``sites`` of ``model``; one handle per model at a time."""
    if model in _ATTACHED:
        raise RuntimeError("Q-Pert is already attached to this model; call detach() on the existing handle first")
    if not sites:
        raise ValueError("no cross-attention over image tokens was found in this model")
    handle = QPertHandle(model, config, sites, layout)
    _ATTACHED[model] = handle
    return handle
