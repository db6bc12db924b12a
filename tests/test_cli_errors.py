"""A user's mistake on the command line ends with one ``error:`` line and exit code 2, never a traceback;
a bug still shows its traceback."""
from __future__ import annotations

import json
import sys

import pytest

from qpert import cli
from qpert.models import registry

EVAL = ["eval", "--model", "{model}", "--dataset", "flickr30k", "--data-root", "{root}", "--no-cache"]
CASES = [
    (EVAL + ["--shard-size", "0"], "--shard-size"),
    (EVAL + ["--batch-size", "0"], "--batch-size"),
    (EVAL + ["--itm", "--k", "-1"], "--k"),
    (EVAL + ["--threshold", "1.5"], "(0, 1)"),
    (EVAL + ["--rank", "0"], "--rank"),
    (EVAL + ["--alpha", "inf"], "finite"),
    (EVAL + ["--alpha", "nan"], "finite"),
    (EVAL + ["--weight", "square"], "--weight"),
    (EVAL + ["--compat", "lavis"], "--compat"),
    (EVAL + ["--config", "{tmp}/list.json"], "JSON object"),
    (EVAL + ["--config", "{tmp}/missing.json"], "missing.json"),
    (EVAL + ["--config", "{tmp}/broken.json"], "JSON"),
    (EVAL + ["--compat", "official", "--dtype", "fp16"], "float32"),
    (EVAL + ["--dtype", "fp64"], "dtype"),
    (EVAL + ["--max-boxes", "0"], "--max-boxes"),
    (["eval", "--model", "no-such-model", "--dataset", "flickr30k", "--data-root", "{root}"], "unknown model"),
    (["eval", "--model", "{model}", "--dataset", "flickr31k", "--data-root", "{root}", "--no-cache"], "dataset"),
    (["tune", "--model", "{model}", "--dataset", "flickr30k", "--data-root", "{root}", "--no-cache", "--split", "test",
      "--select-by", "t2i R@2"], "select_by"),
    (["demo", "--seeds", "9"], "--seeds"),
    (["score", "{tmp}/missing.png", "-t", "x"], "no such image"),
    (["no-such-command"], "No such command"),
]


@pytest.mark.parametrize("args,message", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_user_mistakes_are_one_error_line(bench, tmp_path, monkeypatch, capsys, args, message):
    root, model = bench
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    (tmp_path / "broken.json").write_text("{not json")
    argv = [a.format(model=model, root=root, tmp=tmp_path) for a in args]
    monkeypatch.setattr(sys, "argv", ["qpert", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_a_bug_is_not_disguised_as_a_user_error(monkeypatch):
    """Only QPertError, OSError and option errors become one line: a ValueError from qpert's own code is a bug."""

    class Broken(dict):
        def values(self):
            raise ValueError("range() arg 3 must not be zero")

    monkeypatch.setattr(sys, "argv", ["qpert", "models"])
    monkeypatch.setattr(registry, "MODELS", Broken())
    with pytest.raises(ValueError, match="range"):
        cli.main()
