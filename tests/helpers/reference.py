"""A deliberately plain reference of DESIGN.md §1: loops over images, objects, heads; numpy eigh.

It shares no code with qpert: token coverage by looping over patches, one eigen-decomposition
per object and head in float64, and the perturbation summed object by object.
"""

from __future__ import annotations

import numpy as np
import torch


def weight_fn(name: str, alpha: float, a: float) -> float:
    return {
        "constant": alpha,
        "area": alpha * a,
        "inv_area": alpha * (1 - a),
        "centered": alpha * (a - 0.5),
        "inv_centered": alpha * (0.5 - a),
    }[name]


def coverage(box, image_hw, input_hw, grid, patch, prefix=1):
    """Token weights of one box for a stretch-resized image: loop over every patch."""
    h, w = image_hw
    x0, y0, x1, y1 = np.clip(box[0], 0, w), np.clip(box[1], 0, h), np.clip(box[2], 0, w), np.clip(box[3], 0, h)
    sx, sy = input_hw[1] / w, input_hw[0] / h
    x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
    return grid_coverage(x0, y0, x1, y1, grid, patch, prefix), (x1 - x0) * (y1 - y0) / (sx * sy) / (h * w)


def grid_coverage(x0, y0, x1, y1, grid, patch, prefix):
    """Fraction of every patch inside a box given in model-input pixels, one patch at a time."""
    out = np.zeros(prefix + grid * grid)
    for r in range(grid):
        for c in range(grid):
            ix = max(0.0, min(x1, (c + 1) * patch) - max(x0, c * patch))
            iy = max(0.0, min(y1, (r + 1) * patch) - max(y0, r * patch))
            out[prefix + r * grid + c] = ix * iy / (patch * patch)
    return out


def projector(keys: np.ndarray, m: np.ndarray, threshold: float, rank=None) -> np.ndarray:
    """keys (N, d), token weights m (N,) -> P onto the object's K-subspace (``rank`` fixed, or by ``threshold``)."""
    kt = m[:, None] * keys
    c = kt.T @ kt
    lam, u = np.linalg.eigh(c)
    lam, u = np.clip(lam[::-1], 0, None), u[:, ::-1]
    if lam[0] <= 0:
        return np.zeros_like(c)
    nonzero = int((lam > lam[0] * 1e-5).sum())
    if rank is not None:
        r = rank
    else:
        ratios = np.cumsum(lam) / lam.sum()
        r = max(1, int((ratios < threshold).sum()))
    r = min(r, nonzero)
    return u[:, :r] @ u[:, :r].T


def perturb(q: np.ndarray, keys: np.ndarray, objects, cfg) -> np.ndarray:
    """q (T, H, d), keys (N, H, d), objects [(token weights, area)] -> perturbed q."""
    kept = [(m, a) for m, a in objects if m.sum() > 0]
    if not kept or cfg["alpha"] == 0:
        return q
    out = q.copy()
    for h in range(q.shape[1]):
        delta = np.zeros_like(q[:, h])
        for m, a in kept:
            p = projector(keys[:, h], m, cfg.get("threshold", 0.99), cfg.get("rank"))
            w = -1.0 if cfg["mode"] == "orthogonal" else weight_fn(cfg["weight"], cfg["alpha"], a)
            delta += w * (q[:, h] @ p.T)
        out[:, h] = q[:, h] + delta / len(kept)
        if cfg["keep_norm"]:
            for t in range(q.shape[0]):
                out[t, h] *= np.linalg.norm(q[t, h]) / np.linalg.norm(out[t, h])
    return out


class ReferenceQPert:
    """Hooks the reference into a BLIP-2 Q-Former, found independently of qpert's adapter."""

    def __init__(self, model, cfg: dict, boxes, image_sizes):
        vc = model.config.vision_config
        self.grid, self.patch = vc.image_size // vc.patch_size, vc.patch_size
        self.cfg = cfg
        self.objects = [
            [coverage(np.asarray(b, float), hw, (vc.image_size, vc.image_size), self.grid, self.patch) for b in img]
            for img, hw in zip(boxes, image_sizes)
        ]
        self.handles = []
        for layer in model.qformer.encoder.layer:
            if layer.has_cross_attention:
                self._hook(layer.crossattention.attention)

    def _hook(self, attn):
        seen = {}

        def pre(_m, _args, kwargs):
            seen["tokens"] = kwargs["encoder_hidden_states"]

        def post(_m, _inputs, out):
            heads, d = attn.num_attention_heads, attn.attention_head_size
            keys = attn.key(seen["tokens"]).double().numpy().reshape(*seen["tokens"].shape[:2], heads, d)
            q = out.double().numpy().reshape(*out.shape[:2], heads, d)
            new = np.stack([perturb(q[b], keys[b], self.objects[b], self.cfg) for b in range(q.shape[0])])
            return torch.from_numpy(new.reshape(out.shape)).to(out.dtype)

        self.handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.query.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()
