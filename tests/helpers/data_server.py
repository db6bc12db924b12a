"""A local HTTP server for the `qpert data fetch` tests: serves a folder, with the faults real servers have.

Switches: range requests on or off, a connection dropped after N bytes of a file (once), wrong bytes
for a file (once or always), 404 for a file, redirects (the Hugging Face ``resolve`` URL). Every
request is logged with its range and the bytes sent, so tests see what was asked for.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    name: str  # the path asked for, without the leading slash
    range: Optional[tuple[int, int]]  # served bytes [start, end) of a 206; None for a whole file
    status: int
    sent: int  # body bytes written
    dropped: bool = False
    user_agent: str = ""


class DataServer:
    """Serves ``folder`` on 127.0.0.1 (any free port) from a thread; use as a context manager."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.ranges = True
        self.log: list[Request] = []
        self.redirects: dict[str, str] = {}  # path -> path it redirects to (302)
        self.missing: set[str] = set()
        self._drops: dict[str, int] = {}
        self._wrong: dict[str, tuple[int, bool]] = {}  # name -> (offset of the flipped byte, always)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def drop(self, name: str, after: int) -> None:
        """Close the connection after ``after`` body bytes of the first longer response for ``name``."""
        self._drops[name] = after

    def corrupt(self, name: str, offset: Optional[int] = None, always: bool = False) -> None:
        """Flip the byte at ``offset`` (default: the middle) in the first response covering it, or in every one."""
        size = (self.folder / name).stat().st_size
        self._wrong[name] = (size // 2 if offset is None else offset, always)

    def requests(self, name: str) -> list[Request]:
        return [r for r in self.log if r.name == name]

    def sent(self, name: str) -> int:
        return sum(r.sent for r in self.requests(name))

    def __enter__(self) -> DataServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _body(self, name: str, data: bytes, start: int) -> tuple[bytes, int]:
        """The bytes to send from ``start`` (a fault applied), and after how many to drop (-1: none)."""
        with self._lock:
            if name in self._wrong:
                offset, always = self._wrong[name]
                if start <= offset < start + len(data):
                    data = bytearray(data)
                    data[offset - start] ^= 0xFF
                    data = bytes(data)
                    if not always:
                        del self._wrong[name]
            after = self._drops.get(name, -1)
            if 0 <= after < len(data):
                del self._drops[name]
                return data, after
        return data, -1


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def _handler(server: DataServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path)
            name = path.lstrip("/")
            agent = self.headers.get("User-Agent", "")
            if path in server.redirects:
                self.send_response(302)
                self.send_header("Location", server.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                server.log.append(Request(name, None, 302, 0, user_agent=agent))
                return
            file = server.folder / name
            if name in server.missing or not file.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                server.log.append(Request(name, None, 404, 0, user_agent=agent))
                return
            data = file.read_bytes()
            match = _RANGE.match(self.headers.get("Range", ""))
            start, end, status = 0, len(data), 200
            if match and server.ranges:
                start = int(match.group(1))
                end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
                status = 206
            body, drop_after = server._body(name, data[start:end], start)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            sent = body if drop_after < 0 else body[:drop_after]
            self.wfile.write(sent)
            server.log.append(
                Request(name, (start, end) if status == 206 else None, status, len(sent), drop_after >= 0, agent)
            )
            if drop_after >= 0:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

    return Handler


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
