import os
import sys
from pathlib import Path

# Tiny models gain nothing from threads, and OpenMP spin-waits make them crawl when another
# process holds a core; subprocesses (the CLI tests) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
