"""The attach/detach handle: turns boxes into subspaces and feeds them to the hooked layers."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from ..config import QPertConfig
from ..core import BoxBatch, Layout, Subspaces, TokenLayout, compute_subspaces, perturb_queries, perturbation_matrix
from ..core.geometry import BoxesLike, prepare_boxes, token_weights
from ..core.official import official_token_weights
from ..errors import ConfigError, UsageError
from .site import CrossAttentionSite, KeyTokens, same_tokens

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, QPertHandle] = weakref.WeakKeyDictionary()

#: Images per chunk when keys of all layers are materialized to build subspaces.
IMAGES_PER_CHUNK = 16


class _Precomputed:
    """``objects(subspaces=...)``: operators computed beforehand, moved to the tokens' device once.

    Whether any image is active is read once per block on a CPU; on a GPU it is not read at all
    (that would stall its queue once per pass), which is exact: inactive rows come back unchanged.
    """

    def __init__(self, handle: QPertHandle, subspaces: Subspaces):
        self.handle, self.subspaces = handle, subspaces
        self.any_active: Optional[bool] = None

    def for_pass(self, tokens: torch.Tensor) -> Optional[Subspaces]:
        self.handle._check_batch(tokens, len(self.subspaces))
        if self.subspaces.active.device != tokens.device:
            self.subspaces = self.subspaces.to(tokens.device)
        if self.any_active is None:
            self.any_active = tokens.device.type != "cpu" or bool(self.subspaces.active.any())
        return self.subspaces if self.any_active else None


class _OnTheFly:
    """``objects(boxes, image_sizes)``: operators computed from the image tokens of each pass.

    The first hooked layer of a forward pass computes them for every layer at once; the others
    reuse them. A pass is the image-token tensor: when a layer sees another one, a new pass has
    begun and the operators are computed again.
    """

    def __init__(self, handle: QPertHandle, boxes: BoxBatch, config: QPertConfig):
        self.handle, self.boxes, self.config = handle, boxes, config
        self.source: Optional[torch.Tensor] = None
        self.current: Optional[Subspaces] = None

    def for_pass(self, tokens: torch.Tensor) -> Optional[Subspaces]:
        if self.source is not tokens:
            self.handle._check_batch(tokens, len(self.boxes))
            self.source = tokens
            subspaces = self.handle._subspaces(tokens, self.boxes, self.config)
            self.current = subspaces if bool(subspaces.active.any()) else None
        return self.current


class QPertHandle:
    """Q-Pert attached to one model. Inactive (bit-identical model) outside ``objects(...)``.

    Also a context manager: ``with qpert.attach(model, config) as handle: ...`` detaches on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        config: QPertConfig,
        sites: Sequence[CrossAttentionSite],
        layout: Layout,
        key_tokens: KeyTokens = same_tokens,
    ):
        self.model = model
        self.config = config
        self.sites = list(sites)
        self.layout = layout
        self._key_tokens = key_tokens
        self._block: Optional[tuple[_Precomputed | _OnTheFly, QPertConfig]] = None
        self._current: Optional[Subspaces] = None  # what the layers of the running pass perturb with
        self._hooks: list[RemovableHandle] = []
        geometry: dict[tuple[int, int], list[int]] = {}
        for index, site in enumerate(self.sites):
            geometry.setdefault((site.num_heads, site.head_dim), []).append(index)
        self._layer_groups = list(geometry.values())  # layers whose keys stack into one (B, L, H, N, d) tensor
        for index, site in enumerate(self.sites):
            self._hooks += site.install(self._on_image_tokens, self._query_hook(index))

    def __enter__(self) -> QPertHandle:
        return self

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    # ----------------------------------------------------------------------------------- public
    @property
    def num_layers(self) -> int:
        return len(self.sites)

    @property
    def site_names(self) -> list[str]:
        return [site.name for site in self.sites]

    @contextmanager
    def objects(
        self,
        boxes: Optional[Sequence[BoxesLike]] = None,
        image_sizes: Optional[Sequence[Sequence[float]]] = None,
        *,
        subspaces: Optional[Subspaces] = None,
        config: Optional[QPertConfig] = None,
    ) -> Iterator[QPertHandle]:
        """Perturb every forward pass inside the block with these objects.

        Args:
            boxes: one (M_i, 4) array of ``x0, y0, x1, y1`` boxes in original-image pixels per image of
                the batch (subspaces are then computed from each pass's image tokens), with
            image_sizes: one (height, width) per image; or instead
            subspaces: operators from :meth:`compute_subspaces`, e.g. ``.select(pair_image_index)`` for a
                batch of (image, text) pairs.
            config: the settings of this block (default: the handle's). Precomputed subspaces must have
                been built with its rank rule, compat and projector.

        Raises:
            ConfigError: both or neither of boxes and subspaces, subspaces of another model or recipe, or
                (at the forward pass) a batch of another size.
            UsageError: nested blocks, or a detached handle.
        """
        if self._hooks == []:
            raise UsageError("this Q-Pert handle was detached; call qpert.attach(model, config) again")
        if self._block is not None:
            raise UsageError("objects(...) blocks cannot be nested")
        if (subspaces is None) == (boxes is None):
            raise ConfigError("give either boxes (with image_sizes) or subspaces")
        config = config or self.config
        if boxes is not None:
            if image_sizes is None:
                raise ConfigError("image_sizes (one (height, width) per image) are needed with boxes")
            batch = prepare_boxes(boxes, image_sizes, clip=config.compat != "official")
            strategy: _Precomputed | _OnTheFly = _OnTheFly(self, batch, config)
        else:
            self._check_subspaces(subspaces, config)
            strategy = _Precomputed(self, subspaces)
        self._block = (strategy, config)
        try:
            yield self
        finally:
            self._block, self._current = None, None

    def compute_subspaces(
        self,
        image_tokens: torch.Tensor,
        boxes: Sequence[BoxesLike],
        image_sizes: Sequence[Sequence[float]],
        config: Optional[QPertConfig] = None,
    ) -> Subspaces:
        """Subspaces of a batch of images, to reuse for every text they are matched with.

        Args:
            image_tokens: (B, N, C) the family's image tokens, as its ``image_tokens`` retrieval function
                (or the vision encoder) returns them; the family's own key transform (e.g. CoCa's
                LayerNorm before its pooler) is applied here.
            boxes, image_sizes: as for :meth:`objects`.
            config: the recipe (rank rule, compat, projector; default: the handle's config). One set
                of subspaces serves every alpha, weight function, ``keep_norm`` and ``mode``.

        Returns:
            :class:`~qpert.core.Subspaces` with one row per image.

        Raises:
            ConfigError: boxes for another number of images, or tokens of another layout.
        """
        config = config or self.config
        batch = prepare_boxes(boxes, image_sizes, clip=config.compat != "official")
        self._check_batch(image_tokens, len(batch))
        return self._subspaces(self._key_tokens(self.model, image_tokens), batch, config)

    def detach(self) -> None:
        """Remove every hook: the model is exactly as before ``attach``."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        _ATTACHED.pop(self.model, None)

    # ----------------------------------------------------------------------------------- internals
    def _check_subspaces(self, subspaces: Subspaces, config: QPertConfig) -> None:
        theirs = [tuple(t.shape[1:3]) for t in subspaces.mean_projector]
        ours = [(site.num_heads, site.head_dim) for site in self.sites]
        if theirs != ours:
            raise ConfigError(
                f"these subspaces are for {len(theirs)} layers of (heads, dims) {sorted(set(theirs))}, "
                f"the model has {len(ours)} of {sorted(set(ours))}"
            )
        wanted = (config.threshold, config.rank, config.compat, config.projector)
        if subspaces.recipe() != wanted:
            raise ConfigError(
                f"subspaces were built with (threshold, rank, compat, projector) {subspaces.recipe()}; "
                f"the config asks for {wanted}: recompute them"
            )

    def _check_batch(self, image_tokens: torch.Tensor, batch_size: int) -> None:
        if image_tokens.shape[0] != batch_size:
            raise ConfigError(
                f"Q-Pert got objects for {batch_size} images but the model's batch has "
                f"{image_tokens.shape[0]}: give one box list per image in the batch"
            )
        if isinstance(self.layout, TokenLayout) and image_tokens.shape[1] != self.layout.num_tokens:
            raise ConfigError(
                f"the cross-attention sees {image_tokens.shape[1]} image tokens, the token layout "
                f"expects {self.layout.num_tokens} (grid {self.layout.grid}); were the images "
                "preprocessed to the model's own input size?"
            )

    def _keys(self, image_tokens: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """(B, L, H, N, d) float32 keys of the attached ``layers`` (which share H and d)."""
        keys = []
        for site in (self.sites[i] for i in layers):
            weight, bias = site.key_projection()
            inputs = site.key_inputs(image_tokens)
            k = F.linear(inputs.to(weight.device).float(), weight.float(), None if bias is None else bias.float())
            keys.append(k.view(*k.shape[:2], site.num_heads, site.head_dim).transpose(1, 2))
        return torch.stack(keys, dim=1)

    def _subspaces(self, image_tokens: torch.Tensor, batch: BoxBatch, config: QPertConfig) -> Subspaces:
        """Subspaces from the tokens the sites read (the family's key transform already applied)."""
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
                group = compute_subspaces(keys, weights[sl][..., covered], areas[sl], batch.valid[sl], config)
                for position, layer in enumerate(layers):
                    mean[layer], area[layer] = group.mean_projector[position], group.area_projector[position]
            parts.append(Subspaces(tuple(mean), tuple(area), group.active, *group.recipe()))
        return Subspaces.cat(parts)

    def _on_image_tokens(self, tokens: torch.Tensor) -> bool:
        """A site is about to read ``tokens``: choose the operators its queries get (None: leave it)."""
        block = self._block
        self._current = block[0].for_pass(tokens) if block is not None and block[1].enabled else None
        return self._current is not None

    def _query_hook(self, layer: int):
        def on_queries(queries: torch.Tensor) -> torch.Tensor:
            subs, config = self._current, self._block[1]
            matrix = perturbation_matrix(subs.mean_projector[layer], subs.area_projector[layer], config)
            return perturb_queries(queries, matrix, subs.active, config.keep_norm)

        return on_queries


def attach_sites(
    model: nn.Module,
    config: QPertConfig,
    sites: Sequence[CrossAttentionSite],
    layout: Layout,
    key_tokens: KeyTokens = same_tokens,
) -> QPertHandle:
    """Hook Q-Pert into the given cross-attention ``sites`` of any model: the escape hatch for models no
    registered family covers.

    Args:
        model: the model the sites belong to (one handle per model at a time).
        config: the default settings of ``objects`` blocks.
        sites: :class:`~qpert.adapters.CrossAttentionSite` objects, e.g. from
            ``qpert.adapters.find_bert_cross_attentions(model.qformer)``.
        layout: where the image tokens sit on the patch grid (:class:`~qpert.core.TokenLayout`).
        key_tokens: what ``compute_subspaces``' image tokens become before the sites read them.

    Returns:
        The :class:`QPertHandle`.

    Raises:
        ConfigError: no sites.
        UsageError: Q-Pert is already attached to this model.
    """
    if model in _ATTACHED:
        raise UsageError("Q-Pert is already attached to this model; call detach() on the existing handle first")
    if not sites:
        raise ConfigError("no cross-attention over image tokens was found in this model")
    handle = QPertHandle(model, config, sites, layout, key_tokens)
    _ATTACHED[model] = handle
    return handle
