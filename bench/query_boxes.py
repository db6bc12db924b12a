"""Query-aware Q-Pert (``search --query-boxes``): what it adds per query, and per photo at index time.

Random weights of the real architectures (no download): SigLIP Base (ViT-B/16, 224 px, 196 tokens, the
``laptop`` preset's size) as the search model and OWLv2 Base (ViT-B/16 at 960 px, 3,600 patches) as the
query-box detector. Search: ``qpert.search.query_boxes.rescore`` on 32 candidates whose stored features
(64 candidate boxes each) and vision tokens are read from a feature store on disk, as a search does —
OWLv2's text tower, the box scoring and Q-Pert's pooling-head pass; the vision encoder never runs. Index:
OWLv2's image side on one photo, and the bytes it stores.

    python bench/query_boxes.py [--candidates 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def save_models(root: Path) -> tuple[Path, Path]:
    from helpers.search_fixtures import WORDS, save_tiny_owlv2
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    from qpert.models.tiny import tiny_processor

    torch.manual_seed(0)
    siglip = root / "siglip-base"
    SiglipModel(SiglipConfig()).save_pretrained(siglip)  # the defaults are SigLIP Base patch16 224
    SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": 224, "width": 224}),
        tokenizer=tiny_processor(WORDS, str(siglip)).tokenizer,
    ).save_pretrained(siglip)
    owl = save_tiny_owlv2(root / "owlv2-base")  # its tokenizer files; the model is replaced by Base's
    Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960})).save_pretrained(owl)  # OWLv2 Base patch16
    tokenizer = CLIPTokenizer(str(owl / "vocab.json"), str(owl / "merges.txt"), pad_token="!")
    Owlv2Processor(image_processor=Owlv2ImageProcessor(), tokenizer=tokenizer).save_pretrained(owl)
    return siglip, owl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--count", type=int, default=64, help="candidate boxes stored per photo")
    args = parser.parse_args()

    import qpert
    from qpert.eval.cache import FeatureStore
    from qpert.models.registry import retrieval_heads
    from qpert.search.detectors import Detections
    from qpert.search.indexer import IndexSettings
    from qpert.search.query_boxes import KIND, QueryBoxDetector, QueryBoxOptions, feature_key, rescore

    torch.set_grad_enabled(False)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        siglip, owl = save_models(root)
        store = FeatureStore(root / "features")
        rng = np.random.default_rng(0)
        photo = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))

        detector = QueryBoxDetector(str(owl), args.count, store, device)
        detector.features([photo])  # warm-up
        start = time.perf_counter()
        features = detector.features([photo])[0]
        index_seconds = time.perf_counter() - start
        store.save(KIND, "probe", features)
        bytes_per_photo = (root / "features" / KIND / "probe.safetensors").stat().st_size

        loaded = qpert.load_model(str(siglip), device=device)
        heads = retrieval_heads(loaded.model)
        tokens = heads.image_tokens(loaded.model, heads.preprocess(loaded.model, loaded.processor, [photo]))[0]
        settings = IndexSettings(model=str(siglip), query_boxes=str(owl), query_box_count=args.count)
        rows = []
        for i in range(args.candidates):
            sha = f"{i:064x}"
            store.save(KIND, feature_key(sha, str(owl), args.count), features)
            store.save("tokens", sha, {"tokens": tokens.half()})
            boxes = np.array([[40, 40, 200, 200], [300, 100, 420, 260]], np.float32)
            rows.append(SimpleNamespace(sha256=sha, path=f"p{i}", height=480, width=640,
                                        detections=Detections(boxes, np.ones(2, np.float32), ["a", "b"])))  # fmt: skip
        reader = FeatureStore(root / "features", writer=False)
        with qpert.attach(loaded.model, qpert.QPertConfig(alpha=0.6)) as handle:
            index = SimpleNamespace(
                settings=settings,
                device=device,
                features=reader,
                loaded=loaded,
                retriever=heads,
                handle=handle,
                _tokens=lambda row: reader.load("tokens", row.sha256)["tokens"],
            )
            ids, mask = heads.tokenize(loaded.model, loaded.processor, ["a red kite far above the beach"])
            text = heads.text_embeddings(loaded.model, ids, mask).float()
            itc = np.zeros(args.candidates, np.float32)
            options = QueryBoxOptions(threshold=0.0, max_boxes=3)  # every candidate re-scored: the worst case
            start = time.perf_counter()
            rescore(index, rows, "a red kite far above the beach", text, itc, options)
            first = time.perf_counter() - start  # includes loading OWLv2 for its text tower
            times = []
            for r in range(args.repeats):
                query = f"a red kite far above the beach {r}"  # a new query each time: no cached text embedding
                start = time.perf_counter()
                found = rescore(index, rows, query, text, itc, options)
                times.append(time.perf_counter() - start)
            assert all(q is not None for q in found.query_boxes)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "search_model": "SigLIP Base patch16 224 (random weights)",
        "detector": "OWLv2 Base patch16 960 (random weights)",
        "candidates": args.candidates,
        "boxes_stored_per_photo": args.count,
        "added_per_query_s_median": round(float(np.median(times)), 3),
        "added_per_query_s_max": round(float(np.max(times)), 3),
        "first_query_s_with_detector_load": round(first, 2),
        "index_detector_s_per_photo": round(index_seconds, 2),
        "stored_bytes_per_photo": bytes_per_photo,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
