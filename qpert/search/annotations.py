"""Boxes a photo folder already has: a COCO instances file (the format of COCO, LVIS, Objects365,
and most labelling tools' exports), whose ``file_name`` are paths relative to the folder.

Annotated photos take these boxes instead of the detector's; the rest go to the detector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.box_sources import BoxFormatError
from ..errors import MissingFileError
from .detectors import Detections, DetectorOptions, keep


def read_annotations(path: Path) -> dict[str, Any]:
    """{relative path: {"size": (height, width), "boxes": [[x0, y0, x1, y1], ...], "labels": [...]}}."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"annotations file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BoxFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise BoxFormatError(f"{path}: expected a COCO instances file with 'images' and 'annotations'")
    try:
        names = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
        photos = {
            im["id"]: {
                "path": Path(im["file_name"]).as_posix(),
                "size": (int(im["height"]), int(im["width"])),
                "boxes": [],
                "labels": [],
            }
            for im in data["images"]
        }
        for a in data["annotations"]:
            if a.get("iscrowd", 0) or a["image_id"] not in photos:
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            photos[a["image_id"]]["boxes"].append([x, y, x + w, y + h])
            photos[a["image_id"]]["labels"].append(names.get(a.get("category_id"), str(a.get("category_id", ""))))
    except (KeyError, TypeError, ValueError) as e:
        raise BoxFormatError(
            f"{path}: images need id, file_name, height, width; annotations need image_id and bbox [x, y, w, h] ({e!r})"
        ) from e
    return {p.pop("path"): p for p in photos.values()}


def annotated_detections(entry: dict[str, Any], options: DetectorOptions) -> Detections:
    """One photo's annotated boxes, clipped to it and filtered like detections (classes, max boxes)."""
    boxes = torch.tensor(entry["boxes"], dtype=torch.float32).reshape(-1, 4)
    return keep(boxes, torch.ones(len(boxes)), entry["labels"], options, entry["size"])
