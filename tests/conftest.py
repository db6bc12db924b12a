import os
import sys
from pathlib import Path

# Tiny models gain nothing from threads, and OpenMP spin-waits make them crawl when another
# process holds a core; subprocesses (the CLI tests) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402
from helpers.bench import build_bench  # noqa: E402


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """The fixture benchmark (helpers/bench.py): (data root, tiny BLIP-2 folder), built once per session."""
    return build_bench(tmp_path_factory.mktemp("data"))
