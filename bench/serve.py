"""`qpert serve` under load: search latency and errors with many concurrent searches and idle connections.

A tiny random BLIP-2 and DETR index 8 generated photos (the server's own cost, not the model's), the
server runs in a process of its own, and an asyncio client in this one measures each search from
connect to the last byte of the answer (``GET /api/search?q=...&k=10``, ``Connection: close``):

- ``sequential``: searches one after another, nothing else connected;
- ``idle``: the same beside 100 connections held open by a slowloris (half of them silent, half
  trickling a header byte a second, each reopened as soon as the server closes it);
- ``burst``: 1,200 searches started at once (1,200 connections);
- ``burst+idle``: the burst beside the 100 held connections.

An error is any answer but 200, a reset, or no answer within ``--timeout`` seconds.
``--before FILE`` serves with another ``server.py`` (``git show REV:qpert/search/server.py > FILE``)
to compare on the same machine.

    python bench/serve.py --json bench/out/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import multiprocessing
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

REQUEST = b"GET /api/search?q=a+red+square&k=10 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def _serve(index_dir: str, before: str | None, options: dict[str, Any], ports: Any) -> None:
    """The server process: ``make_server`` of this tree's server.py, or of ``before``."""
    from qpert.search.searcher import PhotoIndex

    if before:
        spec = importlib.util.spec_from_file_location("qpert.search._server_before", before)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        make_server = module.make_server
    else:
        from qpert.search.server import make_server
    server = make_server(PhotoIndex(Path(index_dir), device="cpu"), **options)
    ports.put(server.server_address[1])
    server.serve_forever()


async def _search(port: int, timeout: float) -> tuple[float, str]:
    """(seconds, outcome): the status code, or the error."""

    async def ask() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        answer = await reader.read()
        writer.close()
        return answer

    start = time.perf_counter()
    try:
        outcome = (await asyncio.wait_for(ask(), timeout))[9:12].decode() or "empty"
    except asyncio.TimeoutError:
        outcome = "timeout"
    except OSError as e:
        outcome = type(e).__name__
    return time.perf_counter() - start, outcome


async def _hold(port: int, trickle: bool, stop: asyncio.Event) -> None:
    """One slowloris connection, reopened whenever the server closes it, until ``stop``."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if trickle:
                writer.write(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\n")
            while not stop.is_set() and not reader.at_eof():
                if trickle:
                    writer.write(b"X")
                    await writer.drain()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.read(1024), 1.0)
            writer.close()
        except OSError:
            await asyncio.sleep(0.1)


async def _phase(port: int, searches: int, concurrent: bool, idle: int, timeout: float) -> dict[str, Any]:
    stop = asyncio.Event()
    holders = [asyncio.create_task(_hold(port, i % 2 == 1, stop)) for i in range(idle)]
    await asyncio.sleep(2.0 if idle else 0)  # the held connections are open
    start = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*[_search(port, timeout) for _ in range(searches)])
    else:
        results = [await _search(port, timeout) for _ in range(searches)]
    wall = time.perf_counter() - start
    stop.set()
    await asyncio.gather(*holders)
    ok = [t for t, outcome in results if outcome == "200"]
    errors: dict[str, int] = {}
    for _, outcome in results:
        if outcome != "200":
            errors[outcome] = errors.get(outcome, 0) + 1
    return {
        "searches": searches,
        "concurrent": concurrent,
        "idle_connections": idle,
        "ok": len(ok),
        "errors": errors,
        "p50_ms": round(1000 * float(np.percentile(ok, 50)), 1) if ok else None,
        "p95_ms": round(1000 * float(np.percentile(ok, 95)), 1) if ok else None,
        "max_ms": round(1000 * max(ok), 1) if ok else None,
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=100, help="searches one at a time")
    parser.add_argument("--burst", type=int, default=1200, help="searches started at once")
    parser.add_argument("--idle", type=int, default=100, help="connections a slowloris holds open")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a search counts as lost")
    parser.add_argument("--max-connections", type=int, default=None, help="the server's limit (default: its own)")
    parser.add_argument("--before", type=Path, default=None, help="serve with this server.py instead")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from helpers.search_fixtures import photo_folder, save_tiny_blip2, save_tiny_detr

    from qpert import QPertConfig
    from qpert.search.detectors import DetectorOptions
    from qpert.search.indexer import IndexSettings, build_index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = IndexSettings(
            model=str(save_tiny_blip2(root / "model")),
            detector=str(save_tiny_detr(root / "detr")),
            detector_options=DetectorOptions(score_threshold=0.0, max_boxes=3),
            qpert=QPertConfig(alpha=4),
        )
        build_index(photo_folder(root / "photos", count=8), root / "index", settings, device="cpu", progress=False)
        options = {} if args.max_connections is None else {"max_connections": args.max_connections}
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        before = str(args.before) if args.before else None
        server = context.Process(target=_serve, args=(str(root / "index"), before, options, ports), daemon=True)
        server.start()
        try:
            port = ports.get(timeout=120)
            asyncio.run(_search(port, args.timeout))  # the model's first run
            phases = {
                "sequential": (args.sequential, False, 0),
                "idle": (args.sequential, False, args.idle),
                "burst": (args.burst, True, 0),
                "burst+idle": (args.burst, True, args.idle),
            }
            rows = []
            for name, (searches, concurrent, idle) in phases.items():
                row = {"phase": name, **asyncio.run(_phase(port, searches, concurrent, idle, args.timeout))}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            server.terminate()
            server.join()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"machine": platform.processor() or platform.machine(), "server": before or "this tree", "rows": rows}
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
