"""Running the command line inside the test process: no interpreter start-up (seconds per call)."""

from __future__ import annotations

import sys
from typing import NamedTuple

import pytest

from qpert import cli


class CliRun(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> CliRun:
    """``qpert ARGS`` through ``cli.main()``: its exit code and what it printed. For error paths and short
    commands; runs whose logging or child processes matter go through a subprocess instead."""
    monkeypatch.setattr(sys, "argv", ["qpert", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return CliRun(code if isinstance(code, int) else int(code is not None), out, err)
