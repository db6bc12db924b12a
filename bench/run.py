"""One benchmark entry point: Q-Pert's cost and the projected benchmark times, at full size.

Builds the full-size architectures with random weights (no download) — BLIP-2 ViT-g + Q-Former
at each ``--sizes`` input size, and OpenCLIP CoCa ViT-L/14 when open_clip is installed — and
measures in one run, baseline and Q-Pert interleaved:

* image encoding with and without Q-Pert (images/s, overhead) and Q-Pert's own parts (token
  weights, keys + subspaces, the query perturbation inside the Q-Former pass);
* ITM pairs/s with cached vision tokens and subspaces, with and without Q-Pert;
* the real ``qpert eval`` pipeline on a small gallery, scaled to Flickr30K (1K images, 5K texts)
  and COCO-5K (5K images, 25K texts): ITC + ITM top-64 both directions, baseline and Q-Pert together;
* peak memory (GPU allocator, or the process's resident set on CPU).

Prints one table per model and writes everything as JSON.

    python bench/run.py                                                   # CPU, batch 2
    python bench/run.py --device cuda --dtype fp16 --batch 32 --pairs 512 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import qpert  # noqa: E402
from eval_projection import measure_projection, print_projection  # noqa: E402
from overhead import (ENCODING, full_size_blip2, itm_row, measure_overhead, own_share, paired,  # noqa: E402
                      print_rows, random_boxes)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def bench_blip2(size: int, args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model = full_size_blip2(size, args.device, dtype)
    rows = measure_overhead(size, args.batch, args.boxes, args.pairs, args.repeats, args.device, dtype, model)
    projection = measure_projection(size, args.gallery, args.k, args.batch, args.pairs, args.device, dtype, model)
    encode_b, encode_q, ratio = rows[ENCODING]
    itm_b, itm_q, itm_ratio = rows[itm_row(args.pairs)]
    summary = {"images_per_s": [args.batch / encode_b, args.batch / encode_q], "encoding_overhead": ratio - 1,
               "own_work_share": own_share(rows), "itm_pairs_per_s": [args.pairs / itm_b, args.pairs / itm_q],
               "itm_overhead": itm_ratio - 1, "peak_memory_gb": peak_memory_gb(args.device)}
    del model
    return {"rows": {k: dict(zip(("baseline_s", "qpert_s", "ratio"), v)) for k, v in rows.items()},
            "summary": summary, "projection": projection}


def bench_coca(args: argparse.Namespace) -> dict:
    """CoCa ViT-L/14 image encoding (ViT + contrastive attentional pooler), with and without Q-Pert."""
    import open_clip

    from qpert.models import coca

    dtype = DTYPES[args.dtype]
    model = open_clip.create_model("coca_ViT-L-14", pretrained=None).to(args.device, dtype).eval()
    handle = qpert.attach(model, qpert.QPertConfig(alpha=0.6))
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    pixels = torch.randn(args.batch, 3, size, size, device=args.device, dtype=dtype)
    boxes, sizes = random_boxes(args.batch, args.boxes, size, seed=1), [(size, size)] * args.batch
    retriever = coca.COCA.retriever

    def encode():
        with torch.no_grad():
            return retriever.image_embeddings(model, retriever.image_tokens(model, pixels))

    def encode_qpert():
        with handle.objects(boxes, sizes):
            return encode()

    base, pert, ratio = paired(encode, encode_qpert, args.repeats, args.device)
    handle.detach()
    return {"image_size": size, "images_per_s": [args.batch / base, args.batch / pert], "encoding_overhead": ratio - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--sizes", default="224,364", help="BLIP-2 input sizes (224: blip2, 364: blip2-coco)")
    ap.add_argument("--batch", type=int, default=2, help="images per encoding batch")
    ap.add_argument("--boxes", type=int, default=10, help="boxes per image")
    ap.add_argument("--pairs", type=int, default=32, help="(image, text) pairs per ITM batch")
    ap.add_argument("--gallery", type=int, default=4, help="images of the pipeline run that is projected")
    ap.add_argument("--k", type=int, default=4, help="top k re-ranked in that run (the projection uses 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-coca", action="store_true", help="skip CoCa ViT-L/14")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {"date": datetime.date.today().isoformat(), "device": device_name, "torch": torch.__version__,
              "qpert": qpert.__version__, "args": {k: str(v) for k, v in vars(args).items()}, "blip2": {}}
    print(f"qpert {qpert.__version__} bench on {device_name}, {args.dtype}, batch {args.batch}, {args.boxes} boxes/image, "
          f"torch {torch.__version__}")
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"\nBLIP-2 ViT-g + Q-Former, random weights, {size} px")
        r = result["blip2"][size] = bench_blip2(size, args)
        print_rows({k: (v["baseline_s"], v["qpert_s"], v["ratio"]) for k, v in r["rows"].items()})
        s = r["summary"]
        print(f"  images/s {s['images_per_s'][0]:.2f} -> {s['images_per_s'][1]:.2f} ({100 * s['encoding_overhead']:+.2f}%), "
              f"Q-Pert's own work {100 * s['own_work_share']:.2f}% of encoding; ITM pairs/s {s['itm_pairs_per_s'][0]:.1f} "
              f"-> {s['itm_pairs_per_s'][1]:.1f} ({100 * s['itm_overhead']:+.2f}%); peak memory {s['peak_memory_gb']:.1f} GB")
        print_projection(r["projection"])
    if not args.no_coca:
        try:
            result["coca_l14"] = bench_coca(args)
            c = result["coca_l14"]
            print(f"\nCoCa ViT-L/14, random weights, {c['image_size']} px: images/s {c['images_per_s'][0]:.2f} -> "
                  f"{c['images_per_s'][1]:.2f} ({100 * c['encoding_overhead']:+.2f}%)")
        except ImportError:
            print("\nCoCa skipped: open_clip is not installed (pip install open_clip_torch)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
