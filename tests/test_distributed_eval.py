"""``torchrun -m qpert eval`` on two gloo processes (CPU): the JSON of one process, a shared cache that any
number of ranks can read, and a resume after a rank is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.bench import eval_args, qpert_cli

from qpert.synthetic.mirror import write_mirror

pytestmark = pytest.mark.slow
#: gloo on CPUs here; bench/gpu_check.sh sets ``cuda`` on a machine with two GPUs (NCCL).
DEVICE = os.environ.get("QPERT_DISTRIBUTED_DEVICE", "cpu")


def common(root, model) -> list[str]:
    """Small shards and ITM blocks, so that both ranks get work in every stage."""
    return [
        *eval_args(model, root),
        "--boxes",
        "entities",
        "--itm",
        "--k",
        "3",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--itm-batch-size",
        "5",
        "--pairs-per-block",
        "40",
        "--object-baseline",
        "--alpha",
        "6",
        "--device",
        DEVICE,
    ]


def torchrun(*args: str, nproc: int = 2, **popen) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "qpert",
        *args,
    ]


def comparable(path: Path) -> dict:
    """The JSON without what may differ between runs of different sizes: the time and the world size."""
    data = json.loads(path.read_text())
    world = data["settings"].pop("world_size")
    data["settings"].pop("seconds")
    return {"world": world, "data": data}


def files(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*.safetensors")}


def test_two_processes_give_the_json_of_one_and_share_their_cache(bench, tmp_path):
    root, model = bench
    single = qpert_cli(*common(root, model), "--cache-dir", str(tmp_path / "one"), "--output", str(tmp_path / "1.json"))
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        torchrun(*common(root, model), "--cache-dir", str(tmp_path / "two"), "--output", str(tmp_path / "2.json")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.count("wrote ") == 1 and multi.stdout.count("(paper compat)") == 1, "rank 0 alone reports"
    assert "rank 0" in multi.stdout and "rank 1" in multi.stdout and "pairs/s" in multi.stdout
    one, two = comparable(tmp_path / "1.json"), comparable(tmp_path / "2.json")
    assert (one["world"], two["world"]) == (1, 2)
    assert two["data"] == one["data"]
    assert list(two["data"]) == list(one["data"])  # the same methods, in the same order
    # a cache written by two ranks serves one, computing nothing again
    written = files(tmp_path / "two")
    again = qpert_cli(*common(root, model), "--cache-dir", str(tmp_path / "two"), "--output", str(tmp_path / "3.json"))
    assert again.returncode == 0, again.stderr
    assert files(tmp_path / "two") == written
    assert comparable(tmp_path / "3.json")["data"] == one["data"]


def workers_of(launcher: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (read from /proc: their RANK environment variable)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_a_killed_rank_resumes_to_the_same_json(bench, tmp_path):
    root, model = bench
    single = qpert_cli(*common(root, model), "--no-cache", "--output", str(tmp_path / "1.json"))
    assert single.returncode == 0, single.stderr
    cache = tmp_path / "cache"
    args = torchrun(*common(root, model), "--cache-dir", str(cache), "--output", str(tmp_path / "killed.json"))
    launcher = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None and not list(cache.rglob("itc/*.safetensors")):
        time.sleep(0.005)
    workers = workers_of(launcher.pid)
    assert launcher.poll() is None and 1 in workers, "the run ended before a rank could be killed"
    os.kill(workers[1], signal.SIGKILL)
    assert launcher.wait(timeout=300) != 0
    assert not (tmp_path / "killed.json").exists()
    done = files(cache)
    resumed = subprocess.run(args[:-1] + [str(tmp_path / "2.json")], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert done and done < files(cache)
    assert comparable(tmp_path / "2.json")["data"] == comparable(tmp_path / "1.json")["data"]


def test_reproduce_under_torchrun_fetches_once_and_equals_one_process(tmp_path):
    mirror = tmp_path / "mirror"
    write_mirror(mirror)

    def args(name: str) -> list[str]:
        return [
            *("reproduce", "official-example", "--model", "blip2-shapes", "--device", DEVICE, "--no-progress"),
            *("--mirror", str(mirror), "--catalog", str(mirror / "qpert-catalog.json")),
            *("--data-root", str(tmp_path / f"data-{name}"), "--output-dir", str(tmp_path / name)),
            *("--cache-dir", str(tmp_path / f"cache-{name}")),
        ]

    single = qpert_cli(*args("one"))
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(torchrun(*args("two")), capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr
    assert multi.stderr.count("fetched 44 files") == 1, "rank 0 alone fetches"
    assert multi.stdout.count("wrote ") == 1
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert two["comparison"] == one["comparison"]
