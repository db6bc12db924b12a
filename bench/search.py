"""Photo search speed: FAISS search latency on a synthetic gallery, and indexing throughput on CPU.

Search: 100,000 random unit vectors of dimension 256, either one per image (100k images, as
CoCa/SigLIP store) or 32 per image (3,125 images x the 32 query tokens of BLIP-2), for the exact
``flat`` index and the approximate ``hnsw`` / ``ivf`` ones: build time, single-query latency
(median and 95th percentile) and recall@10 against ``flat``. The vectors are drawn around 1,000
random centres (embeddings of real photos cluster; uniform noise in 256 dimensions has no
neighbours worth the name) and each query is a noisy copy of a random centre.

Indexing: a folder of generated photos indexed with a tiny random BLIP-2 and a tiny random DETR
(what the pipeline itself costs: decoding, hashing, detection and encoding calls, SQLite, FAISS),
then re-run with nothing changed, then re-run with new Q-Pert settings (re-embedding from the
stored boxes and tokens, no detection, no vision encoding).

    OMP_NUM_THREADS=1 python bench/search.py --photos 300 --json bench/out/search.json

The other photo-search benchmarks: ``bench/indexing.py`` (the presets end to end on their real
architectures: photos/s, stage shares, peak RSS, unchanged re-run, detectors, Q-Pert's breakdown) and
``bench/query_boxes.py`` (query-aware boxes: latency added per query, index-time cost, disk per photo).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def search_latency(vectors_total: int, per_image: int, dim: int, queries: int, seed: int = 0) -> list[dict]:
    from qpert.search.vectors import KINDS, VectorIndex

    rng = np.random.default_rng(seed)
    n = vectors_total // per_image
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    vectors = _unit(
        centres[rng.integers(0, len(centres), size=(n, per_image))]
        + 0.7 * rng.normal(size=(n, per_image, dim)).astype(np.float32)
    )
    texts = _unit(centres[rng.integers(0, len(centres), size=queries)] + rng.normal(size=(queries, dim)))
    ids = np.arange(n)
    rows, exact = [], None
    for kind in KINDS:
        start = time.perf_counter()
        index = VectorIndex.build(ids, vectors, kind)
        build = time.perf_counter() - start
        times, found = [], []
        for q in texts:
            start = time.perf_counter()
            got, _ = index.search(q, 10)
            times.append(time.perf_counter() - start)
            found.append(got[0])
        if kind == "flat":
            exact = found
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
        rows.append(
            {
                "kind": kind,
                "images": n,
                "vectors_per_image": per_image,
                "build_s": round(build, 3),
                "median_ms": round(1000 * float(np.median(times)), 3),
                "p95_ms": round(1000 * float(np.percentile(times, 95)), 3),
                "recall@10": round(recall, 3),
            }
        )
    return rows


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def indexing_throughput(photos: int, batch_size: int) -> list[dict]:
    from helpers.search_fixtures import save_tiny_blip2, save_tiny_detr, write_photo

    import qpert
    from qpert.search.detectors import DetectorOptions
    from qpert.search.indexer import IndexSettings, build_index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(photos):
            write_photo(root / "photos" / f"{i // 100:02d}" / f"p{i:05d}.jpg", seed=i, size=(240, 320))
        settings = IndexSettings(
            model=str(save_tiny_blip2(root / "blip2")),
            detector=str(save_tiny_detr(root / "detr")),
            detector_options=DetectorOptions(score_threshold=0.0, max_boxes=5),
            qpert=qpert.QPertConfig(alpha=4.0),
        )
        rows = []
        for what, run_settings in (
            ("first index", settings),
            ("re-run, nothing changed", settings),
            (
                "re-run, new alpha (re-embed)",
                IndexSettings(**{**settings.__dict__, "qpert": qpert.QPertConfig(alpha=2.0)}),
            ),
        ):
            start = time.perf_counter()
            report = build_index(
                root / "photos", root / "index", run_settings, device="cpu", batch_size=batch_size, progress=False
            )
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "run": what,
                    "photos": report.photos,
                    "seconds": round(seconds, 2),
                    "photos_per_s": round(report.photos / seconds, 1),
                }
            )
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "search": search_latency(args.vectors, 1, args.dim, args.queries)
        + search_latency(args.vectors, 32, args.dim, args.queries),
        "indexing": indexing_throughput(args.photos, args.batch_size),
    }
    print(f"{'index':6s} {'images':>7s} {'vec/img':>7s} {'build s':>8s} {'median ms':>10s} {'p95 ms':>8s} {'R@10':>6s}")
    for r in result["search"]:
        print(
            f"{r['kind']:6s} {r['images']:7d} {r['vectors_per_image']:7d} {r['build_s']:8.2f} {r['median_ms']:10.3f} "
            f"{r['p95_ms']:8.3f} {r['recall@10']:6.3f}"
        )
    print()
    for r in result["indexing"]:
        print(f"{r['run']:30s} {r['photos']:5d} photos {r['seconds']:7.2f} s {r['photos_per_s']:7.1f} photos/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
