"""Q-Pert's cost on the full-size BLIP-2 retrieval architecture (random weights, no download).

Measures, in one run and interleaved (baseline, Q-Pert, baseline, ...), the time to encode a
batch of images (vision tower + Q-Former ITC pass) with and without Q-Pert (~10 boxes per image,
subspaces built on the fly), Q-Pert's own parts, and the ITM pass over (image, text) pairs with
cached vision tokens and cached subspaces. Prints a table of medians and overhead ratios.

    python bench/overhead.py --image-size 364 --batch 2 --pairs 32 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Optional

import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval

import qpert
from qpert.core import prepare_boxes, token_weights
from qpert.models import blip2 as B


def full_size_blip2(image_size: int, device: str, dtype: torch.dtype) -> Blip2ForImageTextRetrieval:
    """The default Blip2Config is ViT-g/14 + the 12-layer Q-Former of the released checkpoints."""
    config = Blip2Config(use_qformer_text_input=True)
    config.qformer_config.use_qformer_text_input = True  # the retrieval checkpoints' Q-Former reads text
    config.vision_config.image_size = image_size
    with torch.device(device):  # initialized where it runs: ViT-g's 1B weights take a minute on a CPU
        model = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():  # zero query tokens would make the perturbation a no-op (same cost, but unrealistic)
        model.query_tokens.normal_(0, 0.02)
    return model.to(device, dtype).eval()


def random_boxes(n_images: int, n_boxes: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n_images, n_boxes, 2, generator=g) * size * 0.8
    wh = torch.rand(n_images, n_boxes, 2, generator=g) * size * 0.4 + 4
    return list(torch.cat([xy, (xy + wh).clamp(max=size)], -1))


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired(base: Callable, pert: Callable, repeats: int, device: str) -> tuple[float, float, float]:
    """Median times of both and the median of per-pair ratios (robust to a drifting machine)."""
    base(), pert()  # warm-up
    tb, tp = [], []
    for _ in range(repeats):
        tb.append(timed(base, device))
        tp.append(timed(pert, device))
    return statistics.median(tb), statistics.median(tp), statistics.median(p / b for p, b in zip(tp, tb))


def measure_overhead(
    image_size: int,
    batch: int,
    n_boxes: int,
    pairs: int,
    repeats: int,
    device: str,
    dtype: torch.dtype,
    model: Optional[Blip2ForImageTextRetrieval] = None,
) -> dict[str, tuple]:
    """{step: (baseline s, Q-Pert s or None, median ratio or None)} for one input size."""
    torch.manual_seed(0)
    model = model if model is not None else full_size_blip2(image_size, device, dtype)
    handle = qpert.attach(model, qpert.QPertConfig(alpha=8.0, weight="constant", threshold=0.99))
    pixels = torch.randn(batch, 3, image_size, image_size, device=device, dtype=dtype)
    boxes = random_boxes(batch, n_boxes, image_size, seed=1)
    sizes = [(image_size, image_size)] * batch
    rows = {}

    def encode():
        return B.image_embeddings(model, B.image_tokens(model, pixels))

    def encode_qpert():
        with handle.objects(boxes, sizes):
            return encode()

    rows[ENCODING] = paired(encode, encode_qpert, repeats, device)

    tokens = B.image_tokens(model, pixels)
    box_batch = prepare_boxes(boxes, sizes)
    parts = {
        WEIGHTS: lambda: token_weights(box_batch, handle.layout),
        SUBSPACES: lambda: handle.compute_subspaces(tokens, boxes, sizes),
    }
    for name, fn in parts.items():
        fn()
        rows[name] = (statistics.median(timed(fn, device) for _ in range(repeats)), None, None)

    subspaces = handle.compute_subspaces(tokens, boxes, sizes)

    def itc():
        return B.image_embeddings(model, tokens)

    def itc_qpert():
        with handle.objects(subspaces=subspaces):
            return itc()

    rows[QUERIES] = paired(itc, itc_qpert, repeats, device)
    pair_img = torch.arange(pairs) % batch
    ids = torch.randint(1000, 20000, (pairs, 35), device=device)
    mask = torch.ones_like(ids)
    pair_subs = subspaces.select(pair_img)

    def itm():  # as the pipeline runs it: keys and values projected once per image
        return B.itm_scores(model, tokens, ids, mask, image_index=pair_img)

    def itm_qpert():
        with handle.objects(subspaces=pair_subs):
            return itm()

    rows[itm_row(pairs)] = paired(itm, itm_qpert, repeats, device)
    pair_tokens = tokens[pair_img.to(device)]
    rows[ITM_PER_PAIR] = (
        statistics.median(timed(lambda: B.itm_scores(model, pair_tokens, ids, mask), device) for _ in range(repeats)),
        None,
        None,
    )
    handle.detach()
    return rows


ENCODING = "image encoding (vision + Q-Former ITC)"
WEIGHTS = "  part: token weights"
SUBSPACES = "  part: keys + subspaces (all layers)"
QUERIES = "  Q-Former ITC pass, cached tokens (+ query perturbation)"


ITM_PER_PAIR = "  ITM baseline, keys/values projected per pair (no sharing)"


def itm_row(pairs: int) -> str:
    return f"ITM, {pairs} pairs, cached tokens + subspaces"


def own_share(rows: dict[str, tuple]) -> float:
    """Q-Pert's own work (token weights + keys + subspaces) as a share of the baseline encoding."""
    return (rows[WEIGHTS][0] + rows[SUBSPACES][0]) / rows[ENCODING][0]


def print_rows(rows: dict[str, tuple]) -> None:
    print(f"{'step':58s} {'baseline s':>11s} {'Q-Pert s':>9s} {'overhead':>9s}")
    for name, (tb, tp, ratio) in rows.items():
        if tp is None:
            print(f"{name:58s} {tb:11.4f}")
        else:
            print(f"{name:58s} {tb:11.4f} {tp:9.4f} {100 * (ratio - 1):+8.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=364, help="224 (blip2-itm-vit-g) or 364 (-coco)")
    ap.add_argument("--batch", type=int, default=2, help="images per encoding batch")
    ap.add_argument("--boxes", type=int, default=10, help="boxes per image")
    ap.add_argument("--pairs", type=int, default=32, help="(image, text) pairs per ITM batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    rows = measure_overhead(args.image_size, args.batch, args.boxes, args.pairs, args.repeats, args.device, dtype)
    header = (
        f"qpert {qpert.__version__} | BLIP-2 ViT-g + Q-Former (random weights), {args.image_size}px, "
        f"{args.boxes} boxes/image, batch {args.batch}, {args.dtype}, {args.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(header)
    print_rows(rows)
    print(
        f"Q-Pert's own work per encoding batch (token weights + keys + subspaces): "
        f"{100 * own_share(rows):.2f}% of the baseline encoding (the end-to-end ratio above is noisier)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "setup": header,
                    "rows": {k: dict(zip(("baseline_s", "qpert_s", "ratio"), v)) for k, v in rows.items()},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
