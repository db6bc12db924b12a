"""``qpert data fetch`` and ``qpert data verify``: the benchmarks onto an empty disk, and checked later."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .fetch.catalog import DEFAULT_DATA_ROOT

data_app = typer.Typer(
    no_args_is_help=True,
    help="Fetch the benchmarks into the layout `qpert eval` reads (default DATA: ~/.cache/qpert/data), and "
    "verify them later. Example: `qpert data fetch flickr30k coco`. Without a network: a folder or URL holding "
    "the files, `--mirror DIR` (`python scripts/make_data_mirror.py DIR` writes small stand-ins of them all).",
)

DATA_ROOT = typer.Option(
    DEFAULT_DATA_ROOT,
    "--data-root",
    help="The data root (LAVIS's cache layout; `qpert eval --data-root` reads it).",
)


MIRROR = typer.Option(
    None,
    "--mirror",
    help="A folder or http(s):// URL holding the sources under their published file names "
    "(flickr30k_test.json, flickr30k-images.zip, val2014.zip, ...), read instead of their origins: "
    "for institutional mirrors and machines without a network. Default: $QPERT_DATA_MIRROR.",
    show_default=False,
)
CATALOG = typer.Option(
    None,
    "--catalog",
    help='JSON {"<file name>": {"url", "md5", "sha256", "images", "members"}} overriding the published facts '
    "of those files (a mirror of other versions of them, such as scripts/make_data_mirror.py's stand-ins).",
    show_default=False,
)
FLICKR30K_IMAGES = typer.Option(
    None,
    "--flickr30k-images",
    help="A copy of the Flickr30K images you already have (Kaggle, LAVIS): flickr30k-images.zip or a folder "
    "holding <id>.jpg directly or under flickr30k-images/; read instead of the Hugging Face Hub.",
    show_default=False,
)


@data_app.command()
def fetch(
    names: list[str] = typer.Argument(
        ..., metavar="NAME", help="flickr30k, coco, coco-entities, fg, or all.", show_default=False
    ),
    data_root: Path = DATA_ROOT,
    mirror: Optional[str] = MIRROR,
    catalog: Optional[Path] = CATALOG,
    flickr30k_images: Optional[Path] = FLICKR30K_IMAGES,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be fetched and its size; write nothing."),
    rehash: bool = typer.Option(
        False, "--rehash", help="Hash the files already fetched instead of trusting their size; fetch changed ones."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Download the benchmarks, checked and resumable: only what evaluation needs.

    \b
    flickr30k      LAVIS test + val annotations (Karpathy: 1,000 + 1,014
                   images); those images from flickr30k-images.zip (Hugging
                   Face nlphuji/flickr30k, 4.4 GB, of which ~0.3 GB is read
                   when the server takes range requests); their Flickr30K
                   Entities boxes and phrases from annotations.zip
    coco           LAVIS Karpathy test + val annotations (5,000 + 5,000
                   images); those images from val2014.zip (6.6 GB, ~1.6 GB
                   read with range requests)
    coco-entities  coco_entities_release.json (~400 MB)
    fg             the MSCOCO-FG / Flickr30K-FG captions (2 MB, from the
                   authors' repository cwj1412/MSCOCO-Flikcr30K_FG)
    all            all of the above

    Every file is checked (published checksums, image counts, each image
    decoded, each archive member's CRC-32) before it takes its final name,
    and recorded with its SHA-256 in DATA/qpert-data.json. After Ctrl-C or a
    dropped connection, run the same command again: it resumes, and files
    already fetched cost no request. `qpert data verify` checks them later.
    """
    from .fetch import fetch_data

    try:
        report = fetch_data(
            names,
            data_root,
            mirror=mirror,
            catalog=catalog,
            flickr30k_images=flickr30k_images,
            dry_run=dry_run,
            progress=progress,
            rehash=rehash,
            echo=lambda message: typer.echo(message, err=True),
        )
    except KeyboardInterrupt:
        typer.secho("interrupted: what was fetched is kept; run the same command again to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(report.summary())


@data_app.command()
def verify(
    names: Optional[list[str]] = typer.Argument(
        None, metavar="NAME", help="Datasets to check (default: every one the manifest lists).", show_default=False
    ),
    data_root: Path = DATA_ROOT,
) -> None:
    """Hash every file DATA/qpert-data.json lists and compare: missing or changed files are an error."""
    from .fetch import verify_data

    typer.echo(verify_data(data_root, names).check().summary())


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
