"""``qpert.attach(model, config)``: the two-line entry point."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import nn

from .adapters import QPertHandle, attach_sites
from .config import QPertConfig
from .errors import ConfigError
from .models.registry import family_of


def attach(model: nn.Module, config: Optional[QPertConfig] = None, *, exclude: Sequence[str] = ()) -> QPertHandle:
    """Hook Q-Pert into every cross-attention over image tokens of ``model``.

    The model is unchanged until boxes are given with ``handle.objects(...)``; ``handle.detach()``
    (or leaving ``with qpert.attach(...) as handle:``) removes every hook.

    Args:
        model: a model of a registered family (``qpert models``; a subclass of one works too).
        config: the default settings of ``objects`` blocks (default: ``QPertConfig()``).
        exclude: cross-attentions to leave alone: a site's name or a prefix of it (e.g.
            ``"clip_projector"`` for InternVL-G's attention pooling); ``handle.site_names`` lists them.

    Returns:
        The :class:`~qpert.adapters.QPertHandle`.

    Raises:
        UnsupportedModelError: no registered family supports the model.
        ConfigError: an ``exclude`` name that matches no site.
        UsageError: Q-Pert is already attached to this model.
    """
    family = family_of(model)
    sites = family.sites(model)
    names = [site.name for site in sites]
    for prefix in exclude:
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            raise ConfigError(f"no cross-attention of this model is named {prefix!r}; its sites are {names}")
    kept = [site for site in sites if not any(site.name == p or site.name.startswith(p + ".") for p in exclude)]
    return attach_sites(model, config or QPertConfig(), kept, family.token_layout(model), family.key_tokens)
