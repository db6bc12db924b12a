"""The ``qpert`` command line. Nothing below this module knows about it."""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NoReturn, Optional

import typer

from . import __version__
from .cli_options import (
    ALPHA,
    BATCH,
    CACHE_DIR,
    COMPAT,
    COMPILE,
    DEVICE,
    DTYPE,
    EXCLUDE_SITE,
    ITM_BATCH,
    KEEP_NORM,
    MODEL,
    NO_CACHE,
    ORTHOGONAL,
    PROJECTOR,
    RANK,
    THRESHOLD,
    TRUST_REMOTE_CODE,
    WEIGHT,
    parse_box,
    qpert_config,
)
from .config import Compat, Projector, QPertConfig, Weight, compat_dtype
from .data.commands import register as register_data_commands
from .errors import ConfigError, QPertError
from .reproduce.commands import register as register_reproduce_commands
from .search.commands import register as register_search_commands

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Object-Aware Query Perturbation (Q-Pert, ECCV 2024): make BLIP-2 and other vision-language models "
    "notice small objects, training-free. Boxes of the objects in an image amplify, inside every "
    "cross-attention, the part of each query that lies in the object's key subspace.",
)

#: What the command line shows as one line: what the user gave is wrong, or the machine refused (a full disk).
USER_ERRORS = (QPertError, OSError)
#: Click's exceptions, or the copy of them typer ships in newer versions.
_CLICK = sys.modules[typer.BadParameter.__module__]


@app.command()
def models() -> None:
    """List the registered models (checkpoint, image size, alpha grid, ITM re-ranking depth k or none) and the
    photo-search presets of `qpert index --preset`."""
    from .models.registry import MODELS
    from .search.presets import PRESETS

    for spec in MODELS.values():
        grid = ", ".join(f"{a:g}" for a in spec.alphas)
        source = "(bundled with qpert)" if Path(spec.source).is_absolute() else spec.source
        rerank = f"ITM k {spec.rerank_k:3d}" if spec.family.retrieval and spec.family.retrieval.has_itm else "no ITM  "
        typer.echo(f"{spec.name:21s} {source:36s} {spec.image_size:4d}px  alpha [{grid}]  {rerank}  {spec.description}")
    typer.echo("\nPhoto-search presets (qpert index --preset NAME; default: quality on a GPU, laptop on a CPU):")
    for preset in PRESETS.values():
        typer.echo(f"{preset.name:8s} {preset.model} + {preset.detector}\n{'':8s} {preset.description}")


def _print_scores(texts: list[str], results: dict, title: str) -> None:
    typer.echo(title)
    typer.echo(f"  {'text':34s} {'ITC':>8s} {'ITC+QP':>8s} {'Δ':>7s}   {'ITM+ITC':>8s} {'+QP':>8s} {'Δ':>7s}")
    base, pert = results["baseline"], results["qpert"]
    for i in range(base.itc.shape[0]):
        for j, text in enumerate(texts):
            row = (
                f"  {text[:34]:34s} {base.itc[i, j]:8.4f} {pert.itc[i, j]:8.4f} {pert.itc[i, j] - base.itc[i, j]:+7.4f}"
            )
            if base.itm is not None:
                row += f"   {base.itm[i, j]:8.4f} {pert.itm[i, j]:8.4f} {pert.itm[i, j] - base.itm[i, j]:+7.4f}"
            typer.echo(row)


@app.command()
def example(seed: int = typer.Option(0, help="Seed of the random weights and image.")) -> None:
    """Offline walkthrough: attach Q-Pert to a tiny random-weight BLIP-2 and print scores with and without it.

    The weights are random (no download), so the scores mean nothing; the example shows the two
    lines that attach Q-Pert and that it changes only what the objects' boxes point at.
    """
    import numpy as np
    from PIL import Image

    from .models.registry import LoadedModel
    from .models.tiny import tiny_blip2, tiny_processor
    from .scoring import score

    texts = ["a small red square in the corner", "a large blue rectangle", "a green circle"]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(90, 140, size=(120, 160, 3), dtype=np.uint8)
    pixels[10:22, 130:142] = (220, 30, 30)  # small red square, 0.75% of the image
    pixels[50:110, 20:100] = (30, 40, 200)  # large blue rectangle, 25%
    boxes = [[[130, 10, 142, 22], [20, 50, 100, 110]]]
    with tempfile.TemporaryDirectory() as tmp:
        processor = tiny_processor(" ".join(texts).split(), tmp)
    loaded = LoadedModel("tiny-random-blip2", tiny_blip2(seed), processor, None)
    config = QPertConfig(alpha=8.0, weight="constant", threshold=0.99)
    results = score(loaded, [Image.fromarray(pixels)], boxes, texts, config, itm=True)
    typer.echo(f"qpert {__version__}: {config}")
    _print_scores(texts, results, "Tiny random-weight BLIP-2 (Blip2ForImageTextRetrieval), 1 image, 2 boxes:")
    typer.echo(
        "\nIn Python, with a real checkpoint:\n"
        "  handle = qpert.attach(model, qpert.QPertConfig(alpha=8.0))\n"
        "  with handle.objects(boxes, image_sizes): out = model(**inputs)\n"
        "Real images: qpert score IMAGE --box x0,y0,x1,y1 --text '...' --model blip2-coco"
    )


@app.command()
def demo(
    out: Path = typer.Option(Path("qpert-demo"), help="Folder for the scenes and report.html."),
    seeds: int = typer.Option(5, min=1, max=5, help="Number of test seeds (the report gives mean ± std over them)."),
    n_test: int = typer.Option(500, min=2, help="Test scenes per seed."),
    n_val: int = typer.Option(300, min=2, help="Validation scenes (alpha is chosen there)."),
    model: str = typer.Option("blip2-shapes", help="The shipped toy model, or any BLIP-2 retrieval checkpoint."),
    itm: bool = typer.Option(
        False,
        "--itm/--no-itm",
        help="Re-rank the top k by ITM + ITC, as BLIP-2 is evaluated. Off by default: the toy's ITM head "
        "never learned to help, so re-ranking lowers its R@1 (qpert/assets/blip2-shapes/TRAINING.md).",
    ),
    k: int = typer.Option(
        10, min=1, help="Candidates re-ranked per query: by ITM (--itm), or on the named boxes (--query-aware)."
    ),
    ablation: bool = typer.Option(
        False,
        "--ablation",
        help="Also run the controls (the official code's projector, a random subspace of "
        "the same rank, plain query scaling), each with its own alpha.",
    ),
    query_aware: bool = typer.Option(
        False,
        "--query-aware",
        help="Instead: captions that name some of each scene's shapes, boxes on all of them; Q-Pert on all "
        "boxes vs re-scoring the top k on the boxes each caption names (qpert search --query-boxes, with a "
        "perfect detector) vs query scaling, each with its own alpha. ITC only.",
    ),
) -> None:
    """Offline benchmark in about a minute: synthetic scenes, a small trained BLIP-2, baseline vs Q-Pert.

    Writes the scenes in the real Flickr30K/Entities formats, picks alpha on a validation seed,
    evaluates the test seed(s) and writes an HTML report with the per-size-bin chart. The model is a
    toy trained on coloured shapes: its numbers show the mechanism, not BLIP-2's.
    """
    from .demo import TEST_SEEDS, run_demo

    if query_aware:
        _query_aware_demo(out, model, TEST_SEEDS[:seeds], n_test, n_val, k, itm or ablation)
        return
    result = run_demo(
        out, model=model, seeds=TEST_SEEDS[:seeds], n_test=n_test, n_val=n_val, itm=itm, k=k, ablation=ablation
    )
    last = list(result.tests.values())[-1]
    from .eval.metrics import format_comparison

    typer.echo(
        f"{model} (a toy model on synthetic shapes): alpha={result.alpha:g} chosen on the validation seed; "
        f"{last.settings['num_images']} test scenes per seed, "
        + (f"ITC + ITM re-ranking of the top {k} (the toy's ITM lowers R@1, see the report)" if itm else "ITC only")
    )
    typer.echo(format_comparison(last.metrics))
    if seeds > 1:
        typer.echo("\n" + result.summary())
    if ablation:
        typer.echo("\nAblation (mean ± std over test seeds; only the projector differs):\n" + result.ablation_table())
    typer.echo(f"\nreport: {result.report}")


def _query_aware_demo(
    out: Path, model: str, seeds: tuple[int, ...], n_test: int, n_val: int, k: int, other_protocol: bool
) -> None:
    """``qpert demo --query-aware``: its own scenes (subset captions) and rows, so it runs alone."""
    if other_protocol:
        raise ConfigError("--query-aware runs its own protocol (ITC only): leave out --itm and --ablation")
    from .synthetic.query_aware import run_query_aware

    result = run_query_aware(out / "query-aware", model=model, seeds=seeds, n_test=n_test, n_val=n_val, k=k)
    typer.echo(
        f"{model} (a toy model on synthetic shapes): captions name some of each scene's shapes, boxes cover all; "
        f"{n_test} test scenes per seed; each row's alpha chosen by T2I mR@1 on the validation seed; "
        f"query-aware rows re-score each query's top {k} by baseline ITC. Mean ± std over {len(seeds)} test seed(s):"
    )
    typer.echo(result.table())


@app.command("score")
def score_command(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, ...)."),
    text: list[str] = typer.Option(..., "--text", "-t", help="A caption to score; repeat for several."),
    box: list[str] = typer.Option([], "--box", "-b", help="Object box x0,y0,x1,y1 in image pixels; repeat."),
    model: str = typer.Option("blip2-coco", help="Registered name (see `qpert models`), hub id or local folder."),
    itm: Optional[bool] = typer.Option(
        None,
        "--itm/--no-itm",
        show_default=False,
        help="Also compute ITM + ITC (the re-ranking score); default: when the model "
        "has an ITM head (BLIP-2, BLIP; not CoCa or SigLIP).",
    ),
    alpha: float = ALPHA,
    weight: Weight = WEIGHT,
    threshold: float = THRESHOLD,
    rank: Optional[int] = RANK,
    keep_norm: bool = KEEP_NORM,
    orthogonal: bool = ORTHOGONAL,
    compat: Compat = COMPAT,
    device: str = DEVICE,
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (default: the checkpoint's)."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    exclude_site: list[str] = EXCLUDE_SITE,
) -> None:
    """Score one image against captions with and without Q-Pert."""
    from .models.registry import load_model
    from .scoring import score

    config = qpert_config(alpha, weight, threshold, rank, keep_norm, orthogonal, compat)
    boxes = [parse_box(b) for b in box]
    img = _read_image(image)
    loaded = load_model(model, device=device, dtype=compat_dtype(compat, dtype), trust_remote_code=trust_remote_code)
    results = score(loaded, [img], [boxes], text, config, itm=itm, exclude_sites=exclude_site)
    _print_scores(text, results, f"{loaded.name} on {image} ({img.width}x{img.height}), {len(boxes)} box(es):")


@app.command("caption")
def caption_command(
    image: Path = typer.Argument(..., help="Image file (JPEG, PNG, ...)."),
    box: list[str] = typer.Option([], "--box", "-b", help="Object box x0,y0,x1,y1 in image pixels; repeat."),
    model: str = typer.Option(
        "blip2-opt-2.7b",
        help="A BLIP-2 captioner (Blip2ForConditionalGeneration): registered name, hub id or local folder.",
    ),
    max_new_tokens: int = typer.Option(30, min=1, help="Longest caption, in tokens."),
    num_beams: int = typer.Option(1, min=1, help="Beam width (1: greedy)."),
    alpha: float = ALPHA,
    weight: Weight = WEIGHT,
    threshold: float = THRESHOLD,
    rank: Optional[int] = RANK,
    keep_norm: bool = KEEP_NORM,
    orthogonal: bool = ORTHOGONAL,
    compat: Compat = COMPAT,
    device: str = DEVICE,
    dtype: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 (default: the checkpoint's)."),
) -> None:
    """Caption one image with and without Q-Pert on the given boxes."""
    from .captioning import caption
    from .models.registry import load_model

    config = qpert_config(alpha, weight, threshold, rank, keep_norm, orthogonal, compat)
    boxes = [parse_box(b) for b in box]
    img = _read_image(image)
    loaded = load_model(model, device=device, dtype=compat_dtype(compat, dtype))
    captions = caption(loaded, img, boxes, config, max_new_tokens=max_new_tokens, num_beams=num_beams)
    typer.echo(f"{loaded.name} on {image} ({img.width}x{img.height}), {len(boxes)} box(es):")
    typer.echo(f"  baseline: {captions.baseline}")
    typer.echo(f"  Q-Pert:   {captions.qpert}")


def _read_image(path: Path):
    """The decoded image, or a one-line error."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise typer.BadParameter(f"no such image: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise typer.BadParameter(f"{path} is not a readable image ({e})") from e
    return img


def _eval_options(
    itm: Optional[bool],
    k: Optional[int],
    batch_size: int,
    itm_batch_size: int,
    cache_dir: Path,
    no_cache: bool,
    shard_size: int,
    pairs_per_block: int,
    compile_vision: bool,
    exclude_sites: list[str],
    object_baseline: bool = False,
):
    from .eval.pipeline import EvalOptions

    return EvalOptions(
        itm=itm,
        k=k,
        batch_size=batch_size,
        itm_batch_size=itm_batch_size,
        cache_dir=None if no_cache else cache_dir,
        shard_size=shard_size,
        pairs_per_block=pairs_per_block,
        compile_vision=compile_vision,
        object_baseline=object_baseline,
        exclude_sites=tuple(exclude_sites),
    )


DATASET = typer.Option(..., help="flickr30k, coco, flickr30k-fg or coco-fg.")
DATA_ROOT = typer.Option(..., help="Folder with flickr30k/ and/or coco/ (and fg/) in the documented layout.")
BOXES = typer.Option(
    "entities",
    help="entities[:DIR] (Flickr30K Entities), coco-json:FILE (detector results, "
    "COCO format), coco-instances:FILE or coco-entities[:FILE] (default: the data root's coco_entities_release.json).",
)
BIN_BOXES = typer.Option(
    None,
    help="Box source that places images in the mR@K area bins and the small-object subset "
    "(same syntax as --boxes; default: --boxes). The paper bins Flickr30K by "
    "Entities boxes, also for its detector rows.",
)
CAPTIONS = typer.Option(None, help="Captions file replacing the default one (e.g. an FG caption JSON).")
SCORE_THR = typer.Option(0.0, min=0.0, max=1.0, help="With coco-json boxes: keep detections scoring at least this.")
MAX_BOXES = typer.Option(None, min=1, help="With coco-json boxes: keep at most this many per image (best first).")
ITM = typer.Option(
    None,
    "--itm/--no-itm",
    show_default=False,
    help="Re-rank each query's top k by ITM + ITC (the paper's protocol); default: when the model has "
    "an ITM head (BLIP-2, BLIP), ITC only for CoCa and SigLIP.",
)
TOP_K = typer.Option(
    None,
    "--k",
    min=1,
    show_default=False,
    help="Candidates re-ranked by ITM per query (default: the model's: 64 for BLIP-2 as in the paper, "
    "128 for blip-flickr and 256 for blip-coco as in BLIP's evaluation).",
)
SHARD = typer.Option(64, min=1, help="Images per cache file: the unit of work a resumed run skips (and ranks share).")
PAIRS_PER_BLOCK = typer.Option(
    4096,
    min=1,
    help="ITM pairs per cache file: the unit of re-ranking work that a resumed "
    "run skips and that ranks share equally under torchrun.",
)


@app.command("eval")
def eval_command(
    model: str = MODEL,
    dataset: str = DATASET,
    data_root: Path = DATA_ROOT,
    boxes: str = BOXES,
    bin_boxes: Optional[str] = BIN_BOXES,
    split: str = typer.Option("test", help="test or val (Karpathy split)."),
    captions: Optional[str] = CAPTIONS,
    config: list[Path] = typer.Option(
        [],
        help="Q-Pert config JSON (from `qpert tune`); repeat to compare several. "
        "Overrides --alpha/--weight/--threshold.",
    ),
    alpha: float = ALPHA,
    weight: Weight = WEIGHT,
    threshold: float = THRESHOLD,
    rank: Optional[int] = RANK,
    keep_norm: bool = KEEP_NORM,
    orthogonal: bool = ORTHOGONAL,
    compat: Compat = COMPAT,
    projector: Optional[Projector] = PROJECTOR,
    itm: Optional[bool] = ITM,
    k: Optional[int] = TOP_K,
    score_threshold: float = SCORE_THR,
    max_boxes: Optional[int] = MAX_BOXES,
    device: str = DEVICE,
    dtype: Optional[str] = DTYPE,
    batch_size: int = BATCH,
    itm_batch_size: int = ITM_BATCH,
    cache_dir: Path = CACHE_DIR,
    no_cache: bool = NO_CACHE,
    shard_size: int = SHARD,
    pairs_per_block: int = PAIRS_PER_BLOCK,
    compile_vision: bool = COMPILE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    exclude_site: list[str] = EXCLUDE_SITE,
    object_baseline: bool = typer.Option(
        False,
        "--object-baseline",
        help="Also score the object-embedding baseline (paper's Table F): model score "
        "+ best similarity of the text to an ROI-pooled object embedding.",
    ),
    output: Optional[Path] = typer.Option(None, help="Write all metrics and settings here as JSON."),
) -> None:
    """Evaluate baseline and Q-Pert on a retrieval benchmark: R@1/5/10, mR@K, small-object R@K.

    Example: qpert eval --model blip2-coco --dataset flickr30k --data-root ~/data --boxes entities --device cuda

    On several GPUs or nodes: torchrun --nproc_per_node 8 -m qpert eval ... --cache-dir SHARED (a folder every
    rank sees); the numbers are those of one process.
    """
    import json

    from .eval.api import evaluate_benchmark, read_config_file

    configs = [read_config_file(c) for c in config] or [
        qpert_config(alpha, weight, threshold, rank, keep_norm, orthogonal, projector=projector)
    ]
    with _ranks() as ranks:
        result = evaluate_benchmark(
            model,
            dataset,
            data_root,
            boxes,
            configs,
            split=split,
            captions_file=captions,
            device=str(ranks.device(device)),
            dtype=dtype,
            score_threshold=score_threshold,
            max_boxes=max_boxes,
            trust_remote_code=trust_remote_code,
            compat=compat,
            bin_boxes=bin_boxes,
            ranks=ranks,
            options=_eval_options(
                itm,
                k,
                batch_size,
                itm_batch_size,
                cache_dir,
                no_cache,
                shard_size,
                pairs_per_block,
                compile_vision,
                exclude_site,
                object_baseline,
            ),
        )
    if not ranks.is_main:
        return
    s = result.settings
    binned = f", binned by {s['bin_boxes']}" if s["bin_boxes"] != s["boxes"] else ""
    typer.echo(
        f"{model} on {dataset} {split} ({compat} compat): {s['num_images']} images, {s['num_texts']} texts, "
        f"boxes {s['boxes_summary']}{binned}, {'ITC + ITM top-' + str(s['k']) if s['itm'] else 'ITC only'}, "
        f"{s['seconds']} s{_pair_rates(result)}"
    )
    typer.echo(result.table())
    if output:
        output.write_text(json.dumps(result.to_dict(), indent=2))
        typer.echo(f"wrote {output}")


def _ranks():
    """This process's place under torchrun (a single process otherwise), torn down when the work is done."""
    from .distributed import session

    return session()


def _pair_rates(result) -> str:
    """ITM pairs/s of each rank that scored pairs in this run."""
    rates = [r for r in result.pair_rates if r > 0]
    if not rates:
        return ""
    return "; ITM " + ", ".join(f"rank {i} {r:.0f} pairs/s" for i, r in enumerate(result.pair_rates) if r > 0)


@app.command()
def tune(
    model: str = MODEL,
    dataset: str = DATASET,
    data_root: Path = DATA_ROOT,
    boxes: str = BOXES,
    bin_boxes: Optional[str] = BIN_BOXES,
    compat: Compat = COMPAT,
    split: str = typer.Option("val", help="Tune on the validation split, never on test."),
    alphas: Optional[str] = typer.Option(None, help="Comma-separated alphas (default: the model's paper grid)."),
    thresholds: str = typer.Option("0.8,0.85,0.9,0.95,0.99", help="Comma-separated tau values."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated weight functions (default: all five)."),
    select_by: str = typer.Option("t2i mR@1", help="Selection metric: '<t2i|i2t> <R@1|mR@1|...>'."),
    itm: bool = typer.Option(False, "--itm/--no-itm", help="Score the grid with ITM re-ranking (slow)."),
    k: Optional[int] = TOP_K,
    score_threshold: float = SCORE_THR,
    max_boxes: Optional[int] = MAX_BOXES,
    device: str = DEVICE,
    dtype: Optional[str] = DTYPE,
    batch_size: int = BATCH,
    itm_batch_size: int = ITM_BATCH,
    cache_dir: Path = CACHE_DIR,
    no_cache: bool = NO_CACHE,
    shard_size: int = SHARD,
    pairs_per_block: int = PAIRS_PER_BLOCK,
    compile_vision: bool = COMPILE,
    trust_remote_code: bool = TRUST_REMOTE_CODE,
    exclude_site: list[str] = EXCLUDE_SITE,
    output: Path = typer.Option(Path("qpert-best.json"), help="Where the best config goes (for eval --config)."),
    results: Optional[Path] = typer.Option(None, help="Also write every setting's metrics here as JSON."),
) -> None:
    """Grid-search alpha, weight function and tau on the validation split; write the best config."""
    import json

    from .eval.api import tune as run_tune

    def floats(text: str) -> list[float]:
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None

    with _ranks() as ranks:
        result, best = run_tune(
            model,
            dataset,
            data_root,
            boxes,
            split=split,
            alphas=floats(alphas) if alphas else None,
            thresholds=floats(thresholds),
            weights=weights.split(",") if weights else None,
            select_by=select_by,
            device=str(ranks.device(device)),
            dtype=dtype,
            score_threshold=score_threshold,
            max_boxes=max_boxes,
            trust_remote_code=trust_remote_code,
            compat=compat,
            bin_boxes=bin_boxes,
            ranks=ranks,
            options=_eval_options(
                itm,
                k,
                batch_size,
                itm_batch_size,
                cache_dir,
                no_cache,
                shard_size,
                pairs_per_block,
                compile_vision,
                exclude_site,
            ),
        )
    if not ranks.is_main:
        return
    direction, _, key = select_by.partition(" ")
    ranked = sorted(result.metrics, key=lambda n: -(getattr(result.metrics[n], direction)[key] or -1.0))
    typer.echo(f"{'setting':44s} {'t2i R@1':>8s} {'t2i mR@1':>9s} {'i2t R@1':>8s} {'i2t mR@1':>9s}")
    for name in ranked:
        m = result.metrics[name]
        cells = [m.t2i["R@1"], m.t2i["mR@1"], m.i2t["R@1"], m.i2t["mR@1"]]
        typer.echo(f"{name:44s} " + " ".join(f"{v:8.2f} " if v is not None else "     n/a " for v in cells))
    best_config = result.settings["methods"][best]
    output.write_text(
        json.dumps(
            {
                "qpert": best_config,
                "selected_by": select_by,
                "value": getattr(result.metrics[best], direction)[key],
                "baseline": getattr(result.metrics["baseline"], direction)[key],
                "model": model,
                "dataset": dataset,
                "split": split,
                "boxes": boxes,
                "bin_boxes": bin_boxes,
                "compat": compat,
            },
            indent=2,
        )
    )
    typer.echo(f"best by {select_by}: {best}; wrote {output} (use: qpert eval --config {output})")
    if results:
        results.write_text(json.dumps(result.to_dict(), indent=2))


register_search_commands(app)
register_data_commands(app)
register_reproduce_commands(app)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise SystemExit(2)


def main() -> None:
    """Entry point: a user mistake (a QPertError, an environment error, an invalid option) ends with one
    ``error:`` line and exit code 2; anything else is a bug and shows its traceback."""
    warnings.showwarning = _show_warning
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        code = app(standalone_mode=False)
    except _CLICK.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(e.ctx.get_help() if e.ctx else str(e))
            raise SystemExit(2) from None
        command = e.ctx.command_path if e.ctx else "qpert"
        _fail(f"{e.format_message()} (see {command} --help)")
    except typer.Abort:
        typer.secho("interrupted", err=True)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        _fail(str(e))
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
