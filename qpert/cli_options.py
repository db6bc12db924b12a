"""Options and parsers shared by the ``qpert`` commands (core, evaluation and photo search).

Values are checked as the command line is parsed, so a mistake is one ``error:`` line before
anything slow (loading a model) starts.
"""
from __future__ import annotations

import math

import typer

from .config import WEIGHT_COEFFICIENTS, QPertConfig


#: Largest fixed rank --threshold takes: more than any model's image tokens (ViT-g at 364 px has 677).
MAX_RANK = 100_000


def qpert_config(alpha: float, weight: str, threshold: str, keep_norm: bool, orthogonal: bool) -> QPertConfig:
    t: float | int
    try:
        t = int(threshold) if threshold.isdigit() else float(threshold)
    except ValueError:
        raise typer.BadParameter(f"--threshold takes a ratio in (0, 1) or an integer rank, got {threshold!r}")
    if isinstance(t, int) and t > MAX_RANK:
        raise typer.BadParameter(f"--threshold as a fixed rank takes 1 to {MAX_RANK}, got {threshold}")
    return QPertConfig(alpha=alpha, weight=weight, threshold=t, keep_norm=keep_norm,
                       mode="orthogonal" if orthogonal else "enhance")


def parse_box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise typer.BadParameter(f"a box is x0,y0,x1,y1 in pixels of the original image, got {text!r}")
    return values


def finite(value: float) -> float:
    """Parse-time check: inf and nan make every score NaN."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"takes a finite number, got {value}")
    return value


def check_device(value: str) -> str:
    """Parse-time check of --device: a device kind torch knows and this machine has ('auto' picks one)."""
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


ALPHA = typer.Option(8.0, callback=finite,
                     help="Scale alpha of the weight function (paper: 2-10 for BLIP-2). 0 turns Q-Pert off.")
WEIGHT = typer.Option("constant", help=f"Weight function of the object area: {', '.join(WEIGHT_COEFFICIENTS)}.")
THRESHOLD = typer.Option("0.99", help="Contribution-ratio threshold tau in (0, 1), or an integer fixed rank.")
KEEP_NORM = typer.Option(False, "--keep-norm", help="Rescale perturbed queries to their original norm.")
ORTHOGONAL = typer.Option(False, "--orthogonal", help="OrQ-Pert ablation: remove the object component instead.")
TRUST_REMOTE_CODE = typer.Option(False, "--trust-remote-code",
                                 help="Allow checkpoints that ship their own modeling code (InternVL-G) to run it.")
MODEL = typer.Option("blip2-coco", help="Registered name (`qpert models`), hub id or local folder.")
DEVICE = typer.Option("cpu", callback=check_device, help="cpu, cuda, cuda:1, ...")
DTYPE = typer.Option(None, help="fp32, fp16 or bf16 (default: the checkpoint's).")
COMPILE = typer.Option(False, "--compile", help="torch.compile the vision encoder: faster on a GPU for large "
                                                "galleries; the first batches wait for the compiler.")
