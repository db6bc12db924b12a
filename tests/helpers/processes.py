"""Killing a real command line run mid-way, for the resume tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence


def kill_when(args: Sequence[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Start ``args`` and SIGKILL it as soon as ``ready()`` (polled every 5 ms); fail if it ended first."""
    proc = subprocess.Popen(list(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
