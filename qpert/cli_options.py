"""Options and parsers shared by the ``qpert`` commands (core, evaluation and photo search)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .config import Compat, Projector, QPertConfig


def qpert_config(
    alpha: float,
    weight: str,
    threshold: float,
    rank: Optional[int],
    keep_norm: bool,
    orthogonal: bool,
    compat: Compat = "paper",
    projector: Optional[Projector] = None,
) -> QPertConfig:
    """The QPertConfig of a command's options (a bad value is a ConfigError: one ``error:`` line)."""
    return QPertConfig(
        alpha=alpha,
        weight=weight,
        threshold=threshold,
        rank=rank,
        keep_norm=keep_norm,
        mode="orthogonal" if orthogonal else "enhance",
        compat=compat,
        projector=projector,
    )


def parse_box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise typer.BadParameter(f"a box is x0,y0,x1,y1 in pixels of the original image, got {text!r}")
    return values


def check_device(value: str) -> str:
    """Parse-time check of --device: a device kind torch knows and this machine has ('auto' picks one),
    so a mistake is one line before a model is loaded."""
    if value == "auto":
        return value
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise typer.BadParameter(f"unknown device {value!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise typer.BadParameter(f"{value}: no CUDA GPU is usable on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise typer.BadParameter(f"{value}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise typer.BadParameter(f"{value}: Apple's MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise typer.BadParameter(f"{value}: qpert runs on cpu, cuda or mps devices")
    return value


ALPHA = typer.Option(8.0, help="Scale alpha of the weight function (paper: 2-10 for BLIP-2). 0 turns Q-Pert off.")
WEIGHT = typer.Option(
    "constant",
    help="Weight function of the object area a: constant (alpha), area (alpha*a), "
    "inv_area (alpha*(1-a)), centered (alpha*(a-0.5)), inv_centered (alpha*(0.5-a)).",
)
THRESHOLD = typer.Option(0.99, help="Contribution-ratio threshold tau in (0, 1) that picks each subspace's rank.")
#: Largest --rank: more than any model's image tokens (ViT-g at 364 px has 677), small enough for torch's integers.
MAX_RANK = 100_000
RANK = typer.Option(None, min=1, max=MAX_RANK, help="A fixed rank for every subspace instead of --threshold.")
KEEP_NORM = typer.Option(False, "--keep-norm", help="Rescale perturbed queries to their original norm.")
ORTHOGONAL = typer.Option(False, "--orthogonal", help="OrQ-Pert ablation: remove the object component instead.")
TRUST_REMOTE_CODE = typer.Option(
    False, "--trust-remote-code", help="Allow checkpoints that ship their own modeling code (InternVL-G) to run it."
)
MODEL = typer.Option("blip2-coco", help="Registered name (`qpert models`), hub id or local folder.")
DEVICE = typer.Option("cpu", callback=check_device, help="cpu, cuda, cuda:1, ...")
DTYPE = typer.Option(None, help="fp32, fp16 or bf16 (default: the checkpoint's).")
COMPILE = typer.Option(
    False,
    "--compile",
    help="torch.compile the vision encoder: faster on a GPU for large "
    "galleries; the first batches wait for the compiler.",
)
COMPAT = typer.Option(
    "paper",
    help="paper: the paper's equations. official: what the official code (which produced the "
    "published numbers) computes: its projector, inv_area = -alpha*a, binarised box masks, "
    "box rules and metric conventions, in float32 (README: Reproducing the paper).",
)
PROJECTOR = typer.Option(
    None,
    help="Ablation control (with --compat paper): official (the official code's projector "
    "alone), random (a random subspace of the same rank per object) or identity (plain "
    "query scaling by 1 + mean weight). Default: the projector of --compat.",
)
EXCLUDE_SITE = typer.Option(
    [],
    "--exclude-site",
    help="Leave this cross-attention unperturbed (a site name or its "
    "prefix, e.g. clip_projector for InternVL-G); repeat for several.",
)

DEFAULT_CACHE = Path.home() / ".cache" / "qpert"
CACHE_DIR = typer.Option(DEFAULT_CACHE, help="Feature cache; a killed run resumes from it.")
NO_CACHE = typer.Option(False, "--no-cache", help="Keep features in memory only.")
BATCH = typer.Option(16, min=1, help="Images per vision / Q-Former forward.")
ITM_BATCH = typer.Option(128, min=1, help="(image, text) pairs per ITM forward.")
