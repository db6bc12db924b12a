"""A tiny random InternVL-G built from InternVL's own remote code, which the repository does not vendor.

The code is what the Hugging Face checkpoint ``OpenGVLab/InternVL-14B-224px`` ships: the
``internvl_huggingface`` files of OpenGVLab/InternVL (``clip_benchmark/clip_benchmark/models/``).
``copy_remote_code`` looks for them, in order, in ``$QPERT_INTERNVL_SOURCE`` (a folder holding them, or
a checkout or bare clone of OpenGVLab/InternVL), in the Hugging Face cache of the checkpoint, and in
this workspace's mirror of the repository; tests skip when none has them.

``build_tiny_remote`` writes a folder like the checkpoint's (``config.json`` with ``auto_map``, the
code, weights, a tokenizer) and returns the model built from the code's own classes, on the CPU,
outside any loader: what a loaded copy must equal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from helpers.internvl_standin import tiny_tokenizer_dir

CHECKPOINT = "OpenGVLab/InternVL-14B-224px"
REPO_FOLDER = "clip_benchmark/clip_benchmark/models/internvl_huggingface"
MIRROR = Path("/work/.mirror/OpenGVLab+InternVL/repo")
FILES = (
    "configuration_intern_vit.py",
    "configuration_internvl.py",
    "flash_attention.py",
    "modeling_intern_vit.py",
    "modeling_internvl.py",
    "modeling_qllama.py",
)
SKIP_REASON = (
    "InternVL's remote code is not here: set QPERT_INTERNVL_SOURCE to a clone of "
    f"github.com/OpenGVLab/InternVL (or a folder with {', '.join(FILES)})"
)

#: QLLaMA's cross-attention hard-codes 3200 vision features and its decoder layer 96 queries.
VISION, QUERIES = 3200, 96
HIDDEN, HEADS, LAYERS, EMBED, POOL_HEADS, IMAGE, PATCH = 32, 4, 4, 16, 16, 56, 14


def _from_folder(folder: Path, target: Path) -> bool:
    if not all((folder / name).is_file() for name in FILES):
        return False
    for name in FILES:
        shutil.copy(folder / name, target / name)
    return True


def _from_git(git_dir: Path, target: Path) -> bool:
    if not (git_dir / "HEAD").is_file() or shutil.which("git") is None:
        return False
    for name in FILES:
        shown = subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"HEAD:{REPO_FOLDER}/{name}"], capture_output=True, timeout=60
        )
        if shown.returncode != 0:
            return False
        (target / name).write_bytes(shown.stdout)
    return True


def _from_hub_cache(target: Path) -> bool:
    from huggingface_hub import try_to_load_from_cache

    cached = [try_to_load_from_cache(CHECKPOINT, name) for name in FILES]
    return all(isinstance(path, str) for path in cached) and _from_folder(Path(cached[0]).parent, target)


def copy_remote_code(target: Path) -> Optional[str]:
    """Copy the remote code into ``target``; where it came from, or None when nowhere has it."""
    given = os.environ.get("QPERT_INTERNVL_SOURCE")
    if given:
        root = Path(given).expanduser()
        if (
            _from_folder(root, target)
            or _from_folder(root / REPO_FOLDER, target)
            or _from_git(root, target)
            or _from_git(root / ".git", target)
        ):
            return given
    if _from_hub_cache(target):
        return f"the Hugging Face cache of {CHECKPOINT}"
    if _from_git(MIRROR, target):
        return str(MIRROR)
    return None


def tiny_config() -> dict:
    """The checkpoint's ``config.json``, shrunk: one ViT layer, four QLLaMA layers (cross-attention in 0 and 2)."""
    return {
        "architectures": ["InternVLModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl.InternVLConfig",
            "AutoModel": "modeling_internvl.InternVLModel",
        },
        "model_type": "internvl",
        "torch_dtype": "float32",
        "clip_embed_dim": EMBED,
        "attn_pool_num_heads": POOL_HEADS,
        "num_query_token": QUERIES,
        "cross_attention_frequency": 2,
        "vision_config": {
            "hidden_size": VISION,
            "num_attention_heads": 25,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "image_size": IMAGE,
            "patch_size": PATCH,
            "qkv_bias": False,
            "qk_normalization": True,
        },
        "qllama_config": {
            "hidden_size": HIDDEN,
            "num_attention_heads": HEADS,
            "intermediate_size": 64,
            "num_hidden_layers": LAYERS,
            "vocab_size": 40,
            "max_position_embeddings": 128,
        },
    }


def _randomize(model: nn.Module, seed: int) -> None:
    """Weights that make every attention non-trivial: matrices scaled by their fan-in (a 3200-wide
    attention saturates otherwise), norms around 1, everything else (biases, queries) around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rpartition(".")[0].rpartition(".")[2]
            if "norm" in module and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                std = p[0].numel() ** -0.5 if name.endswith("weight") and p.dim() > 1 else 0.2
                p.copy_(std * torch.randn(p.shape, generator=g))


def build_tiny_remote(folder: Path) -> Optional[nn.Module]:
    """Write the tiny checkpoint into ``folder``; the model built from its classes, or None without the code."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    if copy_remote_code(folder) is None:
        return None
    (folder / "config.json").write_text(json.dumps(tiny_config(), indent=1))
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.vision_config.use_flash_attn = False  # flash_attn (where installed) runs on CUDA only
    model = transformers.AutoModel.from_config(config, trust_remote_code=True)
    _randomize(model, seed=0)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors", {"format": "pt"}
    )
    tiny_tokenizer_dir(folder)
    return model.eval()
