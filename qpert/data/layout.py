"""Where every benchmark file lives under a data root: the one place the layout is written down.

The layout is LAVIS's cache layout (so ``~/.cache/lavis`` works as a root as is), with Flickr30K
Entities beside Flickr30K and COCO Entities beside COCO::

    ROOT/
      qpert-data.json                                     what `qpert data fetch` fetched, with SHA-256
      .downloads/                                         whole archives while `qpert data fetch` unpacks them
      flickr30k/annotations/flickr30k_{test,val}.json     BLIP/LAVIS (or dataset_flickr30k.json, Karpathy)
      flickr30k/images/flickr30k-images/<flickr id>.jpg
      flickr30k/Annotations/<flickr id>.xml               Flickr30K Entities boxes
      flickr30k/Sentences/<flickr id>.txt                 Flickr30K Entities phrases
      coco/annotations/coco_karpathy_{test,val}.json      BLIP/LAVIS (or dataset_coco.json, Karpathy)
      coco/images/val2014/COCO_val2014_<12 digits>.jpg
      coco/coco_entities_release.json                     COCO Entities
      fg/Flickr30K_FG_ann.json, fg/MSCOCO_FG_ann.json     FG captions

The loaders read it, ``qpert data fetch`` and the synthetic benchmark write it, and every error
message that explains it quotes :func:`describe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

Benchmark = Literal["flickr30k", "coco"]
BENCHMARKS: tuple[str, ...] = ("flickr30k", "coco")
SPLITS: tuple[str, ...] = ("test", "val")
PathLike = Union[str, Path]

#: Annotation file names per benchmark: the BLIP/LAVIS names first (LAVIS's own cache also calls the
#: Flickr30K files ``{test,val}.json``), then Karpathy's file that holds every split.
_LAVIS_NAMES = {
    "flickr30k": ("flickr30k_{split}.json", "{split}.json"),
    "coco": ("coco_karpathy_{split}.json",),
}
_KARPATHY_NAMES = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
#: The folder (under ``images/``) that the annotation files' image names start with.
_IMAGE_FOLDERS = {"flickr30k": "flickr30k-images", "coco": "val2014"}
_FG_NAMES = {"flickr30k": "Flickr30K_FG_ann.json", "coco": "MSCOCO_FG_ann.json"}


@dataclass(frozen=True)
class DataLayout:
    """The paths of one data root (``--data-root``)."""

    root: Path

    def __init__(self, root: PathLike) -> None:
        object.__setattr__(self, "root", Path(root).expanduser())

    def folder(self, benchmark: str) -> Path:
        return self.root / benchmark

    def annotations_dir(self, benchmark: str) -> Path:
        return self.folder(benchmark) / "annotations"

    def annotation_file(self, benchmark: str, split: str) -> Path:
        """The BLIP/LAVIS annotation file of ``split``: what ``qpert data fetch`` writes."""
        return self.annotation_candidates(benchmark, split)[0]

    def annotation_candidates(self, benchmark: str, split: str) -> list[Path]:
        """Every file name the loader accepts for ``split``, in the order it looks for them."""
        folder = self.annotations_dir(benchmark)
        names = [n.format(split=split) for n in _LAVIS_NAMES[benchmark]] + [_KARPATHY_NAMES[benchmark]]
        return [folder / n for n in names]

    def images_dir(self, benchmark: str) -> Path:
        """The folder the annotation files' image names (``flickr30k-images/<id>.jpg``) are relative to."""
        return self.folder(benchmark) / "images"

    def image_folder(self, benchmark: str) -> Path:
        """The folder that holds the image files themselves."""
        return self.images_dir(benchmark) / _IMAGE_FOLDERS[benchmark]

    @property
    def entities_annotations(self) -> Path:
        return self.folder("flickr30k") / "Annotations"

    @property
    def entities_sentences(self) -> Path:
        return self.folder("flickr30k") / "Sentences"

    def entities_candidates(self) -> list[Path]:
        """Where ``--boxes entities`` looks for the Annotations folder (the second: Entities' own repository name)."""
        return [self.entities_annotations, self.root / "flickr30k_entities" / "Annotations"]

    @property
    def coco_entities(self) -> Path:
        return self.folder("coco") / "coco_entities_release.json"

    def fg_file(self, benchmark: str) -> Path:
        return self.root / "fg" / _FG_NAMES[benchmark]

    @property
    def manifest(self) -> Path:
        return self.root / "qpert-data.json"

    @property
    def downloads(self) -> Path:
        """Where whole archives wait while ``qpert data fetch`` unpacks them (removed once unpacked)."""
        return self.root / ".downloads"


def karpathy_image_folder(benchmark: str) -> str:
    """The folder, under ``images/``, of the images Karpathy's ``dataset_*.json`` names by bare file name."""
    return _IMAGE_FOLDERS[benchmark]


def describe(benchmark: str) -> str:
    """The expected layout of ``benchmark`` in one line, for error messages."""
    if benchmark == "flickr30k":
        return (
            "expected layout: ROOT/flickr30k/annotations/{flickr30k_<split>.json | <split>.json | "
            "dataset_flickr30k.json}, ROOT/flickr30k/images/flickr30k-images/<id>.jpg, "
            "and for flickr30k-fg ROOT/fg/Flickr30K_FG_ann.json (`qpert data fetch flickr30k` writes it)"
        )
    return (
        "expected layout: ROOT/coco/annotations/{coco_karpathy_<split>.json | dataset_coco.json}, "
        "ROOT/coco/images/val2014/COCO_val2014_<12 digits>.jpg, "
        "and for coco-fg ROOT/fg/MSCOCO_FG_ann.json (`qpert data fetch coco` writes it)"
    )
