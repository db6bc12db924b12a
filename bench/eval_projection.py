"""Time a full-size BLIP-2 evaluation on a small synthetic gallery; project Flickr30K and COCO-5K.

Runs the real `qpert eval` pipeline stage by stage (random weights, no download) on G random
images with 5 captions each, baseline and one Q-Pert setting together, ITM re-ranking included,
then scales each stage by the benchmark's counts: images, texts, and ITM pairs
(about (texts + images) x k per method, the union of both directions' top k), on one process and
on 8 (``torchrun --nproc_per_node 8 -m qpert eval``: every stage splits into equal shares; the
projection is that ideal share, without the reads of other ranks' features from the shared cache).

    python bench/eval_projection.py --image-size 364 --images 4 --k 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from overhead import full_size_blip2
from PIL import Image

import qpert
from qpert.data.box_sources import BoxSet, ImageBoxes
from qpert.data.datasets import RetrievalDataset
from qpert.distributed import Ranks
from qpert.eval.pipeline import EvalOptions, _Run
from qpert.models.registry import LoadedModel
from qpert.models.tiny import tiny_processor

BENCHMARKS = {"Flickr30K 1K test": (1000, 5000), "COCO 5K test": (5000, 25000)}
#: Process counts the projection is given for.
WORLD_SIZES = (1, 8)
WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "with",
    "red",
    "blue",
    "small",
    "big",
    "ball",
    "hat",
    "on",
    "the",
    "in",
    "street",
    "park",
    "holding",
]


def synthetic_gallery(folder: Path, n_images: int, seed: int) -> tuple[RetrievalDataset, BoxSet]:
    rng = np.random.default_rng(seed)
    paths, texts, boxes = [], [], {}
    for i in range(n_images):
        w, h = int(rng.integers(300, 640)), int(rng.integers(300, 640))
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
        texts += [" ".join(rng.choice(WORDS, size=10)) for _ in range(5)]
        xy = rng.uniform(0, [w * 0.8, h * 0.8], size=(10, 2))
        wh = rng.uniform(8, [w * 0.4, h * 0.4], size=(10, 2))
        boxes[str(i)] = ImageBoxes(np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32), (h, w))
    ids = [str(i) for i in range(n_images)]
    dataset = RetrievalDataset(
        "synthetic",
        "test",
        ids,
        ids,
        paths,
        texts,
        np.repeat(np.arange(n_images), 5),
        [list(range(5 * i, 5 * i + 5)) for i in range(n_images)],
    )
    return dataset, BoxSet("random", boxes, [])


def measure_projection(
    image_size: int,
    n_images: int,
    k: int,
    batch_size: int,
    itm_batch_size: int,
    device: str,
    dtype: torch.dtype,
    model: Optional[torch.nn.Module] = None,
) -> dict:
    """Per-item costs of the real pipeline's stages on a small gallery, and the benchmarks' projected time."""
    with tempfile.TemporaryDirectory() as tmp:
        dataset, boxes = synthetic_gallery(Path(tmp), n_images, seed=0)
        processor = tiny_processor(WORDS, tmp, image_size=image_size)
        model = model if model is not None else full_size_blip2(image_size, device, dtype)
        loaded = LoadedModel("blip2-full-size-random", model, processor, None)
        methods = {"baseline": None, "qpert": qpert.QPertConfig(alpha=8.0)}
        options = EvalOptions(
            itm=True, k=k, batch_size=batch_size, itm_batch_size=itm_batch_size, shard_size=64, progress=False
        )
        run = _Run(loaded, dataset, boxes, options, Ranks())
        times = {}

        def stage(name, fn):
            start = time.perf_counter()
            out = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name] = time.perf_counter() - start
            return out

        stage("vision tokens", run.vision_tokens)
        text_emb, ids, mask = stage("text features", run.text_embeddings)
        stage("image embeddings", lambda: run.image_embeddings(methods))
        per_pair = {}
        for name, config in methods.items():
            itc = run.itc_scores(config, text_emb)
            n_img, n_txt = itc.shape
            pairs = len(
                set(zip(itc.topk(k, 0).indices.flatten().tolist(), np.tile(np.arange(n_txt), k)))
                | set(zip(np.repeat(np.arange(n_img), k), itc.topk(k, 1).indices.flatten().tolist()))
            )
            stage(
                f"ITM [{name}]",
                lambda config=config, itc=itc, name=name: run.itm_rerank(config, itc, ids, mask, name),
            )
            per_pair[name] = times[f"ITM [{name}]"] / pairs
        run.handle.detach()
        n_texts = len(dataset.texts)
    per_image = (times["vision tokens"] + times["image embeddings"]) / n_images
    per_text = times["text features"] / n_texts
    projections = {}
    for bench, (n_img, n_txt) in BENCHMARKS.items():
        itc_s = n_img * per_image + n_txt * per_text
        itm_s = (n_img + n_txt) * 64 * sum(per_pair.values())
        projections[bench] = {
            world: {"itc_s": itc_s / world, "itm_s": itm_s / world, "total_min": (itc_s + itm_s) / world / 60}
            for world in WORLD_SIZES
        }
    return {
        "per_image_s": per_image,
        "per_text_s": per_text,
        "per_itm_pair_s": per_pair,
        "stage_s": times,
        "gallery": {"images": n_images, "texts": n_texts, "k": k},
        "projections": projections,
    }


def print_projection(result: dict) -> None:
    per_pair = result["per_itm_pair_s"]
    print(
        f"  per image (vision + ITC embeddings, both methods): {result['per_image_s']:.4f} s; "
        f"per text {result['per_text_s'] * 1e3:.2f} ms; ITM per pair: baseline {per_pair['baseline'] * 1e3:.2f} ms, "
        f"Q-Pert {per_pair['qpert'] * 1e3:.2f} ms ({100 * (per_pair['qpert'] / per_pair['baseline'] - 1):+.1f}%)"
    )
    for bench, by_world in result["projections"].items():
        for world, p in by_world.items():
            print(
                f"  projected {bench}, baseline + Q-Pert, ITC + ITM top-64 both directions, {world} process"
                f"{'es' if world > 1 else ''}: ITC stages {p['itc_s'] / 60:.1f} min + ITM {p['itm_s'] / 60:.1f} min "
                f"= {p['total_min']:.1f} min"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=364)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--k", type=int, default=4, help="top k re-ranked here (the projection uses 64)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--itm-batch-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    result = measure_projection(
        args.image_size, args.images, args.k, args.batch_size, args.itm_batch_size, args.device, dtype
    )
    print(
        f"full-size BLIP-2 (random weights), {args.image_size}px, {args.dtype}, {args.device}, "
        f"{torch.get_num_threads()} threads; gallery {args.images} images, k={args.k}"
    )
    print_projection(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
