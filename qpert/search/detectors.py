"""Boxes from an object detector, for photos that come without annotations.

A detector spec names where the detector comes from:

* ``torchvision:fasterrcnn_resnet50_fpn_v2`` (any detection model of ``torchvision.models``,
  with its default COCO weights, downloaded by torchvision);
* ``hf:facebook/detr-resnet-50`` (any ``AutoModelForObjectDetection`` checkpoint: DETR,
  Conditional/Deformable DETR, RT-DETR, YOLOS, ...), or a local folder saved with ``save_pretrained``;
* ``hf:google/owlv2-base-patch16-ensemble`` (OWLv2 / OWL-ViT): open vocabulary, it finds what
  ``DetectorOptions.prompts`` names ("a person", "a red kite", ...);
* a local folder holding ``detector.json`` + ``model.safetensors``: a torchvision architecture with
  weights of your own (what :func:`save_torchvision_detector` writes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..models.checkpoints import tensor_only_pickles

TORCHVISION_CONFIG = "detector.json"
#: transformers model types that detect what a text prompt names.
OPEN_VOCABULARY = ("owlv2", "owlvit")
TORCHVISION_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class DetectorOptions:
    """What is kept of a detector's output; part of the index's identity."""

    score_threshold: float = 0.5
    max_boxes: int = 10
    classes: tuple[str, ...] = ()  # keep only these labels (empty: all)
    prompts: tuple[str, ...] = ()  # what an open-vocabulary detector (OWLv2, OWL-ViT) looks for

    def __post_init__(self) -> None:
        if not 0 <= self.score_threshold <= 1:
            raise ConfigError(f"the detector score threshold is a probability in [0, 1], got {self.score_threshold}")
        if self.max_boxes < 1:
            raise ConfigError(f"max boxes must be at least 1, got {self.max_boxes}")


@dataclass
class Detections:
    """Boxes of one image: (M, 4) xyxy in the image's pixels, best first."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": lab}
            for b, s, lab in zip(self.boxes, self.scores, self.labels)
        ]

    @classmethod
    def from_json(cls, rows: Sequence[dict[str, Any]]) -> Detections:
        return cls(
            np.array([r["box"] for r in rows], dtype=np.float32).reshape(-1, 4),
            np.array([r["score"] for r in rows], dtype=np.float32),
            [r["label"] for r in rows],
        )


class Detector(Protocol):
    spec: str
    input_side: int  # the longest image side it reads: photos need not be decoded larger

    def detect(self, images: Sequence[Image.Image]) -> list[Detections]: ...


def processor_side(processor: Any, default: int = 1333) -> int:
    """The longest side an image processor resizes to (its ``size``), or ``default`` when it does not say."""
    size = getattr(getattr(processor, "image_processor", processor), "size", None) or {}
    keys = ("longest_edge", "height", "width", "shortest_edge", "max_height", "max_width")
    sides = [size.get(k) for k in keys] if hasattr(size, "get") else []
    return max((int(v) for v in sides if v), default=default)


def keep(
    boxes: torch.Tensor, scores: torch.Tensor, labels: Sequence[str], options: DetectorOptions, size: tuple[int, int]
) -> Detections:
    """Clip to the image (``size`` = height, width), threshold, filter classes, keep the best
    ``max_boxes``; boxes with no area inside the image never leave the detector."""
    boxes, scores = boxes.detach().float().cpu(), scores.detach().float().cpu()
    boxes = torch.stack(
        [
            boxes[:, 0].clamp(0, size[1]),
            boxes[:, 1].clamp(0, size[0]),
            boxes[:, 2].clamp(0, size[1]),
            boxes[:, 3].clamp(0, size[0]),
        ],
        dim=1,
    )
    wanted = set(options.classes)
    ok = [
        i
        for i in range(len(scores))
        if scores[i] >= options.score_threshold
        and (not wanted or labels[i] in wanted)
        and bool((boxes[i, 2:] > boxes[i, :2]).all())
    ]
    ok = sorted(ok, key=lambda i: -float(scores[i]))[: options.max_boxes]
    return Detections(boxes[ok].numpy().reshape(-1, 4), scores[ok].numpy(), [labels[i] for i in ok])


class TorchvisionDetector:
    """A ``torchvision.models.detection`` model (Faster R-CNN, RetinaNet, FCOS, SSD, ...)."""

    def __init__(
        self,
        model: torch.nn.Module,
        categories: Sequence[str],
        spec: str,
        options: DetectorOptions,
        device: torch.device,
    ):
        self.model, self.categories, self.spec, self.options, self.device = (
            model.eval().to(device),
            list(categories),
            spec,
            options,
            device,
        )

    @property
    def input_side(self) -> int:
        transform = self.model.transform
        return max(transform.max_size, *transform.min_size)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[Detections]:
        from torchvision.transforms.functional import pil_to_tensor

        batch = [pil_to_tensor(im.convert("RGB")).to(self.device, torch.float32) / 255 for im in images]
        outputs = self.model(batch)
        return [
            keep(
                o["boxes"], o["scores"], [self._label(int(i)) for i in o["labels"]], self.options, (im.height, im.width)
            )
            for o, im in zip(outputs, images)
        ]

    def _label(self, index: int) -> str:
        return self.categories[index] if 0 <= index < len(self.categories) else str(index)


class TransformersDetector:
    """An ``AutoModelForObjectDetection`` with its image processor's own post-processing."""

    def __init__(
        self, model: torch.nn.Module, processor: Any, spec: str, options: DetectorOptions, device: torch.device
    ):
        self.model, self.processor, self.spec, self.options, self.device = (
            model.eval().to(device),
            processor,
            spec,
            options,
            device,
        )

    @property
    def input_side(self) -> int:
        return processor_side(self.processor)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[Detections]:
        images = [im.convert("RGB") for im in images]
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = [(im.height, im.width) for im in images]
        # threshold 0 here: ``keep`` applies the score threshold, the class filter and the cap in one place
        results = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        names = self.model.config.id2label
        return [
            keep(r["boxes"], r["scores"], [names.get(int(i), str(int(i))) for i in r["labels"]], self.options, size)
            for r, size in zip(results, sizes)
        ]


class OpenVocabularyDetector(TransformersDetector):
    """OWLv2 / OWL-ViT: boxes for the free-text prompts; each box is labelled with its best prompt."""

    def __init__(
        self, model: torch.nn.Module, processor: Any, spec: str, options: DetectorOptions, device: torch.device
    ):
        if not options.prompts:
            raise ConfigError(
                f"{spec} is an open-vocabulary detector: say what to look for with prompts "
                "(--prompts 'a person,a dog,a red kite')"
            )
        super().__init__(model, processor, spec, options, device)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[Detections]:
        images = [im.convert("RGB") for im in images]
        prompts = list(self.options.prompts)
        inputs = self.processor(text=[prompts] * len(images), images=images, padding=True, return_tensors="pt").to(
            self.device
        )
        outputs = self.model(**inputs)
        sizes = [(im.height, im.width) for im in images]
        results = self.processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        return [
            keep(r["boxes"], r["scores"], [prompts[int(i)] for i in r["labels"]], self.options, size)
            for r, size in zip(results, sizes)
        ]


def load_detector(spec: str, options: Optional[DetectorOptions] = None, device: str | torch.device = "cpu") -> Detector:
    """A detector from a spec (see the module docstring); bad specs are one-line errors."""
    options = options or DetectorOptions()
    device = torch.device(device)
    if spec.startswith("torchvision:"):
        return _torchvision_pretrained(spec, options, device)
    path = Path(spec[3:] if spec.startswith("hf:") else spec)
    if (path / TORCHVISION_CONFIG).is_file():
        return _torchvision_folder(path, spec, options, device)
    if spec.startswith("hf:") or path.is_dir():
        with tensor_only_pickles(path):
            return _transformers(str(path), spec, options, device)
    raise ConfigError(
        f"unknown detector {spec!r}: use torchvision:<model name>, hf:<hub id or folder>, or a folder "
        f"with {TORCHVISION_CONFIG}"
    )


def _torchvision_pretrained(spec: str, options: DetectorOptions, device: torch.device) -> TorchvisionDetector:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    name = spec.split(":", 1)[1]
    available = torchvision.models.list_models(module=torchvision.models.detection)
    if name not in available:
        raise ConfigError(f"{name!r} is not a torchvision detection model; choose one of {', '.join(available)}")
    weights = get_model_weights(name).DEFAULT
    return TorchvisionDetector(get_model(name, weights=weights), weights.meta["categories"], spec, options, device)


def _torchvision_folder(path: Path, spec: str, options: DetectorOptions, device: torch.device) -> TorchvisionDetector:
    from safetensors.torch import load_file
    from torchvision.models import get_model

    config = json.loads((path / TORCHVISION_CONFIG).read_text())
    model = get_model(
        config["architecture"],
        weights=None,
        weights_backbone=None,
        num_classes=len(config["categories"]),
        **config.get("kwargs", {}),
    )
    model.load_state_dict(load_file(path / TORCHVISION_WEIGHTS))
    return TorchvisionDetector(model, config["categories"], spec, options, device)


def save_torchvision_detector(
    model: torch.nn.Module, architecture: str, categories: Sequence[str], path: Path, **kwargs: Any
) -> None:
    """Save a torchvision detector (fine-tuned, or a test's random one) as a folder ``load_detector`` reads."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / TORCHVISION_WEIGHTS)
    (path / TORCHVISION_CONFIG).write_text(
        json.dumps({"architecture": architecture, "categories": list(categories), "kwargs": kwargs}, indent=1)
    )


def _transformers(source: str, spec: str, options: DetectorOptions, device: torch.device) -> Detector:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForObjectDetection,
        AutoModelForZeroShotObjectDetection,
        AutoProcessor,
    )

    if AutoConfig.from_pretrained(source).model_type in OPEN_VOCABULARY:
        model = AutoModelForZeroShotObjectDetection.from_pretrained(source)
        return OpenVocabularyDetector(model, AutoProcessor.from_pretrained(source), spec, options, device)
    model = AutoModelForObjectDetection.from_pretrained(source)
    return TransformersDetector(model, AutoImageProcessor.from_pretrained(source), spec, options, device)
