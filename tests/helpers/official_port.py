"""A plain port of the official Q-Pert code (NEC-N-SOGI/query-perturbation, commit c6e0294) onto
Hugging Face's BLIP-2 Q-Former, as an independent reference for ``compat="official"``.

It follows ``base_qpert.py`` (``get_key_weight``, ``roi_pooling``, ``pca``, ``get_projection_mat``,
``get_n_pc``), ``weight.py`` (``AreaBasedWeight``) and ``qpert_proj.py`` (``QueryProjection.proj``)
line by line, on the CPU instead of CUDA, with one change: each eigenvector's sign is made
canonical (entry of largest magnitude positive) after ``eigh``, the fix qpert documents. Shares no
code with qpert. Where the official code patches LAVIS's attention forward, this port hooks the
``query`` linear of HF's cross-attention modules (the keys are the same: ``key(image tokens)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import Resize

WEIGHT_TYPES = {
    "area": "NORM_AREA",
    "inv_area": "NORM_AREA_INV",
    "centered": "CENTERED_AREA",
    "inv_centered": "CENTERED_AREA_INV",
    "constant": "CONSTANT",
}


@dataclass
class BoxInfo:
    areas: list
    boxes: list
    img_size: list  # [height, width]


def box_info(boxes, height, width) -> BoxInfo:
    areas = [(b[2] - b[0]) * (b[3] - b[1]) / (height * width) for b in boxes]
    return BoxInfo(areas=areas or [0], boxes=[list(b) for b in boxes], img_size=[height, width])


def area_weight(box: BoxInfo, scale: float, weight_type: str) -> torch.Tensor:
    """``AreaBasedWeight.__call__`` for one layer: (#obj,)."""
    kind = WEIGHT_TYPES[weight_type]
    area_sign = 1 if kind in ("NORM_AREA", "CENTERED_AREA") else -1
    center = 0 if kind in ("NORM_AREA", "NORM_AREA_INV") else 0.5
    weight = torch.zeros(len(box.areas))
    for i, area in enumerate(box.areas):
        if kind == "CONSTANT":
            weight[i] = scale
        else:
            weight[i] = scale * (area_sign * area + (-1 * area_sign) * center)
    return weight


class OfficialPort:
    def __init__(self, model, boxes: list[BoxInfo], alpha: float, weight_type: str, n_pc, do_normalize=False):
        vc = model.config.vision_config
        self.resize = Resize((vc.image_size, vc.image_size), antialias=False)
        self.kernel = torch.ones((vc.patch_size, vc.patch_size)).unsqueeze(0).unsqueeze(0)
        self.stride = vc.patch_size
        self.boxes, self.alpha, self.weight_type, self.n_pc = boxes, alpha, weight_type, n_pc
        self.do_normalize = do_normalize
        self.handles = []
        for layer in model.qformer.encoder.layer:
            if layer.has_cross_attention:
                self._hook(layer.crossattention.attention)

    def get_key_weight(self, boxs: BoxInfo):
        weights = []
        img_size = boxs.img_size
        for box in boxs.boxes:
            mask = torch.zeros(img_size)
            mask[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])] = 1
            x = self.resize(mask.unsqueeze(0).unsqueeze(0))
            x[x > 0] = 1
            k_size = self.kernel.shape[2:]
            x = torch.nn.functional.conv2d(x, self.kernel, stride=self.stride)
            x = x / (k_size[0] * k_size[1])
            cls_token_w = torch.zeros(1)
            weights.append(torch.cat([cls_token_w, x.flatten(2).squeeze()], 0))
        if len(weights) > 0:
            return torch.stack(weights, 0)
        return None

    def get_n_pc(self, eig_val):
        n_pc = self.n_pc
        ev_sel = (eig_val.cumsum(-1) / eig_val.sum(-1, keepdim=True)) < n_pc
        one_dim = torch.zeros_like(ev_sel)
        if n_pc < 1:
            one_dim[..., 0] = True
            return ev_sel | one_dim
        one_dim[..., :n_pc] = True
        return one_dim

    def pca(self, feats, box: BoxInfo):
        _feats = feats.float()
        auto_corr = _feats.transpose(-2, -1) @ _feats
        d, v = torch.linalg.eigh(auto_corr)
        eig_val, eig_vec = torch.flip(d, [-1]), torch.flip(v, [-1])
        # the one change: deterministic signs (largest-magnitude entry of each eigenvector positive)
        pivot = eig_vec.abs().argmax(dim=-2, keepdim=True)
        eig_vec = eig_vec * torch.where(torch.gather(eig_vec, -2, pivot) < 0, -1.0, 1.0)
        ev_sel = self.get_n_pc(eig_val)
        _vec = eig_vec.clone()
        _vec[~ev_sel] = 0
        p_mat = _vec.transpose(-1, -2) @ _vec
        weight = area_weight(box, self.alpha, self.weight_type)
        for _ in range(len(p_mat.shape) - len(weight.shape)):
            weight = weight.unsqueeze(-1)
        return p_mat * weight

    def _hook(self, attn):
        seen = {}

        def pre(_m, _args, kwargs):
            seen["tokens"] = kwargs["encoder_hidden_states"]

        def post(_m, _inputs, out):
            heads, dim = attn.num_attention_heads, attn.attention_head_size
            tokens = seen["tokens"]
            keys = attn.key(tokens).view(*tokens.shape[:2], heads, dim).permute(0, 2, 1, 3)  # (B, H, N, d)
            queries = out.view(*out.shape[:2], heads, dim).permute(0, 2, 1, 3).clone()  # (B, H, T, d)
            if self.do_normalize:
                norm = torch.norm(queries, dim=-1, keepdim=True)
            for i, box in enumerate(self.boxes):
                key_weight = self.get_key_weight(box)
                if key_weight is None:
                    continue
                pooled = keys[i] * key_weight[:, None, :, None]  # (#obj, H, N, d): keys * m
                p = self.pca(pooled, box).mean(0)
                projected = queries[i] @ p
                queries[i] = queries[i] + projected.masked_fill(torch.isnan(projected), 0)
            if self.do_normalize:
                queries = norm * torch.nn.functional.normalize(queries, dim=-1)
            return queries.permute(0, 2, 1, 3).reshape(out.shape)

        self.handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.query.register_forward_hook(post)]

    def remove(self):
        for h in self.handles:
            h.remove()
