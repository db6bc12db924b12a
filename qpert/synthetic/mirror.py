"""Small stand-ins of every ``qpert data fetch`` source, under their published file names: an offline mirror.

``qpert data fetch NAME --mirror FOLDER --catalog FOLDER/qpert-catalog.json`` then runs its whole path
(archives read in place or by range requests, checks, manifest) without a network, and writes a data
root the loaders read. The Flickr30K images are synthetic scenes (:mod:`qpert.synthetic.scenes`, as JPEG)
whose ids are the scene ids, so the toy ``blip2-shapes`` model sees the scenes it was made for; each
archive also holds a few images no annotation names, so fetching only what is needed shows.
``qpert-catalog.json`` gives the stand-ins' own checksums and counts, which differ from the published ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any, Union

from PIL import Image

from ..data.layout import DataLayout
from .scenes import Scene, make_scenes
from .writer import entities_sentences, entities_xml

PathLike = Union[str, Path]
CATALOG = "qpert-catalog.json"
#: The first COCO id of the stand-ins (COCO ids are integers; file names pad them to 12 digits).
COCO_FIRST_ID = 100000
_DATE = (2024, 1, 1, 0, 0, 0)  # fixed member times: the same arguments give the same bytes


def write_mirror(
    folder: PathLike,
    *,
    flickr_test: int = 8,
    flickr_val: int = 6,
    coco_test: int = 8,
    coco_val: int = 6,
    extra: int = 3,
    seed: int = 2000,
) -> Path:
    """Write every source's stand-in into ``folder``; returns the path of its ``qpert-catalog.json``.

    Flickr30K scenes come from stream ``seed`` (test first, then val, then ``extra`` unnamed ones),
    COCO's from stream ``seed + 1``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    catalog: dict[str, dict[str, Any]] = {}
    names = DataLayout(out)  # for the published file names only

    flickr = make_scenes(seed, flickr_test + flickr_val + extra)
    splits = {"test": flickr[:flickr_test], "val": flickr[flickr_test : flickr_test + flickr_val]}
    for split, scenes in splits.items():
        entries = [{"image": f"flickr30k-images/{s.image_id}.jpg", "caption": list(s.captions)} for s in scenes]
        _write(out, names.annotation_file("flickr30k", split).name, _json(entries), catalog, images=len(entries))
    _write_zip(out, "flickr30k-images.zip", {f"flickr30k-images/{s.image_id}.jpg": _jpeg(s) for s in flickr}, catalog)
    entities = {}
    for s in flickr:
        entities[f"Annotations/{s.image_id}.xml"] = entities_xml(s)
        entities[f"Sentences/{s.image_id}.txt"] = "".join(f"{line}\n" for line in entities_sentences(s)).encode()
    _write_zip(out, "annotations.zip", entities, catalog, zipfile.ZIP_DEFLATED)

    coco = make_scenes(seed + 1, coco_test + coco_val + extra)
    stems = [f"COCO_val2014_{COCO_FIRST_ID + i:012d}" for i in range(len(coco))]
    coco_splits = {"test": range(coco_test), "val": range(coco_test, coco_test + coco_val)}
    for split, indices in coco_splits.items():
        entries = [{"image": f"val2014/{stems[i]}.jpg", "caption": list(coco[i].captions)} for i in indices]
        _write(out, names.annotation_file("coco", split).name, _json(entries), catalog, images=len(entries))
    _write_zip(out, "val2014.zip", {f"val2014/{stem}.jpg": _jpeg(s) for stem, s in zip(stems, coco)}, catalog)
    named = range(coco_test + coco_val)
    release = {str(COCO_FIRST_ID + i): _coco_entities(coco[i]) for i in named}
    _write(out, names.coco_entities.name, _json(release), catalog)

    fg = {
        "flickr30k": {s.image_id: list(reversed(s.captions)) for s in splits["test"]},
        "coco": {stems[i]: list(reversed(coco[i].captions)) for i in coco_splits["test"]},
    }
    for benchmark, captions in fg.items():
        _write(out, names.fg_file(benchmark).name, _json(captions), catalog, images=len(captions))
    path = out / CATALOG
    path.write_text(json.dumps(catalog, indent=1))
    return path


def _coco_entities(scene: Scene) -> dict[str, Any]:
    """COCO Entities' form: per caption, its grounded nouns' detections ``[[det_id, [x0, y0, x1, y1]], ...]``."""
    captions = {}
    for caption in scene.captions:
        detections: dict[str, list] = {}
        for det_id, obj in enumerate(scene.objects):
            if obj.shape in caption:
                detections.setdefault(obj.shape, []).append([det_id, [float(v) for v in obj.box]])
        captions[caption] = {"detections": detections}
    return captions


def _jpeg(scene: Scene) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1).encode()


def _write(out: Path, name: str, data: bytes, catalog: dict, **facts: int) -> None:
    (out / name).write_bytes(data)
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    catalog[name] = {"md5": md5, "sha256": hashlib.sha256(data).hexdigest(), **facts}


def _write_zip(out: Path, name: str, members: dict[str, bytes], catalog: dict, compression=zipfile.ZIP_STORED) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in members.items():
            archive.writestr(zipfile.ZipInfo(member, _DATE), data, compress_type=compression)
    _write(out, name, buffer.getvalue(), catalog, members=len(members))
