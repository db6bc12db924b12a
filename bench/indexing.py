"""End-to-end indexing speed of the ``qpert index`` presets on this CPU: the real architectures of each
preset with random weights (no download), on generated 1024 x 768 JPEGs.

For each preset: photos per second end to end, the share of each stage (read + hash + decode, which
runs in reader threads alongside the models; detection; vision encoding and the baseline head; Q-Pert's
own work, i.e. subspaces and the perturbed head; writing: staging, SQLite and FAISS), and the peak RSS
of a process that indexes that many photos. Then the time of a re-run over an unchanged folder of
``--rerun-photos`` photos (stat only; indexed once with a tiny model, since only the plan matters).

Random weights: the detectors' classification biases are set so that almost every anchor is
background, as in a trained detector (uniformly random scores would make non-maximum suppression,
not the network, dominate the time). They then find no object, so after the detector has run (and
been timed) each photo gets 8 random boxes: Q-Pert does the work of a photo with 8 objects.

    python bench/indexing.py --photos 48 --quality-photos 4 --threads 2 --json bench/out/indexing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

COCO_CLASSES = 91


def write_photos(folder: Path, count: int, size: tuple[int, int] = (768, 1024)) -> None:
    """JPEGs with a few coloured rectangles on smooth noise (compressible like photos, unlike white noise)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(60, 200, size=(size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size[1], size[0]), Image.BILINEAR)
        pixels = np.array(image)
        for _ in range(4):
            h, w = rng.integers(20, 200, size=2)
            y, x = rng.integers(0, size[0] - h), rng.integers(0, size[1] - w)
            pixels[y : y + h, x : x + w] = rng.integers(0, 255, size=3)
        Image.fromarray(pixels).save(folder / f"p{i:05d}.jpg", quality=90)


def background_biased(detector: torch.nn.Module) -> torch.nn.Module:
    """Random weights with a trained detector's score sparsity (see the module docstring)."""
    with torch.no_grad():
        head = getattr(getattr(detector, "head", None), "classification_head", None)
        if head is not None:  # SSD: softmax over classes, background first, per anchor
            for block in head.module_list:
                last = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)][-1]
                last.weight.mul_(1e-3)
                last.bias.zero_()
                last.bias[::COCO_CLASSES] = 10.0
        roi = getattr(detector, "roi_heads", None)
        if roi is not None:  # Faster R-CNN: background is class 0 of the box predictor
            roi.box_predictor.cls_score.weight.mul_(1e-3)
            roi.box_predictor.cls_score.bias.zero_()
            roi.box_predictor.cls_score.bias[0] = 10.0
    return detector


def save_detector(architecture: str, path: Path) -> Path:
    from torchvision.models import get_model

    from qpert.search.detectors import save_torchvision_detector

    torch.manual_seed(0)
    model = get_model(architecture, weights=None, weights_backbone=None, num_classes=COCO_CLASSES)
    save_torchvision_detector(background_biased(model), architecture, [str(i) for i in range(COCO_CLASSES)], path)
    return path


def save_siglip_base(path: Path) -> Path:
    """google/siglip-base-patch16-224's architecture (SiglipConfig's defaults), random weights."""
    from helpers.search_fixtures import save_siglip_folder
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    return save_siglip_folder(SiglipModel(SiglipConfig()), path, image_size=224)


def save_blip2_coco(path: Path) -> Path:
    """Salesforce/blip2-itm-vit-g-coco's architecture (ViT-g/14 at 364 px + Q-Former), random weights."""
    from helpers.search_fixtures import WORDS
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2VisionConfig

    from qpert.models.tiny import tiny_processor

    torch.manual_seed(0)
    config = Blip2Config(vision_config=Blip2VisionConfig(image_size=364).to_dict())
    config.qformer_config.vocab_size = 30524
    Blip2ForImageTextRetrieval(config).save_pretrained(path)
    tiny_processor(WORDS, str(path), image_size=364).save_pretrained(path)
    return path


PRESET_MODELS = {"laptop": save_siglip_base, "quality": save_blip2_coco}


def build_preset(preset: str, root: Path, detector: str) -> None:
    """``root/model`` and ``root/detector``: ``preset``'s architectures with random weights."""
    PRESET_MODELS[preset](root / "model")
    save_detector(detector, root / "detector")


def measure_preset(
    preset: str, photos: int, batch_size: int, threads: int, root: Path, size: tuple[int, int] = (768, 1024)
) -> dict:
    """Index ``photos`` generated JPEGs with the folders :func:`build_preset` wrote; stage times and peak RSS
    (of this process, which loads nothing else)."""
    import qpert
    from qpert.adapters import ImageObjects
    from qpert.search import indexer as indexer_module
    from qpert.search.indexer import IndexSettings, build_index

    torch.set_num_threads(threads)
    model_dir, detector_dir = root / "model", root / "detector"
    write_photos(root / "photos", photos, size)
    stages: dict[str, float] = defaultdict(float)
    Indexer = indexer_module.Indexer

    def timed(owner, name: str, stage: str):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                stages[stage] += time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(Indexer, "_read", "read, hash, decode (reader threads)")
    timed(Indexer, "_detections", "detect")
    detect = Indexer._detections

    def with_objects(self, ready, images, sizes):
        """Random weights find no objects: after the detector ran (and was timed), give each photo
        ``BOXES_PER_PHOTO`` random boxes, so that Q-Pert does the work of a photo with that many objects."""
        found = detect(self, ready, images, sizes)
        return [d if len(d.boxes) else _random_detections(w, h) for d, (h, w) in zip(found, sizes)]

    Indexer._detections = with_objects
    timed(Indexer, "_tokens", "encode (vision tower)")
    timed(Indexer, "merge", "write (SQLite, FAISS)")
    timed(indexer_module.FeatureStore, "save", "write (SQLite, FAISS)")
    timed(ImageObjects, "from_boxes", "Q-Pert (subspaces + perturbed head)")
    original_embeddings = Indexer._embeddings

    def embeddings(self, tokens, detections, images):  # the heads: baseline = encoding, perturbed = Q-Pert
        heads = self.retriever.image_embeddings
        calls = []

        def head(*args, **kwargs):
            t = time.perf_counter()
            try:
                return heads(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - t)

        self.retriever = _Heads(self.retriever, head)
        try:
            return original_embeddings(self, tokens, detections, images)
        finally:
            self.retriever = self.retriever.inner
            stages["encode (vision tower)"] += calls[0]
            stages["Q-Pert (subspaces + perturbed head)"] += calls[1]

    Indexer._embeddings = embeddings
    settings = IndexSettings(
        model=str(model_dir),
        detector=str(detector_dir),
        qpert=qpert.QPertConfig(alpha=0.6 if preset == "laptop" else 8),
    )
    start = time.perf_counter()
    report = build_index(root / "photos", root / "index", settings, device="cpu", batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    assert report.photos == photos, report.summary()
    encode = stages["encode (vision tower)"]
    return {
        "preset": preset,
        "photos": photos,
        "seconds": round(seconds, 2),
        "photos_per_s": round(photos / seconds, 3),
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "qpert_share_of_encoding": round(stages["Q-Pert (subspaces + perturbed head)"] / encode, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "threads": threads,
        "batch_size": batch_size,
    }


BOXES_PER_PHOTO = 8


def _random_detections(width: int, height: int):
    from qpert.search.detectors import Detections

    rng = np.random.default_rng(width * 7919 + height)
    corner = rng.uniform(0, 0.8, size=(BOXES_PER_PHOTO, 2))
    size = rng.uniform(0.03, 0.3, size=(BOXES_PER_PHOTO, 2))
    boxes = np.concatenate([corner, np.minimum(corner + size, 1.0)], 1) * [width, height, width, height]
    return Detections(boxes.astype(np.float32), np.full(BOXES_PER_PHOTO, 0.9, np.float32), ["object"] * BOXES_PER_PHOTO)


class _Heads:
    """The model's retrieval heads with ``image_embeddings`` timed (the rest passed through)."""

    def __init__(self, inner, image_embeddings):
        self.inner, self.image_embeddings = inner, image_embeddings

    def __getattr__(self, name):
        return getattr(self.inner, name)


#: Light detectors considered for the laptop preset, and the paper's (quality); COCO box AP from their model cards.
DETECTORS = {
    "ssdlite320_mobilenet_v3_large": 21.3,
    "fasterrcnn_mobilenet_v3_large_320_fpn": 22.8,
    "fasterrcnn_mobilenet_v3_large_fpn": 32.8,
    "rtdetr_r18vd (transformers)": 46.5,
    "fasterrcnn_resnet50_fpn_v2": 46.7,
}


def detector_speeds(photos: int = 4, size: tuple[int, int] = (768, 1024)) -> list[dict]:
    """ms per photo of each candidate detector on ``size`` images (batch of ``photos``, median of 3 batches)."""
    import statistics

    images = [torch.rand(3, *size) for _ in range(photos)]
    rows = []
    for name, box_ap in DETECTORS.items():
        run = _detector_run(name, images)
        with torch.no_grad():
            run()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        ms = round(1000 * statistics.median(times) / photos)
        rows.append({"detector": name, "coco_box_ap": box_ap, "ms_per_photo": ms})
    return rows


def _detector_run(name: str, images: list[torch.Tensor]):
    """A call detecting ``images`` with ``name``'s architecture (random weights), post-processing included."""
    from PIL import Image
    from torchvision.models import get_model
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig

    torch.manual_seed(0)
    if not name.startswith("rtdetr"):
        model = background_biased(get_model(name, weights=None, weights_backbone=None, num_classes=COCO_CLASSES))
        return lambda: model.eval()(images)
    # PekingU/rtdetr_r18vd's architecture: ResNet-18-vd backbone, hybrid encoder, 3 decoder layers
    backbone = RTDetrResNetConfig(
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        downsample_in_bottleneck=True,
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrConfig(
        backbone_config=backbone, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5, decoder_layers=3
    )
    model, processor = RTDetrForObjectDetection(config).eval(), RTDetrImageProcessor()
    pil = [Image.fromarray((i.permute(1, 2, 0) * 255).byte().numpy()) for i in images]
    sizes = [tuple(i.shape[1:]) for i in images]

    def run():
        outputs = model(**processor(images=pil, return_tensors="pt"))
        return processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=sizes)

    return run


def qpert_breakdown(batch: int = 8, boxes: int = 10, repeats: int = 5) -> dict:
    """Where Q-Pert's own work goes for SigLIP-base at 224 px (``batch`` images of ``boxes`` boxes, in ms per
    batch, medians of ``repeats``): subspaces (key projection, eigen-problems, the rest), and the perturbed
    pooling head against the baseline head, with the score offsets computed by projecting every key (as
    before) and by folding Δq into the key projection (now)."""
    import cProfile
    import pstats
    import statistics

    from transformers import SiglipConfig, SiglipModel

    import qpert
    from qpert.adapters import ImageObjects
    from qpert.adapters.mha import MultiheadAttentionSite
    from qpert.models.registry import retrieval_heads

    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig()).eval()
    heads = retrieval_heads(model)
    pixels = torch.rand(batch, 3, 224, 224)
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(batch, boxes, 2, generator=generator) * torch.tensor([900.0, 650.0])
    sizes = torch.rand(batch, boxes, 2, generator=generator) * 250 + 20
    box_lists = list(torch.cat([corners, (corners + sizes).clamp(max=torch.tensor([1024.0, 768.0]))], -1))
    image_sizes = [(768, 1024)] * batch

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    with torch.no_grad():
        encode = median_ms(lambda: heads.image_tokens(model, pixels))
        tokens = heads.image_tokens(model, pixels)
        with qpert.attach(model, qpert.QPertConfig(alpha=0.6)) as handle:
            objects = ImageObjects.from_boxes(handle, tokens, box_lists, image_sizes)
            head = median_ms(lambda: heads.image_embeddings(model, tokens))
            subspaces = median_ms(lambda: ImageObjects.from_boxes(handle, tokens, box_lists, image_sizes))

            def perturbed():
                with objects.perturb():
                    heads.image_embeddings(model, tokens)

            folded = median_ms(perturbed)
            fold = MultiheadAttentionSite._score_offsets
            MultiheadAttentionSite._score_offsets = lambda self, dq, key: torch.einsum(
                "blhd,bnhd->bhln", dq, self._heads(key, 1)
            )
            try:
                projected = median_ms(perturbed)
            finally:
                MultiheadAttentionSite._score_offsets = fold
            profile = cProfile.Profile()
            profile.runcall(lambda: [ImageObjects.from_boxes(handle, tokens, box_lists, image_sizes) for _ in range(3)])
    by_function = {k[2]: v[2] / 3 * 1000 for k, v in pstats.Stats(profile).stats.items()}  # own time, ms per call
    key_projection = sum(v for name, v in by_function.items() if "linear" in name)
    eigen = sum(v for name, v in by_function.items() if "eigh" in name)

    def share(perturbed_head: float) -> float:  # as the index pays it: the baseline vectors are kept too
        return round((subspaces + perturbed_head) / (encode + head), 4)

    return {
        "batch": batch,
        "boxes_per_image": boxes,
        "encode_ms": round(encode, 1),
        "baseline_head_ms": round(head, 1),
        "subspaces_ms": round(subspaces, 1),
        "subspaces_key_projection_ms": round(key_projection, 1),
        "subspaces_eigen_ms": round(eigen, 1),
        "perturbed_head_ms_projecting_keys": round(projected, 1),
        "perturbed_head_ms_folded": round(folded, 1),
        "qpert_share_before": share(projected),
        "qpert_share_now": share(folded),
    }


def unchanged_rerun(photos: int) -> dict:
    """Index ``photos`` tiny photos with a tiny model and no detector, then time a re-run with nothing changed."""
    from helpers.search_fixtures import save_tiny_blip2, write_photo

    from qpert.search.indexer import IndexSettings, build_index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(photos):
            write_photo(root / "photos" / f"{i // 500:03d}" / f"p{i:05d}.jpg", seed=i, size=(24, 32))
        settings = IndexSettings(model=str(save_tiny_blip2(root / "blip2")), detector="none", itm_features=False)
        start = time.perf_counter()
        build_index(root / "photos", root / "index", settings, device="cpu", batch_size=64, progress=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        report = build_index(root / "photos", root / "index", settings, device="cpu", batch_size=64, progress=False)
        again = time.perf_counter() - start
        assert report.unchanged == photos
        return {"photos": photos, "first_index_s": round(first, 1), "unchanged_rerun_s": round(again, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=48, help="Photos for the laptop preset.")
    parser.add_argument("--quality-photos", type=int, default=4, help="Photos for the quality preset (~20 s each).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--photo-size", default="1024x768", help="WIDTHxHEIGHT of the generated JPEGs.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--laptop-detector", default=None, help="Another torchvision detector for laptop.")
    parser.add_argument("--no-detectors", dest="detectors", action="store_false", help="Skip the detector table.")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="Skip Q-Pert's breakdown.")
    parser.add_argument("--rerun-photos", type=int, default=10_000)
    parser.add_argument("--presets", default="laptop,quality")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one preset, JSON out
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        count = args.quality_photos if args.one == "quality" else args.photos
        size = tuple(int(v) for v in args.photo_size.split("x"))[::-1]  # WIDTHxHEIGHT -> (height, width)
        print(json.dumps(measure_preset(args.one, count, args.batch_size, args.threads, args.root, size)))
        return
    from qpert.search.presets import get_preset

    rows = []
    for preset in [p for p in args.presets.split(",") if p]:  # one process each: its own peak RSS
        with tempfile.TemporaryDirectory() as tmp:
            detector = (
                args.laptop_detector if preset == "laptop" and args.laptop_detector else get_preset(preset).detector
            )
            detector = detector.split(":", 1)[-1]
            build_preset(preset, Path(tmp), detector)
            child = [sys.executable, __file__, "--one", preset, "--root", tmp, "--photos", str(args.photos)]
            child += ["--photo-size", args.photo_size]
            child += ["--quality-photos", str(args.quality_photos), "--batch-size", str(args.batch_size)]
            out = subprocess.run([*child, "--threads", str(args.threads)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "detector": detector})
    torch.set_num_threads(args.threads)
    detectors = detector_speeds() if args.detectors else None
    torch.set_num_threads(1)
    breakdown = qpert_breakdown() if args.breakdown else None
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "presets": rows,
        "rerun": unchanged_rerun(args.rerun_photos) if args.rerun_photos else None,
        "qpert_breakdown": breakdown,
        "detectors": detectors,
    }
    for r in rows:
        print(
            f"{r['preset']:8s} {r['photos']:4d} photos {r['seconds']:8.1f} s  {r['photos_per_s']:6.2f} photos/s  "
            f"peak RSS {r['peak_rss_mb']} MB  Q-Pert / encoding {100 * r['qpert_share_of_encoding']:.1f}%"
        )
        total = sum(r["stages_s"].values())
        for stage, s in r["stages_s"].items():
            print(f"    {stage:40s} {s:8.2f} s  {100 * s / total:5.1f}% of stage time")
    if len(rows) == 2:
        print(f"laptop / quality speed: {rows[0]['photos_per_s'] / rows[1]['photos_per_s']:.0f}x")
    if result["rerun"]:
        r = result["rerun"]
        print(
            f"unchanged re-run of {r['photos']} photos: {r['unchanged_rerun_s']} s (first index {r['first_index_s']} s)"
        )
    for d in detectors or []:
        print(f"detector {d['detector']:40s} COCO box AP {d['coco_box_ap']:5.1f}  {d['ms_per_photo']:6d} ms per photo")
    if breakdown:
        b = breakdown
        print(
            f"Q-Pert's own work, SigLIP-base 224 px, {b['batch']} images x {b['boxes_per_image']} boxes, 1 thread: "
            f"encode {b['encode_ms']} ms, baseline head {b['baseline_head_ms']} ms; subspaces {b['subspaces_ms']} ms "
            f"(key projection {b['subspaces_key_projection_ms']}, eigen-problems {b['subspaces_eigen_ms']}); "
            f"perturbed head {b['perturbed_head_ms_projecting_keys']} ms projecting every key -> "
            f"{b['perturbed_head_ms_folded']} ms folded; share of encoding "
            f"{100 * b['qpert_share_before']:.2f}% -> {100 * b['qpert_share_now']:.2f}%"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
