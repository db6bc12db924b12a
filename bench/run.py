"""One benchmark entry point: Q-Pert's cost and the projected benchmark times, at full size.

Builds the full-size architectures with random weights (no download) — BLIP-2 ViT-g + Q-Former
at each ``--sizes`` input size, and OpenCLIP CoCa ViT-L/14 when open_clip is installed — and
measures in one run, baseline and Q-Pert interleaved:

* image encoding with and without Q-Pert (images/s, overhead) and Q-Pert's own parts (token
  weights, keys + subspaces, the query perturbation inside the Q-Former pass);
* ITM pairs/s with cached vision tokens and subspaces, with and without Q-Pert, and the speed-up of
  projecting each image's keys and values once instead of once per pair;
* the real ``qpert eval`` pipeline on a small gallery, scaled to Flickr30K (1K images, 5K texts)
  and COCO-5K (5K images, 25K texts): ITC + ITM top-64 both directions, baseline and Q-Pert together;
* peak memory (GPU allocator, or the process's resident set on CPU);
* with ``--compile``, the encoding again with the vision encoder compiled (compile time, speed-up
  over eager, Q-Pert's overhead then); the projected times then use the compiled encoder.

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

from eval_projection import measure_projection, print_projection
from overhead import (
    ENCODING,
    ITM_PER_PAIR,
    full_size_blip2,
    itm_row,
    measure_overhead,
    own_share,
    paired,
    print_rows,
    random_boxes,
    timed,
)

import qpert
from qpert.models.registry import retrieval_heads

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
    compiled = (
        compiled_encoding(model, size, args, qpert.QPertConfig(alpha=8.0)) if args.compile else None
    )  # in place: the projection below then runs compiled too
    projection = measure_projection(size, args.gallery, args.k, args.batch, args.pairs, args.device, dtype, model)
    encode_b, encode_q, ratio = rows[ENCODING]
    itm_b, itm_q, itm_ratio = rows[itm_row(args.pairs)]
    summary = {
        "images_per_s": [args.batch / encode_b, args.batch / encode_q],
        "encoding_overhead": ratio - 1,
        "own_work_share": own_share(rows),
        "itm_pairs_per_s": [args.pairs / itm_b, args.pairs / itm_q],
        "itm_overhead": itm_ratio - 1,
        "itm_sharing_speedup": rows[ITM_PER_PAIR][0] / itm_b,
        "peak_memory_gb": peak_memory_gb(args.device),
    }
    del model
    return {
        "rows": {k: dict(zip(("baseline_s", "qpert_s", "ratio"), v)) for k, v in rows.items()},
        "summary": summary,
        "compiled": compiled,
        "projection": projection,
    }


def encoding_times(
    model: torch.nn.Module, size: int, args: argparse.Namespace, config: qpert.QPertConfig
) -> tuple[float, float, float]:
    """Median seconds per batch of image encoding (vision tower + pooling head or Q-Former ITC pass)
    without and with Q-Pert (subspaces built on the fly), and the median ratio."""
    retriever = retrieval_heads(model)
    handle = qpert.attach(model, config)
    pixels = torch.randn(args.batch, 3, size, size, device=args.device, dtype=DTYPES[args.dtype])
    boxes, sizes = random_boxes(args.batch, args.boxes, size, seed=1), [(size, size)] * args.batch

    def encode():
        with torch.no_grad():
            return retriever.image_embeddings(model, retriever.image_tokens(model, pixels))

    def encode_qpert():
        with handle.objects(boxes, sizes):
            return encode()

    try:
        return paired(encode, encode_qpert, args.repeats, args.device)
    finally:
        handle.detach()


def compiled_encoding(model: torch.nn.Module, size: int, args: argparse.Namespace, config: qpert.QPertConfig) -> dict:
    """After ``qpert.compile_vision_encoder``: compile time, the vision encoder eager against compiled
    (interleaved), and the encoding with and without Q-Pert through the compiled encoder."""
    retriever = retrieval_heads(model)
    encoder = qpert.compile_vision_encoder(model)
    compiled_call = encoder._compiled_call_impl  # what nn.Module.compile installed; None runs the module eagerly
    pixels = torch.randn(args.batch, 3, size, size, device=args.device, dtype=DTYPES[args.dtype])

    def vision(compiled: bool):
        def run():
            encoder._compiled_call_impl = compiled_call if compiled else None
            with torch.no_grad():
                return retriever.image_tokens(model, pixels)

        return run

    compile_s = timed(vision(True), args.device)  # the first call compiles
    eager_s, compiled_s, ratio = paired(vision(False), vision(True), args.repeats, args.device)
    encoder._compiled_call_impl = compiled_call
    base, pert, overhead = encoding_times(model, size, args, config)
    return {
        "compile_s": compile_s,
        "vision_encoder_s": [eager_s, compiled_s],
        "speedup_vs_eager": 1 / ratio,
        "images_per_s": [args.batch / base, args.batch / pert],
        "encoding_overhead": overhead - 1,
    }


def print_compiled(c: dict) -> None:
    eager_s, compiled_s = c["vision_encoder_s"]
    print(
        f"  torch.compile'd vision encoder: compiled in {c['compile_s']:.0f} s; {eager_s:.4f} s eager -> "
        f"{compiled_s:.4f} s compiled ({c['speedup_vs_eager']:.2f}x); encoding images/s {c['images_per_s'][0]:.2f} "
        f"-> {c['images_per_s'][1]:.2f} with Q-Pert ({100 * c['encoding_overhead']:+.2f}%)"
    )


def bench_coca(args: argparse.Namespace) -> dict:
    """CoCa ViT-L/14 image encoding (ViT + contrastive attentional pooler), with and without Q-Pert."""
    import open_clip

    model = open_clip.create_model("coca_ViT-L-14", pretrained=None).to(args.device, DTYPES[args.dtype]).eval()
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    config = qpert.QPertConfig(alpha=0.6)
    base, pert, ratio = encoding_times(model, size, args, config)
    result = {
        "image_size": size,
        "images_per_s": [args.batch / base, args.batch / pert],
        "encoding_overhead": ratio - 1,
    }
    if args.compile:
        result["compiled"] = compiled_encoding(model, size, args, config)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time the encoding with the vision encoder torch.compile'd "
        "(qpert.compile_vision_encoder); the projected benchmark times then use it too",
    )
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device_name,
        "torch": torch.__version__,
        "qpert": qpert.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "blip2": {},
    }
    print(
        f"qpert {qpert.__version__} bench on {device_name}, {args.dtype}, batch {args.batch}, "
        f"{args.boxes} boxes/image, torch {torch.__version__}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"\nBLIP-2 ViT-g + Q-Former, random weights, {size} px")
        r = result["blip2"][size] = bench_blip2(size, args)
        print_rows({k: (v["baseline_s"], v["qpert_s"], v["ratio"]) for k, v in r["rows"].items()})
        s = r["summary"]
        print(
            f"  images/s {s['images_per_s'][0]:.2f} -> {s['images_per_s'][1]:.2f} "
            f"({100 * s['encoding_overhead']:+.2f}%), Q-Pert's own work {100 * s['own_work_share']:.2f}% of encoding; "
            f"ITM pairs/s {s['itm_pairs_per_s'][0]:.1f} "
            f"-> {s['itm_pairs_per_s'][1]:.1f} ({100 * s['itm_overhead']:+.2f}%), {s['itm_sharing_speedup']:.2f}x "
            f"faster than projecting keys/values per pair; peak memory {s['peak_memory_gb']:.1f} GB"
        )
        if r["compiled"]:
            print_compiled(r["compiled"])
        print_projection(r["projection"])
    if not args.no_coca:
        try:
            result["coca_l14"] = bench_coca(args)
            c = result["coca_l14"]
            print(
                f"\nCoCa ViT-L/14, random weights, {c['image_size']} px: images/s {c['images_per_s'][0]:.2f} -> "
                f"{c['images_per_s'][1]:.2f} ({100 * c['encoding_overhead']:+.2f}%)"
            )
            if args.compile:
                print_compiled(c["compiled"])
        except ImportError:
            print("\nCoCa skipped: open_clip is not installed (pip install open_clip_torch)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
