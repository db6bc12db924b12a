"""Pickled checkpoints that hold more than tensors: refused by torch (``weights_only``), said in one line."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

from ..errors import UnloadableCheckpointError


@contextmanager
def tensor_only_pickles(source: Union[str, Path]) -> Iterator[None]:
    """Turns torch's refusal to unpickle Python objects (which could run any code) into a user error
    naming the files, instead of a traceback."""
    try:
        yield
    except pickle.UnpicklingError as e:
        folder = Path(source)
        pickles = sorted(str(p) for p in folder.glob("*.bin")) if folder.is_dir() else []
        raise UnloadableCheckpointError(
            f"{', '.join(pickles) or source} is not a loadable checkpoint: it pickles Python objects besides "
            "tensors, and qpert loads only safetensors files or pickles of plain tensors (unpickling anything "
            "else could run code); save the model again as safetensors (save_pretrained)"
        ) from e
