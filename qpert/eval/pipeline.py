"""Benchmark evaluation (DESIGN.md §2): ITC over all pairs, then ITM + ITC re-ranking of the top k.

Any model family with retrieval heads (``qpert.models.family.RetrievalHeads``) runs here;
families without an ITM head (CoCa, SigLIP) are evaluated by ITC alone.

Work is split into shards of images; every stage's output goes to the feature cache under a
key of everything it depends on, so several methods share one vision pass, a killed run
resumes where it stopped, and changing a setting recomputes only what it touches. Under
``torchrun`` each rank takes its share of every stage (shards of images, chunks of texts, equal
blocks of ITM pairs), writes it to the cache all ranks share and reads the others' from it after
a barrier; the work units do not depend on the number of ranks, so the numbers do not either,
and a cache written by N ranks serves a run with M:

1. vision tokens of every image (once per model);     2. text embeddings (once);
3. per Q-Pert threshold, the subspaces of every image; 4. per method, ITC image embeddings;
5. per method, ITM logits of the top-k pairs of both directions (union, grouped by image).

With ``EvalOptions.object_baseline`` the object-embedding baseline (``qpert.object_baseline``) is
one more method, "object-embedding": the baseline's ITC plus each image's best object similarity
(cached per shard and text set), re-ranked by the baseline's ITM logits, so it is scored
ITM + ITC + object similarity.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..adapters import ImageObjects, QPertHandle
from ..attach import attach
from ..config import COMPATS, WEIGHT_COEFFICIENTS, QPertConfig
from ..core import Subspaces
from ..data.box_sources import BoxSet
from ..data.datasets import RetrievalDataset
from ..distributed import Ranks
from ..errors import ConfigError, DataError, DiskFullError
from ..models.compiling import compile_vision_encoder
from ..models.registry import DEFAULT_RERANK_K, LoadedModel, retrieval_heads
from ..object_baseline import object_masks, object_similarities
from ..scoring import non_finite_scores, resolve_itm
from .cache import FeatureStore, content_key, model_fingerprint
from .metrics import RetrievalMetrics, format_comparison, retrieval_metrics

log = logging.getLogger(__name__)

#: Texts per text-embedding forward and cache file.
TEXTS_PER_CHUNK = 256

#: A method is a named Q-Pert setting; None is the unmodified model.
Methods = dict[str, Optional[QPertConfig]]


@dataclass
class EvalOptions:
    itm: Optional[bool] = None  # ITM + ITC re-ranking; None: whenever the model has an ITM head
    k: Optional[int] = None  # candidates re-ranked per query; None: the model's (qpert.models.registry)
    batch_size: int = 16  # images per vision / Q-Former forward
    itm_batch_size: int = 128  # (image, text) pairs per ITM forward
    shard_size: int = 64  # images per cache file (the unit of resumption)
    cache_dir: Optional[Path] = None
    progress: bool = True
    keep_scores: bool = False  # keep each method's final T2I score matrix (for reports)
    object_baseline: bool = False  # add the "object-embedding" method (the paper's Table F ablation)
    compile_vision: bool = False  # torch.compile the vision encoder (qpert.compile_vision_encoder)
    compat: str = "paper"  # "official": the official code's metric conventions (and every method's compat)
    exclude_sites: tuple[str, ...] = ()  # cross-attentions left alone (qpert.attach(exclude=...))
    pairs_per_block: int = 4096  # ITM pairs per cache file: the unit of work ranks share and a resumed run skips

    def __post_init__(self) -> None:
        counts = {
            "k": self.k,
            "batch_size": self.batch_size,
            "itm_batch_size": self.itm_batch_size,
            "shard_size": self.shard_size,
            "pairs_per_block": self.pairs_per_block,
        }
        for name, value in counts.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"EvalOptions.{name} must be a whole number >= 1, got {value!r}")
        if self.compat not in COMPATS:
            raise ConfigError(f"unknown compat {self.compat!r}; choose one of {list(COMPATS)}")


@dataclass
class EvalResult:
    metrics: dict[str, RetrievalMetrics]
    settings: dict[str, Any]
    skipped_images: list[str] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # (images, texts), T2I
    pair_rates: list[float] = field(default_factory=list)  # ITM pairs per second computed by each rank

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: m.to_dict() for name, m in self.metrics.items()}
        out["settings"] = {**self.settings, "skipped_images": self.skipped_images}
        return out

    def table(self) -> str:
        return format_comparison(self.metrics)


def method_name(config: QPertConfig) -> str:
    extra = ("-keepnorm" if config.keep_norm else "") + ("-orthogonal" if config.mode == "orthogonal" else "")
    extra += "" if config.projector == config.compat else f"-{config.projector}-projector"
    extra += "-official" if config.compat == "official" else ""
    return f"qpert-a{config.alpha:g}-{config.weight}-{config.rank_rule}{extra}"


class _Run:
    """State of one evaluation: model, cache, shards and the inputs every stage needs."""

    def __init__(
        self, loaded: LoadedModel, dataset: RetrievalDataset, boxes: BoxSet, options: EvalOptions, ranks: Ranks
    ):
        if ranks.world > 1 and options.cache_dir is None:
            raise ConfigError(
                "several processes share their work through the feature cache: give a --cache-dir "
                "that every rank sees (a shared file system across nodes), not --no-cache"
            )
        self.ranks = ranks
        self.heads = retrieval_heads(loaded.model)
        self.itm = resolve_itm(self.heads, options.itm, loaded.name)
        self.k = options.k or (loaded.spec.rerank_k if loaded.spec else DEFAULT_RERANK_K)
        self.loaded, self.dataset, self.options = loaded, dataset, options
        self.model = loaded.model
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.model_key = content_key(loaded.name, model_fingerprint(self.model), str(self.dtype))
        root = options.cache_dir / self.model_key[:16] if options.cache_dir else None
        self.store = FeatureStore(root)
        self.boxes = [_boxes_of(boxes, i, options.compat) for i in dataset.image_ids]
        self.image_keys = [content_key(str(p), *_stat(p)) for p in dataset.image_paths]
        n = dataset.num_images
        self.shards = [range(s, min(s + options.shard_size, n)) for s in range(0, n, options.shard_size)]
        self.handle: QPertHandle = attach(self.model, QPertConfig(), exclude=options.exclude_sites)
        if options.compile_vision:  # lazy: a run whose vision tokens are all cached never compiles
            compile_vision_encoder(self.model)
        self._recent_subspaces: dict[str, Subspaces] = {}
        self.itm_pairs, self.itm_seconds = 0, 0.0  # computed by this rank, for its pairs/s

    def bar(self, total: int, desc: str, unit: str):
        """Rank 0's progress on its share (the ranks' shares are equal, so its ETA is the run's)."""
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            disable=not (self.options.progress and self.ranks.is_main),
            dynamic_ncols=True,
            mininterval=1.0,
        )

    # ---------------------------------------------------------------------------- stage 1
    def tokens_key(self, shard: range) -> str:
        return content_key("tokens", self.model_key, [self.image_keys[i] for i in shard])

    def vision_tokens(self) -> None:
        todo = [s for s in self.ranks.strided(self.shards) if not self.store.has("tokens", self.tokens_key(s))]
        with self.bar(sum(len(s) for s in todo), "vision features", "img") as bar:
            for shard in todo:
                tokens, sizes, readable = [], [], []
                for start in range(shard.start, shard.stop, self.options.batch_size):
                    idx = range(start, min(start + self.options.batch_size, shard.stop))
                    images = [_open_image(self.dataset.image_paths[i]) for i in idx]
                    good = [im for im in images if im is not None]
                    produced = iter(
                        self.heads.image_tokens(
                            self.model, self.heads.preprocess(self.model, self.loaded.processor, good)
                        )
                        if good
                        else ()
                    )
                    for im in images:
                        tokens.append(None if im is None else next(produced))
                        sizes.append((1, 1) if im is None else (im.height, im.width))
                        readable.append(im is not None)
                    bar.update(len(idx))
                template = next((t for t in tokens if t is not None), None)
                if template is None:
                    raise DataError(f"no image of shard {shard.start}-{shard.stop - 1} could be read")
                stacked = torch.stack([t if t is not None else torch.zeros_like(template) for t in tokens])
                self.store.save(
                    "tokens",
                    self.tokens_key(shard),
                    {"tokens": stacked, "sizes": torch.tensor(sizes), "readable": torch.tensor(readable)},
                )
        self.ranks.barrier()

    def load_tokens(self, shard: range) -> dict[str, torch.Tensor]:
        data = self.store.load("tokens", self.tokens_key(shard))
        data["tokens"] = data["tokens"].to(self.device, self.dtype)
        return data

    # ---------------------------------------------------------------------------- stage 2
    def text_embeddings(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.heads.tokenize(self.model, self.loaded.processor, self.dataset.texts)
        texts = content_key("text", self.model_key, self.dataset.texts)
        chunks = [
            (content_key(texts, s), range(s, min(s + TEXTS_PER_CHUNK, len(ids))))
            for s in range(0, len(ids), TEXTS_PER_CHUNK)
        ]
        todo = [(key, chunk) for key, chunk in self.ranks.strided(chunks) if not self.store.has("text", key)]
        with self.bar(sum(len(c) for _, c in todo), "text features", "text") as bar:
            for key, chunk in todo:
                emb = self.heads.text_embeddings(
                    self.model, ids[chunk.start : chunk.stop], mask[chunk.start : chunk.stop]
                )
                self.store.save("text", key, {"emb": emb.float()})
                bar.update(len(chunk))
        self.ranks.barrier()
        return torch.cat([self.store.load("text", key)["emb"] for key, _ in chunks]), ids, mask

    # ---------------------------------------------------------------------------- stage 3
    def subspaces_key(self, shard: range, config: QPertConfig) -> str:
        boxes = [self.boxes[i].tolist() for i in shard]
        recipe = (config.threshold, config.rank, config.compat, config.projector)
        return content_key("subspaces-v3", self.tokens_key(shard), boxes, self.handle.site_names, *recipe)

    def subspaces(self, shard: range, config: QPertConfig, tokens: dict[str, torch.Tensor]) -> Subspaces:
        key = self.subspaces_key(shard, config)
        if key in self._recent_subspaces:
            return self._recent_subspaces[key]
        if not self.store.has("subspaces", key):
            boxes = [b if ok else [] for b, ok in zip((self.boxes[i] for i in shard), tokens["readable"].tolist())]
            subs = self.handle.compute_subspaces(tokens["tokens"], boxes, tokens["sizes"].tolist(), config)
            self.store.save("subspaces", key, subs.state_dict())
        subs = Subspaces.from_state_dict(self.store.load("subspaces", key)).to(self.device)
        self._recent_subspaces = {key: subs}  # a shard's batches reuse them; one shard in memory at a time
        return subs

    # ---------------------------------------------------------------------------- stage 4
    def method_key(self, shard: range, config: Optional[QPertConfig]) -> str:
        if config is None:
            return content_key("baseline", self.tokens_key(shard))
        return content_key(self.subspaces_key(shard, config), config.to_dict())

    def image_embeddings(self, methods: Methods) -> None:
        todo = [
            (s, [c for c in methods.values() if not self.store.has("itc", self.method_key(s, c))])
            for s in self.ranks.strided(self.shards)
        ]
        todo = [(s, sorted(need, key=_by_subspaces)) for s, need in todo if need]  # reuse each tau's subspaces
        with self.bar(sum(len(s) * len(n) for s, n in todo), "image embeddings", "img") as bar:
            for shard, need in todo:
                tokens = self.load_tokens(shard)
                for config in need:
                    emb = []
                    for s in range(0, len(shard), self.options.batch_size):
                        sl = slice(s, s + self.options.batch_size)
                        with self._objects(config, shard, tokens, sl):
                            emb.append(self.heads.image_embeddings(self.model, tokens["tokens"][sl]).float())
                        bar.update(len(emb[-1]))
                    self.store.save("itc", self.method_key(shard, config), _finite(torch.cat(emb), config))
        self.ranks.barrier()

    def _objects(self, config: Optional[QPertConfig], shard: range, tokens, rows, pairs=None):
        """Context that applies ``config`` to a batch (rows of the shard, or pair image indices)."""
        if config is None:
            return nullcontext()
        objects = ImageObjects(self.handle, self.subspaces(shard, config, tokens), config)
        return objects.perturb(pairs if pairs is not None else rows)

    def itc_scores(self, config: Optional[QPertConfig], text_emb: torch.Tensor) -> torch.Tensor:
        """(I, T) ITC scores; unreadable images score -inf so they are never retrieved."""
        rows = []
        for shard in self.shards:
            emb = self.store.load("itc", self.method_key(shard, config))["emb"]
            rows.append(self.heads.itc_scores(emb.to(self.device), text_emb.to(self.device)).cpu())
        return torch.cat(rows)

    # ---------------------------------------------------------------------------- stage 5
    def itm_rerank(
        self, config: Optional[QPertConfig], itc: torch.Tensor, ids, mask, desc: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Final (I, T) matrices for T2I and I2T: ITM + ITC on each query's top k, -inf elsewhere.

        The pairs (sorted by image) are cut into blocks of equal size, so every rank scores as many pairs
        however the large re-ranking lists fall; each rank takes a contiguous run of blocks.
        """
        n_img, n_txt = itc.shape
        k_img, k_txt = min(self.k, n_img), min(self.k, n_txt)
        t2i_top = itc.topk(k_img, dim=0).indices  # (k, T): images per text
        i2t_top = itc.topk(k_txt, dim=1).indices  # (I, k): texts per image
        t2i_pairs = torch.stack([t2i_top.flatten(), torch.arange(n_txt).repeat(k_img)], 1)
        i2t_pairs = torch.stack([torch.arange(n_img).repeat_interleave(k_txt), i2t_top.flatten()], 1)
        pairs = torch.unique(torch.cat([t2i_pairs, i2t_pairs]), dim=0)  # sorted by image
        size = self.options.pairs_per_block
        blocks = [pairs[s : s + size] for s in range(0, len(pairs), size)]
        keys = [self.itm_key(config, block) for block in blocks]
        mine = [b for b in self.ranks.contiguous(len(blocks)) if not self.store.has("itm", keys[b])]
        started = time.perf_counter()
        with self.bar(sum(len(blocks[b]) for b in mine), desc, "pair") as bar:
            for b in mine:
                self.store.save("itm", keys[b], _finite(self._itm(config, blocks[b], ids, mask, bar), config, "logits"))
                self.itm_pairs += len(blocks[b])
        self.itm_seconds += time.perf_counter() - started
        self.ranks.barrier()
        logits = torch.cat([self.store.load("itm", key)["logits"] for key in keys]) if keys else torch.empty(0)
        final = itc.clone()
        final[pairs[:, 0], pairs[:, 1]] += logits
        t2i = torch.full_like(itc, -torch.inf)
        t2i[t2i_pairs[:, 0], t2i_pairs[:, 1]] = final[t2i_pairs[:, 0], t2i_pairs[:, 1]]
        i2t = torch.full_like(itc, -torch.inf)
        i2t[i2t_pairs[:, 0], i2t_pairs[:, 1]] = final[i2t_pairs[:, 0], i2t_pairs[:, 1]]
        return t2i.numpy(), i2t.numpy()

    def _shards_of(self, block: torch.Tensor) -> list[tuple[range, torch.Tensor]]:
        """The block's pairs grouped by the shard of their image, in order."""
        size = self.options.shard_size
        groups = []
        for index in (block[:, 0] // size).unique().tolist():
            shard = self.shards[index]
            groups.append((shard, block[(block[:, 0] >= shard.start) & (block[:, 0] < shard.stop)]))
        return groups

    def itm_key(self, config: Optional[QPertConfig], block: torch.Tensor) -> str:
        return content_key(
            "itm-block", [self.method_key(shard, config) for shard, _ in self._shards_of(block)], block.tolist()
        )

    def _itm(self, config, block: torch.Tensor, ids, mask, bar) -> torch.Tensor:
        out = []
        for shard, chunk in self._shards_of(block):
            tokens = self.load_tokens(shard)
            for s in range(0, len(chunk), self.options.itm_batch_size):
                part = chunk[s : s + self.options.itm_batch_size]
                local = part[:, 0] - shard.start
                with self._objects(config, shard, tokens, None, pairs=local):
                    out.append(
                        self.heads.itm_scores(
                            self.model, tokens["tokens"], ids[part[:, 1]], mask[part[:, 1]], image_index=local
                        )
                    )  # kept on the device: no wait per batch
                bar.update(len(part))
        return torch.cat(out).cpu()

    # ---------------------------------------------------------------------------- object-embedding baseline
    def object_similarities(self, text_emb: torch.Tensor, itc: torch.Tensor) -> torch.Tensor:
        """(I, T) best object similarity per image and text; ``itc`` (the baseline's) where an image has none."""
        texts = content_key("text", self.model_key, self.dataset.texts)
        keys = {
            shard.start: content_key("objects", self.tokens_key(shard), [self.boxes[i].tolist() for i in shard], texts)
            for shard in self.shards
        }
        for shard in self.ranks.strided(self.shards):
            key = keys[shard.start]
            if not self.store.has("objects", key):
                boxes = [self.boxes[i].tolist() for i in shard]
                tokens = self.load_tokens(shard)
                boxes = [b if ok else [] for b, ok in zip(boxes, tokens["readable"].tolist())]
                masks = object_masks(self.handle.layout, boxes, tokens["sizes"].tolist(), tokens["tokens"].shape[1])
                sims = object_similarities(
                    self.model, self.heads, tokens["tokens"], masks, text_emb, itc[shard.start : shard.stop]
                )
                self.store.save("objects", key, {"sims": sims})
        self.ranks.barrier()
        return torch.cat([self.store.load("objects", keys[shard.start])["sims"] for shard in self.shards])

    def readable(self) -> np.ndarray:
        return np.concatenate([self.store.load("tokens", self.tokens_key(s))["readable"].numpy() for s in self.shards])


def _finite(values: torch.Tensor, config: Optional[QPertConfig], name: str = "emb") -> dict[str, torch.Tensor]:
    """``{name: values}`` to cache, if finite: an overflow is said as ``qpert score`` says it, never cached."""
    if not torch.isfinite(values).all():
        raise non_finite_scores("baseline" if config is None else method_name(config), config)
    return {name: values}


def _by_subspaces(config: Optional[QPertConfig]) -> tuple[bool, str]:
    """Methods sharing subspaces (same rank rule, compat and projector) run one after the other."""
    return config is not None, repr((config.threshold, config.rank, config.compat, config.projector)) if config else ""


def _boxes_of(boxes: BoxSet, image_id: str, compat: str) -> np.ndarray:
    """An image's boxes; ``compat="official"`` takes them as the official loader gave them (unclipped)."""
    if image_id not in boxes.images:
        return np.zeros((0, 4), np.float32)
    found = boxes[image_id]
    return found.source_boxes if compat == "official" and found.source_boxes is not None else found.boxes


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = Path(path).stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _open_image(path: Path) -> Optional[Image.Image]:
    """The decoded RGB image, or None (logged) when it is missing or not an image."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("skipping unreadable image %s: %s", path, e)
        return None


def evaluate(
    loaded: LoadedModel,
    dataset: RetrievalDataset,
    boxes: BoxSet,
    methods: Methods,
    options: Optional[EvalOptions] = None,
    bin_boxes: Optional[BoxSet] = None,
    ranks: Optional[Ranks] = None,
) -> EvalResult:
    """R@K / mR@K of every method on ``dataset``, all from one shared feature cache.

    Args:
        loaded: the model (:func:`qpert.load_model`); its family must have retrieval heads.
        dataset: a :class:`~qpert.data.datasets.RetrievalDataset` (``load_dataset``).
        boxes: the box source that perturbs; bin_boxes: the one that places each image in its mR@K
            area bin (default: the same; the paper bins Flickr30K by Entities even for detector rows).
        methods: name -> :class:`QPertConfig`, or None for the unmodified model.
        options: :class:`EvalOptions`.
        ranks: this process's place under ``torchrun`` (``qpert.distributed.start()``); every rank calls
            ``evaluate`` and gets the same result.

    Returns:
        :class:`EvalResult`.

    Raises:
        ConfigError: methods of another compat than ``options.compat``; DataError: a shard without any
        readable image.
    """
    options = options or EvalOptions()
    mixed = {n: c.compat for n, c in methods.items() if c is not None and c.compat != options.compat}
    if mixed:
        raise ConfigError(
            f"methods {sorted(mixed)} use compat {sorted(set(mixed.values()))} but the evaluation runs "
            f"compat={options.compat!r}: one evaluation uses one set of conventions"
        )
    bin_boxes = bin_boxes or boxes
    started = time.time()
    ranks = ranks or Ranks()
    run = _Run(loaded, dataset, boxes, options, ranks)
    try:
        run.vision_tokens()
        text_emb, ids, mask = run.text_embeddings()
        run.image_embeddings({**methods, "baseline": None} if options.object_baseline else methods)
        readable = run.readable()
        skipped = [dataset.image_ids[i] for i in np.flatnonzero(~readable)]
        if skipped:
            log.warning(
                "%d unreadable image(s) left out of the gallery with their captions: %s", len(skipped), skipped[:10]
            )
        keep_txt = readable[dataset.text_to_image]
        remap = np.cumsum(readable) - 1
        text_to_image = remap[dataset.text_to_image[keep_txt]]
        max_areas = bin_boxes.max_areas(
            [i for i, ok in zip(dataset.image_ids, readable) if ok], convention=options.compat
        )
        metrics, scores = {}, {}
        runs = [(name, config, False) for name, config in methods.items()]
        runs += [("object-embedding", None, True)] if options.object_baseline else []
        for name, config, add_objects in runs:
            itc = run.itc_scores(config, text_emb)
            itc[torch.from_numpy(~readable)] = -torch.inf
            if add_objects:
                itc = itc + run.object_similarities(text_emb, itc)
            if run.itm:
                t2i, i2t = run.itm_rerank(config, itc, ids, mask, f"ITM re-ranking [{name}]")
            else:
                t2i = i2t = itc.numpy()
            t2i, i2t = t2i[readable][:, keep_txt], i2t[readable][:, keep_txt]
            metrics[name] = retrieval_metrics(t2i, text_to_image, max_areas, i2t_scores=i2t, convention=options.compat)
            if options.keep_scores:
                scores[name] = t2i
    except DiskFullError as e:
        raise DiskFullError(
            f"{e}; the feature cache keeps every file finished before: free some space (or give another "
            "--cache-dir) and run the same command again, it resumes"
        ) from e
    finally:
        run.handle.detach()
    settings = {
        "model": loaded.name,
        "dataset": dataset.name,
        "split": dataset.split,
        "boxes": boxes.source,
        "boxes_summary": boxes.summary(),
        "bin_boxes": bin_boxes.source,
        "compat": options.compat,
        "num_images": int(readable.sum()),
        "num_texts": int(keep_txt.sum()),
        "itm": run.itm,
        "k": run.k,
        "dtype": str(run.dtype).replace("torch.", ""),
        "device": str(run.device),
        "methods": {n: (c.to_dict() if c else None) for n, c in methods.items()},
        "object_baseline": options.object_baseline,
        "compiled": options.compile_vision,
        "world_size": ranks.world,
        "exclude_sites": list(options.exclude_sites),
        "seconds": round(time.time() - started, 1),
    }
    rates = ranks.gather(run.itm_pairs / run.itm_seconds if run.itm_seconds > 0 and run.itm_pairs else 0.0)
    return EvalResult(metrics, settings, skipped, scores, rates)


#: The paper's tau grid.
PAPER_THRESHOLDS: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 0.99)


def paper_grid(alphas: Sequence[float], thresholds: Sequence[float] = PAPER_THRESHOLDS) -> list[QPertConfig]:
    """The paper's search space: alpha x the five weight functions x tau."""
    return [
        QPertConfig(alpha=a, weight=w, threshold=t) for t in thresholds for w in WEIGHT_COEFFICIENTS for a in alphas
    ]
