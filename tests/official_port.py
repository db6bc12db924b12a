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

WEIGHT_TYPES = {"area": "NORM_AREA", "inv_area": "NORM_AREA_INV", "centered": "CENTERED_AREA",
                "inv_centered": "CENTERED_AREA_INV", "constant": "CONSTANT"}


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
            mask[int(box[1]): int(box[3]), int(box[0]): int(box[2])] = 1
            x = self.resize(mask.unsqueeze(0).unsqueeze(0))
            x[x > 0] = 1
            k_size = self.kernel.shape[2:]
            x = torch.nn.functional.conv2d(x, self.kernel, stride=self.stride)
            x = x / (k_size[0] * k_size[1])
            cls_token_w = torch.zeros((1))
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


# ---------------------------------------------------------------------------------------------- data
# entities_loader.py, box_loader.py (get_box_info) and data/prepare_coco_entities.py, line by line.
import json  # noqa: E402
import re  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from xml.dom import minidom  # noqa: E402

import numpy as np  # noqa: E402


def read_sentence_file(path: str) -> dict:
    sentence_path = path.replace("Annotations", "Sentences").replace(".xml", ".txt")
    with open(sentence_path, "r") as f:
        sentences = f.readlines()

    def extract_word(s):
        return " ".join(s.split(" ")[1:])[:-1]

    def extract_id(s):
        return s.split("#")[1].split("/")[0]

    words = {}
    for sentence in sentences:
        _words = re.findall(r"\[.*?\]", sentence)
        items = {extract_id(i): extract_word(i) for i in _words}
        for k, v in items.items():
            if words.get(k) is None:
                words[k] = set([v])
            else:
                words[k] |= set([v])
    return {k: list(v) for k, v in words.items()}


def read_annotation_file(xml_path):
    root = ET.parse(xml_path).getroot()
    for _size_info in root.find("size"):
        if _size_info.tag == "width":
            width = int(str(_size_info.text))
        elif _size_info.tag == "height":
            height = int(str(_size_info.text))
    boxes = {}
    for objs in root.findall("object"):
        bndbox = objs.findall("bndbox")
        if len(bndbox) == 0:
            continue
        box_name = ",".join([str(names.text) for names in objs.findall("name")])
        if box_name not in boxes:
            boxes[box_name] = []
        boxes[box_name].append([float(str(bndbox[0].find(n).text)) - 1 for n in ["xmin", "ymin", "xmax", "ymax"]])
    return height, width, boxes


def get_box_info(xml_path) -> BoxInfo:
    try:
        height, width, boxes = read_annotation_file(str(xml_path))
        sentences = read_sentence_file(str(xml_path))
    except FileNotFoundError:
        return BoxInfo(areas=[-1.0], boxes=[], img_size=[0, 0])
    boxes = {k: v for k, v in boxes.items() if any(list(map(sentences.get, k.split(","))))}
    image_area = height * width
    bbox = [j for i in list(boxes.values()) for j in i]
    bbox_area = list(map(lambda x: (x[2] - x[0]) * (x[3] - x[1]) / image_area, bbox))
    if len(bbox_area) == 0:
        bbox_area = [0]
    return BoxInfo(areas=bbox_area, boxes=bbox, img_size=[height, width])


def _prettify(elem) -> str:
    reparsed = minidom.parseString(ET.tostring(elem, "utf-8"))
    pretty = re.sub(r"[\t ]+\n", "", reparsed.toprettyxml(indent="\t"))
    return pretty.replace(">\n\n\t<", ">\n\t<")


def export_captions(image_ann: dict, image_name: str, root) -> dict:
    nouns = []
    for k, v in image_ann.items():
        nouns.extend(v["detections"].keys())
    nouns = list(set(nouns))
    noun2idx = {noun: i for i, noun in enumerate(nouns)}
    captions = []
    for caption, v in image_ann.items():
        nouns = list(v["detections"].keys())
        caption = re.sub(r"\[.*?\]", "", caption)
        for i, noun in enumerate(nouns):
            caption = re.sub(rf"\b{noun}s?\b", f"[/EN#{noun2idx[noun]}/hoge {noun}]", caption)
        captions.append(caption + " .\n")
    with open(root / f"COCO_val2014_{int(image_name):012d}.txt", "w") as f:
        f.writelines(captions)
    return noun2idx


def export_annotations(image_name, img_shapes, image_ann, noun2idx, root) -> None:
    xml = ET.Element("annotation")
    ET.SubElement(xml, "filename").text = f"COCO_val2014_{int(image_name):012d}.jpg"
    size = ET.SubElement(xml, "size")
    ET.SubElement(size, "width").text = str(img_shapes[image_name][0])
    ET.SubElement(size, "height").text = str(img_shapes[image_name][1])
    ET.SubElement(size, "depth").text = "3"
    pushed_boxs = None
    for caption, v in image_ann.items():
        for det_class, boxs in v["detections"].items():
            for box in boxs:
                try:
                    sim = np.abs(pushed_boxs - np.asarray(box[1])).sum(1).min()
                    if sim < 0.1:
                        continue
                except Exception:  # the official code's bare except
                    pass
                _box = box[1]
                obj = ET.SubElement(xml, "object")
                ET.SubElement(obj, "name").text = str(noun2idx[det_class])
                bndbox = ET.SubElement(obj, "bndbox")
                for tag, value in zip(["xmin", "ymin", "xmax", "ymax"], _box):
                    ET.SubElement(bndbox, tag).text = str(value)
                pushed_boxs = np.asarray(_box) if pushed_boxs is None else np.vstack((pushed_boxs, _box))
    with open(root / f"COCO_val2014_{int(image_name):012d}.xml", "w") as f:
        f.write(_prettify(xml))


def prepare_coco_entities(release_json, img_shapes: dict, out_dir, missing_data=()) -> None:
    """The script's main: Sentences/ and Annotations/ for every image, empty ones for ``missing_data``."""
    sentence_root, annotation_root = out_dir / "Sentences", out_dir / "Annotations"
    sentence_root.mkdir(parents=True, exist_ok=True)
    annotation_root.mkdir(parents=True, exist_ok=True)
    data = json.loads(release_json.read_text())
    for image_name, image_ann in data.items():
        noun2idx = export_captions(image_ann, image_name, sentence_root)
        export_annotations(image_name, img_shapes, image_ann, noun2idx, annotation_root)
    for name in missing_data:
        (sentence_root / f"COCO_val2014_{int(name):012d}.txt").write_text("a caption \n")
        export_annotations(name, img_shapes, {}, [], annotation_root)
