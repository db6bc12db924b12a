"""``qpert index``, ``qpert search`` and ``qpert serve``: photo search on the command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from ..cli_options import (
    ALPHA,
    COMPAT,
    COMPILE,
    DTYPE,
    KEEP_NORM,
    ORTHOGONAL,
    RANK,
    THRESHOLD,
    TRUST_REMOTE_CODE,
    WEIGHT,
    check_device,
    qpert_config,
)
from ..config import Compat, Weight
from ..terminal import printable

INDEX_DEVICE = typer.Option(
    "auto", callback=check_device, help="auto (a GPU when there is one, per rank under torchrun), cpu, cuda, cuda:1."
)
DETECTOR = typer.Option(
    None,
    help="Where boxes come from: torchvision:<model> (COCO weights), hf:<hub id or folder> (DETR, RT-DETR, YOLOS, "
    "OWLv2 with --prompts, ...), a folder with detector.json (torchvision architecture + your weights), or 'none'. "
    "Default: the index's, else the preset's.",
    show_default=False,
)


def index(
    photos: Path = typer.Argument(
        ..., metavar="PHOTOS", help="Folder of photos (JPEG, PNG, WebP; subfolders included, hidden ones not)."
    ),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Index folder (default: PHOTOS/.qpert-index)."),
    preset: Optional[str] = typer.Option(
        None,
        help="laptop (SigLIP Base + a MobileNet detector: several photos/s on a CPU) or quality (the paper's BLIP-2 "
        "ViT-g + Faster R-CNN v2: for a GPU); see `qpert models`. Default: the index's model, else quality on a GPU "
        "and laptop on a CPU.",
        show_default=False,
    ),
    model: Optional[str] = typer.Option(
        None,
        help="Registered name (`qpert models`), hub id or local folder; overrides the preset's.",
        show_default=False,
    ),
    detector: Optional[str] = DETECTOR,
    detector_threshold: float = typer.Option(0.5, help="Keep detections scoring at least this."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated detector labels to keep (default: all)."),
    max_boxes: int = typer.Option(10, min=1, help="Keep at most this many boxes per photo, best first."),
    prompts: Optional[str] = typer.Option(
        None,
        help="Comma-separated things an open-vocabulary detector (OWLv2, "
        "OWL-ViT) looks for, e.g. 'a person,a dog,a red kite'.",
    ),
    annotations: Optional[Path] = typer.Option(
        None,
        help="COCO instances JSON with boxes for some photos (file_name "
        "relative to PHOTOS): those photos skip the detector.",
    ),
    alpha: float = ALPHA,
    weight: Weight = WEIGHT,
    threshold: float = THRESHOLD,
    rank: Optional[int] = RANK,
    keep_norm: bool = KEEP_NORM,
    orthogonal: bool = ORTHOGONAL,
    compat: Compat = COMPAT,
    faiss: str = typer.Option("flat", help="flat (exact), hnsw or ivf (approximate, for large collections)."),
    itm_features: bool = typer.Option(
        True,
        "--itm-features/--no-itm-features",
        help="Keep each photo's vision tokens (fp16) for `search --itm` and for "
        "re-indexing with other Q-Pert settings without re-encoding.",
    ),
    device: str = INDEX_DEVICE,
    dtype: Optional[str] = DTYPE,
    batch_size: int = typer.Option(8, min=1, help="Photos per detector / vision forward."),
    compile_vision: bool = COMPILE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    rehash: bool = typer.Option(
        False,
        "--rehash",
        help="Hash every photo, not only those whose size, modification "
        "time, change time or inode differ from the index's.",
    ),
    query_boxes: Optional[str] = typer.Option(
        None,
        help="OWLv2 (hf:google/owlv2-base-patch16-ensemble or a folder) whose text-free box features are stored "
        "per photo, for `search --query-boxes`; 'none' drops them. Default: the index's.",
        show_default=False,
    ),
    query_box_count: Optional[int] = typer.Option(
        None, min=1, help="Candidate boxes stored per photo (by objectness). Default: the index's, else 64."
    ),
) -> None:
    """Index a photo folder: detect objects, store baseline and Q-Pert embeddings in FAISS + SQLite.

    Models: --preset laptop (SigLIP Base + Faster R-CNN MobileNetV3 320: photos per second on a CPU) or
    --preset quality (the paper's BLIP-2 ViT-g + Faster R-CNN v2, with ITM re-ranking: for a GPU); without
    --model or --preset, a re-run keeps the index's models and a new index takes quality on a GPU, laptop
    on a CPU (the line printed first says which).

    Re-running updates the index: new and changed photos are added, deleted ones removed, the rest skipped.
    A photo is hashed again (SHA-256) when its size, mtime, ctime or inode changed, or with --rehash.

    New Q-Pert settings (--alpha, --weight, --threshold) re-embed from the stored boxes and tokens.

    A crash or Ctrl-C leaves the previous index usable; the next run resumes.

    Several GPUs or nodes: torchrun --nproc_per_node 4 -m qpert index PHOTOS ...
    """
    from .detectors import DetectorOptions
    from .indexer import IndexSettings, build_index
    from .presets import choose_models
    from .query_boxes import resolve

    boxes_spec, boxes_count = resolve(query_boxes, query_box_count, index_dir or photos / ".qpert-index")
    chosen = choose_models(index_dir or photos / ".qpert-index", device, preset=preset, model=model, detector=detector)
    if chosen.why and os.environ.get("RANK", "0") == "0":
        typer.echo(chosen.why, err=True)
    settings = IndexSettings(
        model=chosen.model,
        detector=chosen.detector,
        detector_options=DetectorOptions(detector_threshold, max_boxes, _names(classes), _names(prompts)),
        qpert=qpert_config(alpha, weight, threshold, rank, keep_norm, orthogonal, compat),
        annotations=str(annotations.resolve()) if annotations else None,
        faiss=faiss,
        itm_features=itm_features,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        query_boxes=boxes_spec,
        query_box_count=boxes_count,
    )
    try:
        report = build_index(
            photos,
            index_dir,
            settings,
            device=device,
            batch_size=batch_size,
            compile_vision=compile_vision,
            rehash=rehash,
        )
    except KeyboardInterrupt:
        typer.secho("interrupted: the previous index is intact; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        typer.echo(report.summary())
        typer.echo(f"index: {printable(str(Path(index_dir) if index_dir else photos / '.qpert-index'))}")


def _names(text: Optional[str]) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip()) if text else ()


def search(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="Index folder built by `qpert index`."),
    query: str = typer.Argument(..., help='What to look for, e.g. "a man with rollerblades".'),
    k: int = typer.Option(10, "-k", "--k", min=1, max=10_000, help="How many photos to return."),
    itm: bool = typer.Option(False, "--itm", help="Re-rank the best candidates by ITM + ITC (with Q-Pert)."),
    candidates: int = typer.Option(32, min=1, max=10_000, help="With --itm: how many ITC candidates are re-ranked."),
    no_qpert: bool = typer.Option(False, "--no-qpert", help="Rank with the baseline model (no Q-Pert)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    device: str = INDEX_DEVICE,
    query_boxes: bool = typer.Option(
        False,
        "--query-boxes",
        help="Re-score the best candidates with Q-Pert on the boxes OWLv2 finds for the query "
        "(index built with --query-boxes).",
    ),
    query_box_threshold: float = typer.Option(0.1, help="With --query-boxes: OWLv2 score a box needs."),
    max_query_boxes: int = typer.Option(3, min=1, help="With --query-boxes: at most this many boxes per photo."),
    query_boxes_mode: str = typer.Option("add", help="With --query-boxes: add to the stored boxes, or replace them."),
) -> None:
    """Search an index with a text query; ranked photos with their scores."""
    from .query_boxes import QueryBoxOptions
    from .searcher import PhotoIndex

    options = QueryBoxOptions(query_box_threshold, max_query_boxes, query_boxes_mode) if query_boxes else None
    index = PhotoIndex(index_dir, device=device)
    try:
        hits = index.search(query, k=k, qpert=not no_qpert, itm=itm, candidates=candidates, query_boxes=options)
    finally:
        index.close()
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "query": query,
                    "qpert": not no_qpert,
                    "itm": itm,
                    "query_boxes": query_boxes,
                    "results": [h.to_json() for h in hits],
                },
                indent=1,
            )
        )
        return
    typer.echo(
        f"{len(hits)} of {len(index)} photos, {'Q-Pert' if not no_qpert else 'baseline'}"
        f"{', ITM + ITC' if itm else ', ITC'}:"
    )
    for h in hits:  # names and labels come from outside: escape what could drive the terminal
        labels = printable(", ".join(sorted({b["label"] for b in h.boxes})))
        typer.echo(
            f"{h.rank:3d}. {h.score:8.4f}  {printable(str(index.photos_dir / h.path))}"
            + (f"   [{labels}]" if labels else "")
            + (f"   (+{len(h.query_boxes)} query boxes)" if h.query_boxes else "")
        )


def _host_names(values: list[str]) -> list[str]:
    from .server import host_name

    try:
        return [host_name(v) for v in values]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


def serve(
    index_dir: Path = typer.Argument(..., metavar="INDEX", help="Index folder built by `qpert index`."),
    host: str = typer.Option(
        "127.0.0.1",
        help="Address to listen on (localhost only by default; 0.0.0.0: every interface, with --allow-host).",
    ),
    port: int = typer.Option(8765, min=0, max=65535, help="Port (0: any free one)."),
    allow_host: list[str] = typer.Option(
        [],
        "--allow-host",
        callback=_host_names,
        help="A name or address browsers use to reach the page besides localhost "
        "(repeat for several); requests naming other hosts are refused.",
    ),
    device: str = INDEX_DEVICE,
) -> None:
    """A search page for an index on http://HOST:PORT: results with boxes, baseline vs Q-Pert side by side."""
    from .server import serve as run_server

    run_server(index_dir, host=host, port=port, device=device, allowed_hosts=allow_host)
    # Stopped cleanly: leave without interpreter teardown, where a handler thread still unwinding
    # through native (C++) frames was seen to abort the process (SIGABRT) once in many stops.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def register(app: typer.Typer) -> None:
    for command in (index, search, serve):
        app.command(command.__name__)(command)
