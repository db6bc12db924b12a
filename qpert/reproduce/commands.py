"""``qpert reproduce``: the paper's protocol on its data, beside the published numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..cli_options import BATCH, CACHE_DIR, DEVICE, ITM_BATCH, NO_CACHE, TRUST_REMOTE_CODE
from ..data.commands import CATALOG, DATA_ROOT, FLICKR30K_IMAGES, MIRROR


def reproduce(
    protocol: str = typer.Argument(
        ..., metavar="PROTOCOL", help="official-example, flickr30k or coco.", show_default=False
    ),
    device: str = DEVICE,
    data_root: Path = DATA_ROOT,
    model: Optional[str] = typer.Option(
        None,
        help="Another checkpoint than the protocol's BLIP-2 (registered name, hub id or folder); its numbers "
        "are not the published ones, and the report says so.",
        show_default=False,
    ),
    output_dir: Path = typer.Option(Path("reproduce"), help="Where results.json and report.html go."),
    detections: Optional[Path] = typer.Option(
        None,
        help="A detector's boxes for the val and test images (COCO results JSON): adds the paper's (D) rows "
        "(flickr30k, coco); for coco they also bin the images, as in the paper.",
        show_default=False,
    ),
    fetch: bool = typer.Option(
        True,
        "--fetch/--no-fetch",
        help="Fetch the data first (what is already there and checked costs nothing); --no-fetch: use the "
        "data root as it is (a layout made by hand).",
    ),
    mirror: Optional[str] = MIRROR,
    catalog: Optional[Path] = CATALOG,
    flickr30k_images: Optional[Path] = FLICKR30K_IMAGES,
    tune_itm: bool = typer.Option(
        False,
        "--tune-itm",
        help="Score the validation grid with ITM re-ranking too (125 settings: hours on one GPU); by default "
        "the grid is scored by ITC and only the chosen setting is re-ranked on test.",
    ),
    alphas: Optional[str] = typer.Option(
        None, help="Comma-separated alpha grid for tuned runs (default: the model's paper grid).", show_default=False
    ),
    cache_dir: Path = CACHE_DIR,
    no_cache: bool = NO_CACHE,
    batch_size: int = BATCH,
    itm_batch_size: int = ITM_BATCH,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Reproduce the paper: fetch the data and the checkpoint, run its protocol, compare with the published numbers.

    \b
    official-example  the official repository's example: BLIP-2 coco, Flickr30K
                      test, Entities boxes, alpha 8, constant, tau 0.99, ITM
                      top 64, in --compat official and --compat paper; ~0.3 GB
                      of data and 4.6 GB of weights (GPU time not yet measured)
    flickr30k         the paper's BLIP-2 Flickr30K rows: the setting tuned on
                      val by T2I mR@1 (125 settings), then test; (E) Entities
                      boxes, (D) --detections
    coco              the same on MSCOCO 5K with COCO Entities boxes (2 GB of
                      data: val2014 images and coco_entities_release.json)

    Writes OUTPUT_DIR/results.json and OUTPUT_DIR/report.html: measured beside published, the
    difference, and why the last digit may differ. Resumable: run the same command again after an
    interruption (the data and the feature cache keep what was done). On several GPUs:
    torchrun --nproc_per_node N -m qpert reproduce ... --cache-dir SHARED.
    """
    from ..distributed import session
    from ..eval.pipeline import EvalOptions
    from .protocols import get_protocol
    from .runner import reproduce as run_reproduce
    from .runner import write_outputs

    get_protocol(protocol)  # an unknown name is one error line before anything is fetched
    try:
        grid = [float(a) for a in alphas.split(",") if a.strip()] if alphas else None
    except ValueError:
        raise typer.BadParameter(f"--alphas: expected comma-separated numbers, got {alphas!r}") from None
    options = EvalOptions(
        batch_size=batch_size, itm_batch_size=itm_batch_size, cache_dir=None if no_cache else cache_dir.expanduser()
    )
    with session() as ranks:
        reproduction = run_reproduce(
            protocol,
            data_root,
            model=model,
            device=device,
            detections=detections,
            fetch=fetch,
            mirror=mirror,
            catalog=catalog,
            flickr30k_images=flickr30k_images,
            tune_itm=tune_itm,
            alphas=grid,
            options=options,
            progress=progress,
            trust_remote_code=trust_remote_code,
            ranks=ranks,
            echo=lambda message: typer.echo(message, err=True) if ranks.is_main else None,
        )
    if not ranks.is_main:
        return
    results, page = write_outputs(reproduction, output_dir)
    if not reproduction.model_is_published:
        typer.echo(f"{reproduction.model} is not the protocol's model: these numbers are not the published ones")
    typer.echo(reproduction.summary())
    typer.echo(f"wrote {results} and {page}")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
