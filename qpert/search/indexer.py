"""``qpert index``: photos -> detector boxes -> baseline and Q-Pert embeddings -> SQLite + FAISS.

Three phases keep every update atomic and resumable:

1. plan: compare the folder with the catalog by file stat (the same plan on every rank): a photo
   whose size, mtime, ctime or inode changed (or every photo, with ``rehash``) is looked at
   again, and so is every file skipped before;
2. compute: each rank takes every world-th planned photo, hashes it (SHA-256: same bytes, nothing
   to recompute), and writes what it found to ``staging/`` (one file per photo, atomically), so a
   killed run resumes where it stopped;
3. merge (rank 0): one SQLite transaction applies every result, then the FAISS files are rebuilt
   and ``staging/`` is cleared. Until that commit the previous index is untouched and usable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import distributed
from ..adapters import ImageObjects
from ..atomic import atomic_write, remove_stale_temporaries
from ..attach import attach
from ..config import QPertConfig, compat_dtype
from ..errors import ConfigError, DiskFullError, IndexBusyError, IndexDamagedError, MissingFileError
from ..eval.cache import FeatureStore, content_key, model_fingerprint
from ..models.compiling import compile_vision_encoder
from ..models.registry import LoadedModel, load_model, retrieval_heads
from ..terminal import printable
from .annotations import annotated_detections, read_annotations
from .catalog import READ_ONLY_ERRNOS, Catalog, NewPhoto, PhotoRow, read_only_index
from .detectors import Detections, Detector, DetectorOptions, load_detector
from .photos import PhotoFile, UnreadablePhotoError, decode_photo, read_photo, scan_photos
from .presets import choose_models
from .query_boxes import QueryBoxDetector, check_settings, collect_garbage, identity
from .vectors import KINDS, VectorIndex

log = logging.getLogger(__name__)

MANIFEST = "index.json"
CATALOG = "catalog.sqlite"
THUMBNAILS = "thumbnails"  # the search page's cache, one JPEG per photo content
FORMAT = 1
#: Larger JPEGs are decoded at a reduced scale (several times faster) whose longest side stays at least the
#: longest side the detectors read and at least this: twice the largest input of the registered models.
MODEL_SIDE = 768
#: ``--detector none``: index without boxes (Q-Pert then leaves every photo as the baseline sees it).
NO_DETECTOR = "none"


@dataclass(frozen=True)
class IndexSettings:
    """What an index is built with; stored in ``index.json``."""

    model: str = "blip2-coco"
    detector: str = "torchvision:fasterrcnn_resnet50_fpn_v2"
    detector_options: DetectorOptions = field(default_factory=DetectorOptions)
    qpert: QPertConfig = field(default_factory=QPertConfig)
    annotations: Optional[str] = None  # COCO instances file: its photos take these boxes, not the detector's
    faiss: str = "flat"
    itm_features: bool = True  # keep the vision tokens, for ITM re-ranking at search time
    dtype: Optional[str] = None
    trust_remote_code: bool = False
    query_boxes: Optional[str] = None  # OWLv2 whose text-free features are kept for query-aware boxes
    query_box_count: int = 64  # candidate boxes kept per photo, by objectness

    def __post_init__(self) -> None:
        check_settings(self.query_boxes, self.query_box_count, self.itm_features)
        if self.faiss not in KINDS:
            raise ConfigError(f"unknown FAISS index kind {self.faiss!r}; choose one of {', '.join(KINDS)}")
        object.__setattr__(self, "dtype", compat_dtype(self.qpert.compat, self.dtype))  # official: float32

    def to_json(self) -> dict:
        d = asdict(self)
        d["detector_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["detector_options"].items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> IndexSettings:
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in d["detector_options"].items()}
        return cls(**{**d, "detector_options": DetectorOptions(**opts), "qpert": QPertConfig.from_dict(d["qpert"])})


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    photos: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.photos and not self.skipped:
            return f"no photos found (JPEG, PNG or WebP; {self.removed} removed from the index)"
        text = (
            f"{self.photos} photos indexed: {self.added} added, {self.updated} updated, {self.removed} removed, "
            f"{self.unchanged} unchanged, {len(self.skipped)} skipped ({self.seconds:.1f} s)"
        )
        return text + "".join(f"\n  skipped {printable(path)}: {printable(why)}" for path, why in self.skipped)


def read_manifest(index_dir: Path) -> Optional[dict]:
    """``index.json``, or None when there is none; ``IndexDamagedError`` when it is not one qpert wrote."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("photos"), str):
            raise ValueError("no photo folder")
        settings = manifest["settings"]
    except (ValueError, KeyError) as e:  # bad JSON included
        raise IndexDamagedError(
            f"{path} is damaged or was not written by qpert ({type(e).__name__}: {e}); "
            "delete the index folder and run `qpert index` again"
        ) from e
    settings_from_json(settings, path)
    return manifest


def settings_from_json(d: dict, where: Path) -> IndexSettings:
    """Stored settings, or ``IndexDamagedError`` saying where they are unreadable."""
    try:
        return IndexSettings.from_json(d)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise IndexDamagedError(
            f"{where} is damaged or was not written by qpert ({type(e).__name__}: {e}); "
            "delete the index folder and run `qpert index` again"
        ) from e


def _check_compatible(manifest: Optional[dict], photos_dir: Path, settings: IndexSettings) -> None:
    if manifest is None:
        return
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"this index has format {manifest.get('format')}, qpert {FORMAT} reads; build a new one")
    if Path(manifest["photos"]) != photos_dir:
        raise ConfigError(
            f"this index belongs to the photo folder {manifest['photos']}, not {photos_dir}; use another --index folder"
        )
    if manifest["settings"]["model"] != settings.model:
        raise ConfigError(
            f"this index was built with model {manifest['settings']['model']!r}; its vectors cannot be "
            f"mixed with {settings.model!r}'s: use another --index folder"
        )


@dataclass
class _Work:
    """One planned photo; ``row`` is its current catalog entry, if any."""

    file: PhotoFile
    row: Optional[PhotoRow]


@dataclass
class _Read:
    """A planned photo after reading: its hash, and either its outcome (known without the models) or its pixels."""

    item: _Work
    sha: str
    outcome: Optional[dict] = None
    image: Optional[Image.Image] = None  # decoded at most Indexer.decode_side long, when a JPEG allows it
    size: tuple[int, int] = (0, 0)  # (height, width) of the photo itself: what boxes and Q-Pert refer to


def _ordered(
    pool: ThreadPoolExecutor, fn: Callable[[_Work], _Read], items: Sequence[_Work], ahead: int
) -> Iterator[_Read]:
    """``fn`` over ``items`` in the pool, in order, with at most ``ahead`` results waiting (bounded memory)."""
    queue: deque[Future[_Read]] = deque(pool.submit(fn, item) for item in items[:ahead])
    rest = iter(items[ahead:])
    while queue:
        result = queue.popleft().result()
        following = next(rest, None)
        if following is not None:
            queue.append(pool.submit(fn, following))
        yield result


class Indexer:
    """One update of an index (the three phases of the module docstring); under torchrun, one per rank."""

    def __init__(
        self,
        photos_dir: Path,
        index_dir: Path,
        settings: IndexSettings,
        device: str = "auto",
        batch_size: int = 8,
        progress: bool = True,
        ranks: Optional[distributed.Ranks] = None,
        compile_vision: bool = False,
        rehash: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
        self.photos_dir = Path(photos_dir).resolve()
        self.index_dir = Path(index_dir).resolve()
        self.settings = settings
        self.batch_size = batch_size
        self.progress = progress
        self.rehash = rehash
        self.ranks = ranks or distributed.Ranks()
        self.device = self.ranks.device(device)
        self.readers = _share_cores(self.device)
        _check_compatible(read_manifest(self.index_dir), self.photos_dir, settings)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.index_dir, self.index_dir / THUMBNAILS):  # what killed runs and servers were writing
            remove_stale_temporaries(folder)
        self.ranks.barrier()
        self.loaded: LoadedModel = load_model(
            settings.model, device=self.device, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code
        )
        self.retriever = retrieval_heads(self.loaded.model)
        if compile_vision:
            compile_vision_encoder(self.loaded.model)
        self.detector: Optional[Detector] = (
            None
            if settings.detector == NO_DETECTOR
            else load_detector(settings.detector, settings.detector_options, self.device)
        )
        self.annotations = read_annotations(Path(settings.annotations)) if settings.annotations else {}
        self.model_key = model_key(self.loaded, settings)
        self.detector_key = (
            content_key(settings.detector, settings.to_json()["detector_options"], self.annotations)
            if self.detector is not None or self.annotations
            else NO_DETECTOR
        )
        query_boxes = identity(settings.query_boxes, settings.query_box_count)
        embedding_key = content_key(self.model_key, self.detector_key, settings.qpert.to_dict(), *query_boxes)
        self.settings_key = f"{self.detector_key}/{embedding_key}"
        self.features = FeatureStore(self.index_dir / "features")  # vision tokens, kept for ITM
        self.staging = FeatureStore(self.index_dir / "staging")  # per-photo results until the merge
        self.query_boxes: Optional[QueryBoxDetector] = (
            QueryBoxDetector(settings.query_boxes, settings.query_box_count, self.features, self.device)
            if settings.query_boxes
            else None
        )
        readers = [d for d in (self.detector, self.query_boxes) if d is not None]
        self.decode_side = max([MODEL_SIDE, *(d.input_side for d in readers)])

    # ------------------------------------------------------------------------------------ plan
    def plan(self, catalog: Catalog) -> tuple[list[_Work], list[str], int, list[tuple[str, str]]]:
        """(photos to look at, catalog paths whose file is gone, photos unchanged by stat,
        (path, reason) of the folders and files that could not be read).

        Photos in a folder that cannot be read now are kept as they are, not removed."""
        scan = scan_photos(self.photos_dir, exclude=self.index_dir)
        rows, skipped = catalog.photos(), catalog.skipped()
        work, unchanged = [], 0
        for f in scan.photos:
            row = rows.get(f.path)
            if not self.rehash and row and row.stat_key == f.stat_key and row.settings == self.settings_key:
                unchanged += 1
            else:  # new, changed, skipped before (retried every run), or to be hashed anyway
                work.append(_Work(f, row))
        present = {f.path for f in scan.photos}
        unreadable = tuple(scan.unreadable_folders())
        gone = sorted(
            p for p in list(rows) + list(skipped) if p not in present and not (unreadable and p.startswith(unreadable))
        )
        return work, gone, unchanged, scan.unreadable

    # ------------------------------------------------------------------------------------ compute
    def result_key(self, sha: str) -> str:
        return content_key("photo", sha, self.settings_key)

    def tokens_key(self, sha: str) -> str:
        return tokens_key(sha, self.model_key)

    def compute(self, work: Sequence[_Work]) -> dict[str, dict]:
        """This rank's share of ``work``: {path: outcome}, the embeddings staged on disk.

        Reading, hashing and decoding run in a small thread pool, ahead of the models by at most two
        batches (so memory stays bounded for any folder), while detection and encoding use the cores."""
        mine = list(work)[self.ranks.rank :: self.ranks.world]
        outcomes: dict[str, dict] = {}
        bar = tqdm(
            total=len(mine),
            desc="indexing",
            unit="photo",
            disable=not (self.progress and self.ranks.is_main),
            dynamic_ncols=True,
        )
        pending: list[_Read] = []
        with bar, ThreadPoolExecutor(self.readers, thread_name_prefix="qpert-read") as pool:  # the bar ends first
            for read in _ordered(pool, self._read, mine, ahead=2 * self.batch_size):
                if read.outcome is not None:
                    outcomes[read.item.file.path] = read.outcome
                    bar.update()
                else:
                    pending.append(read)
                if len(pending) == self.batch_size:
                    self._compute_batch(pending, outcomes, bar)
                    pending = []
            if pending:
                self._compute_batch(pending, outcomes, bar)
        return outcomes

    def _read(self, item: _Work) -> _Read:
        """Read a photo once: hash its bytes, and decode them only if its results are not known yet."""
        path = self.photos_dir / item.file.path
        try:
            data, sha = read_photo(path)
        except OSError as e:
            return _Read(item, "", outcome={"status": "skipped", "reason": f"unreadable file ({e})"})
        if item.row and item.row.sha256 == sha and item.row.settings == self.settings_key and self._tokens_kept(sha):
            return _Read(item, sha, outcome={"status": "touched", "sha": sha})
        if self.staging.has("photo", self.result_key(sha)):  # done before a crash: resume
            return _Read(item, sha, outcome={"status": "computed", "sha": sha})
        try:
            image, size = decode_photo(io.BytesIO(data), path, longest_side=self.decode_side)
            return _Read(item, sha, image=image, size=size)
        except UnreadablePhotoError as e:
            log.warning("skipping %s", printable(str(e)))
            return _Read(item, sha, outcome={"status": "skipped", "reason": str(e).split(": ", 1)[-1]})

    def _tokens_kept(self, sha: str) -> bool:
        """Whether the photo's vision tokens are stored and pass their checksum (or are not kept at all):
        a photo whose tokens were lost or damaged is encoded again, so ``--rehash`` repairs an index."""
        if self.query_boxes is not None and not self.query_boxes.kept(sha):  # lost or damaged: detected again
            return False
        return not self.settings.itm_features or self.features.has("tokens", self.tokens_key(sha))

    def _compute_batch(self, batch: list[_Read], outcomes: dict[str, dict], bar) -> None:
        ready = [(read.item, read.sha) for read in batch]
        images, sizes = [read.image for read in batch], [read.size for read in batch]
        detections = self._detections(ready, images, sizes)
        tokens = self._tokens(ready, images)
        baseline, qpert = self._embeddings(tokens, detections, sizes)
        if self.query_boxes is not None:  # before the staged result, which says the photo is done
            self.query_boxes.store_missing([sha for _, sha in ready], images, sizes)
        for i, (item, sha) in enumerate(ready):
            self.staging.save(
                "photo",
                self.result_key(sha),
                {
                    "baseline": baseline[i],
                    "qpert": qpert[i],
                    "size": torch.tensor(sizes[i]),
                    "detections": _json_tensor(detections[i].to_json()),
                },
            )
            outcomes[item.file.path] = {"status": "computed", "sha": sha}
        bar.update(len(batch))

    def _detections(
        self, ready: list[tuple[_Work, str]], images: list[Image.Image], sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """Annotated boxes, else the detector's (reused from the catalog when photo and detector are
        unchanged), else none; in the pixels of the photo itself (``sizes``), whatever size it was decoded at."""
        found: list[Optional[Detections]] = []
        for item, sha in ready:
            row = item.row
            if item.file.path in self.annotations:
                found.append(annotated_detections(self.annotations[item.file.path], self.settings.detector_options))
            elif self.detector is None:
                found.append(Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), []))
            elif row is not None and row.sha256 == sha and row.settings.split("/")[0] == self.detector_key:
                found.append(row.detections)
            else:
                found.append(None)
        todo = [i for i, d in enumerate(found) if d is None]
        if todo:
            for i, d in zip(todo, self.detector.detect([images[i] for i in todo])):
                (height, width), image = sizes[i], images[i]
                scale = np.array([width / image.width, height / image.height] * 2, dtype=np.float32)
                found[i] = Detections(d.boxes * scale, d.scores, d.labels)
        return found

    @torch.no_grad()
    def _tokens(self, ready: list[tuple[_Work, str]], images: list[Image.Image]) -> torch.Tensor:
        """(B, N, C) vision tokens: from the feature store when kept, else encoded (and kept)."""
        keys = [self.tokens_key(sha) for _, sha in ready]
        model, processor = self.loaded.model, self.loaded.processor
        kept = [self.features.get("tokens", k) for k in keys]
        out: list[Optional[torch.Tensor]] = [None if k is None else k["tokens"] for k in kept]
        todo = [i for i in range(len(ready)) if out[i] is None]
        if todo:
            pixels = self.retriever.preprocess(model, processor, [images[i] for i in todo])
            encoded = self.retriever.image_tokens(model, pixels)  # each family moves its inputs
            for i, t in zip(todo, encoded):
                out[i] = t
                if self.settings.itm_features:
                    self.features.save("tokens", keys[i], {"tokens": t.to(storage_dtype(t))})
        dtype = next(model.parameters()).dtype
        return torch.stack([t.to(self.device, dtype) for t in out])

    @torch.no_grad()
    def _embeddings(
        self, tokens: torch.Tensor, detections: list[Detections], sizes: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q, D) float32 ITC image embeddings without and with Q-Pert on the detections."""
        model = self.loaded.model
        with attach(model, self.settings.qpert) as handle:
            baseline = self.retriever.image_embeddings(model, tokens)
            objects = ImageObjects.from_boxes(handle, tokens, [d.boxes for d in detections], sizes)
            with objects.perturb():
                qpert = self.retriever.image_embeddings(model, tokens)
        if not torch.isfinite(baseline).all():
            raise ConfigError(
                f"{self.settings.model} gave non-finite image embeddings (dtype {baseline.dtype}); try --dtype fp32"
            )
        if not torch.isfinite(qpert).all():  # an overflow: never store vectors no search can rank
            raise ConfigError(
                f"Q-Pert with alpha={self.settings.qpert.alpha:g} gave non-finite image embeddings "
                f"(an overflow in {baseline.dtype}); choose a smaller --alpha"
            )
        shape = (tokens.shape[0], -1, baseline.shape[-1])
        return baseline.float().reshape(shape).cpu(), qpert.float().reshape(shape).cpu()

    # ------------------------------------------------------------------------------------ merge
    def merge(
        self,
        catalog: Catalog,
        work: Sequence[_Work],
        gone: Sequence[str],
        outcomes: dict[str, dict],
        report: IndexReport,
    ) -> None:
        """Apply every rank's results in one transaction, then rebuild FAISS and tidy up."""
        with catalog.update() as update:
            update.set_settings(self.settings.to_json())  # readers take the vectors' settings from here
            for path in gone:
                update.remove(path)
            for item in work:
                f, outcome = item.file, outcomes[item.file.path]
                if outcome["status"] == "skipped":
                    update.skip(f.path, f.size, f.mtime_ns, outcome["reason"])
                    report.skipped.append((f.path, outcome["reason"]))
                elif outcome["status"] == "touched":
                    update.touch(f.path, f.stat_key)
                    report.unchanged += 1
                else:
                    update.put(self._staged(f, outcome["sha"]))
                    if item.row is None:
                        report.added += 1
                    else:
                        report.updated += 1
        report.removed = len(gone)
        generation = catalog.generation
        for variant in ("baseline", "qpert"):
            ids, vectors = catalog.vectors(variant)
            VectorIndex.build(ids, vectors, self.settings.faiss).save(self.index_dir, variant, generation)
        _write_json(
            self.index_dir / MANIFEST,
            {"format": FORMAT, "photos": str(self.photos_dir), "settings": self.settings.to_json()},
        )
        self._collect_garbage(catalog)

    def _staged(self, f: PhotoFile, sha: str) -> NewPhoto:
        staged = self.staging.load("photo", self.result_key(sha))
        height, width = (int(v) for v in staged["size"])
        return NewPhoto(
            f.path,
            f.size,
            f.mtime_ns,
            f.ctime_ns,
            f.inode,
            sha,
            width,
            height,
            Detections.from_json(_from_json_tensor(staged["detections"])),
            self.settings_key,
            baseline=staged["baseline"].numpy(),
            qpert=staged["qpert"].numpy(),
        )

    def _collect_garbage(self, catalog: Catalog) -> None:
        """Drop the staged results (now in SQLite), and the vision tokens and thumbnails of photos no
        longer indexed."""
        shutil.rmtree(self.index_dir / "staging", ignore_errors=True)
        shas = {row.sha256 for row in catalog.photos().values()}
        kept = {self.tokens_key(sha) for sha in shas} if self.settings.itm_features else set()
        for path in (self.index_dir / "features" / "tokens").glob("*.safetensors"):
            if path.stem not in kept:
                path.unlink(missing_ok=True)
        query_boxes = self.query_boxes
        collect_garbage(self.index_dir / "features", {query_boxes.key(sha) for sha in shas} if query_boxes else set())
        for path in (self.index_dir / THUMBNAILS).glob("*.jpg"):
            if path.name.split("-", 1)[0] not in shas:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------ run
    def run(self) -> IndexReport:
        started = time.time()
        catalog = Catalog(self.index_dir / CATALOG)
        try:
            work, gone, unchanged, unreadable = self.plan(catalog)
            if not self.ranks.all_equal(_plan_hash(work, gone)):
                raise RuntimeError("the ranks see different photo folders (files changed while starting?); re-run")
            outcomes = self.compute(work)
            report = IndexReport(unchanged=unchanged, skipped=list(unreadable))
            if self.ranks.world > 1:
                outcomes = self._gather(outcomes)
            if self.ranks.is_main:
                self.merge(catalog, work, gone, outcomes, report)
                report.photos = len(catalog.photos())
            self.ranks.barrier()
        finally:
            catalog.close()
        report.seconds = time.time() - started
        return report

    def _gather(self, outcomes: dict[str, dict]) -> dict[str, dict]:
        """Every rank's outcomes, through a JSON file per rank in staging/ (no pickling)."""
        folder = self.index_dir / "staging" / "outcomes"
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"rank{self.ranks.rank}.json", outcomes)
        self.ranks.barrier()
        merged: dict[str, dict] = {}
        if self.ranks.is_main:
            for r in range(self.ranks.world):
                merged.update(json.loads((folder / f"rank{r}.json").read_text()))
        return merged


def build_index(
    photos_dir: Path,
    index_dir: Optional[Path] = None,
    settings: Optional[IndexSettings] = None,
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = True,
    compile_vision: bool = False,
    rehash: bool = False,
) -> IndexReport:
    """Create or update the index of ``photos_dir`` (default location: ``photos_dir/.qpert-index``).

    Without ``settings``: the index's models on a re-run, else the preset for ``device`` (``quality`` on a
    GPU, ``laptop`` on a CPU; :mod:`qpert.search.presets`).

    ``compile_vision`` compiles the vision encoder (``qpert.compile_vision_encoder``), for large collections on a GPU.

    Under ``torchrun`` every rank takes a share of the photos and rank 0 writes the index.
    """
    if not Path(photos_dir).is_dir():
        raise MissingFileError(f"photo folder {photos_dir} does not exist or is not a folder")
    index_dir = Path(index_dir) if index_dir is not None else Path(photos_dir) / ".qpert-index"
    if settings is None:
        chosen = choose_models(index_dir, device)
        log.info("%s", chosen.why)
        settings = IndexSettings(model=chosen.model, detector=chosen.detector)
    ranks = distributed.start()
    try:
        with _exclusive(index_dir, ranks.is_main), _previous_index_kept():
            return Indexer(
                photos_dir,
                index_dir,
                settings,
                device,
                batch_size,
                progress,
                ranks,
                compile_vision,
                rehash,
            ).run()
    finally:
        distributed.stop(ranks)


@contextmanager
def _previous_index_kept() -> Iterator[None]:
    """A full disk: what to do about it (until the final commit, the previous index is untouched)."""
    try:
        yield
    except DiskFullError as e:
        raise DiskFullError(f"{e}; the previous index is intact: free some space and run the same command again") from e


@contextmanager
def _exclusive(index_dir: Path, take: bool) -> Iterator[None]:
    """One update of an index at a time (a second ``qpert index`` on it is refused, not interleaved)."""
    if not take:
        yield
        return
    import fcntl

    try:
        Path(index_dir).mkdir(parents=True, exist_ok=True)
        lock = open(Path(index_dir) / ".lock", "w")  # noqa: SIM115 (closed by the `with` below)
    except OSError as e:
        if e.errno in READ_ONLY_ERRNOS:
            raise read_only_index(index_dir, e.strerror) from e
        raise
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusyError(f"another `qpert index` is updating {index_dir}; wait for it to finish") from None
        yield


def _share_cores(device: torch.device) -> int:
    """Threads that read and decode photos (one per four cores, 1 to 4); on a CPU with four or more cores
    torch takes the others, so that the two never oversubscribe the machine. On fewer cores, decoding
    is a small share of the work and torch keeps them all."""
    cores = os.cpu_count() or 1
    readers = min(4, max(1, cores // 4))
    if device.type == "cpu" and cores >= 4:
        torch.set_num_threads(cores - readers)
    return readers


def model_key(loaded: LoadedModel, settings: IndexSettings) -> str:
    """Identifies the vision tokens a model computes (the name alone could be a re-saved folder)."""
    return content_key(settings.model, model_fingerprint(loaded.model), str(settings.dtype))


def tokens_key(sha: str, model: str) -> str:
    return content_key("tokens", sha, model)


def _plan_hash(work: Sequence[_Work], gone: Sequence[str]) -> int:
    text = json.dumps([[w.file.path, w.file.size, w.file.mtime_ns] for w in work] + list(gone))
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def storage_dtype(tokens: torch.Tensor) -> torch.dtype:
    """Half precision on disk (a ViT-g photo is 1.9 MB instead of 3.8 MB); bf16 stays bf16."""
    return torch.bfloat16 if tokens.dtype == torch.bfloat16 else torch.float16


def _json_tensor(value) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def _from_json_tensor(t: torch.Tensor):
    return json.loads(bytes(t.tolist()).decode())


def _write_json(path: Path, value) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(value, indent=1).encode())
