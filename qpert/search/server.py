"""``qpert serve``: a local search page over an index, with a small JSON API.

Standard library only (``http.server``). Photos are served by catalog id through
``PhotoIndex.photo_path`` and nothing else, so no request path ever reaches the file system.
One lock serializes the model: PyTorch inference on one module from several threads is unsafe.
"""
from __future__ import annotations

import functools
import io
import json
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import UnsupportedModelError
from .photos import load_photo
from .searcher import PhotoIndex

#: The page's files, by URL; nothing else under ``static/`` or elsewhere is served.
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8"),
          "/static/favicon.svg": ("favicon.svg", "image/svg+xml")}
PHOTO_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
PHOTO_ROUTE = re.compile(r"/(photo|thumb)/([0-9]{1,18})")
THUMB_SIZE = 384  # longest side of a result's thumbnail, in pixels
MAX_K = 100
MAX_QUERY = 500
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class BadRequest(ValueError):
    """A request the page or a user got wrong: answered 400 with its message, never a traceback."""


class SearchServer(ThreadingHTTPServer):
    """The HTTP server, holding the open index and the lock that serializes its model."""

    daemon_threads = True

    def __init__(self, index: PhotoIndex, address: tuple[str, int]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.index = index
        self.model_lock = threading.Lock()
        self.itm_available = bool(index.retriever.has_itm and index.settings.itm_features)
        self.static = {route: (resources.files(__package__).joinpath("static", name).read_bytes(), ctype)
                       for route, (name, ctype) in STATIC.items()}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    @property
    def loopback_only(self) -> bool:
        """Bound to localhost: then only localhost Host headers are answered (DNS rebinding)."""
        return self.server_address[0] in ("127.0.0.1", "::1") or self.server_address[0].startswith("127.")

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser hanging up early (a newer search drops the old images) is no reason for a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: SearchServer
    server_version = "qpert"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._host_allowed():
            return self._send_json({"error": "unknown Host header"}, HTTPStatus.FORBIDDEN)
        url = urlsplit(self.path)
        if url.path in self.server.static:
            body, ctype = self.server.static[url.path]
            return self._send(body, ctype, cache="no-cache")
        if url.path == "/api/info":
            return self._send_json(self._info())
        if url.path == "/api/search":
            return self._api_search(parse_qs(url.query))
        match = PHOTO_ROUTE.fullmatch(url.path)
        if match:
            return self._photo(int(match.group(2)), thumbnail=match.group(1) == "thumb")
        self._send_json({"error": "not found"}, HTTPStatus.NOT_FOUND)

    def _host_allowed(self) -> bool:
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in LOOPBACK_NAMES or name.startswith("127.")

    def _info(self) -> dict[str, Any]:
        index = self.server.index
        return {"photos": len(index), "model": index.settings.model, "detector": index.settings.detector,
                "itm": self.server.itm_available, "qpert": index.settings.qpert.to_dict(), "max_k": MAX_K}

    def _api_search(self, params: dict[str, list[str]]) -> None:
        try:
            query, k, itm, compare = _search_params(params, self.server.itm_available)
            start = time.perf_counter()
            with self.server.model_lock:
                result = {"query": query, "k": k, "itm": itm,
                          "qpert": [h.to_json() for h in self.server.index.search(query, k=k, qpert=True, itm=itm)]}
                if compare:
                    result["baseline"] = [h.to_json()
                                          for h in self.server.index.search(query, k=k, qpert=False, itm=itm)]
            result["seconds"] = round(time.perf_counter() - start, 4)
        except (ValueError, UnsupportedModelError) as e:  # BadRequest, or the index refusing the query
            return self._send_json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
        except Exception as e:  # a bug, not a user mistake: log it, answer 500 JSON
            self.log_error("search failed: %r", e)
            return self._send_json({"error": f"search failed: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._send_json(result)

    def _photo(self, photo_id: int, thumbnail: bool) -> None:
        try:
            path = self.server.index.photo_path(photo_id)
            ctype = PHOTO_TYPES[path.suffix.lower()]
            if thumbnail:
                body, ctype = _thumbnail(path, path.stat().st_mtime_ns), "image/jpeg"
            else:
                body = path.read_bytes()
        except (KeyError, OSError, ValueError):  # unknown id, a link out of the folder, a photo gone or broken
            return self._send_json({"error": "no such photo"}, HTTPStatus.NOT_FOUND)
        self._send(body, ctype, cache="private, max-age=300")

    def _send_json(self, data: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(data).encode(), "application/json", status, cache="no-store")

    def _send(self, body: bytes, ctype: str, status: HTTPStatus = HTTPStatus.OK, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        """Every answer, http.server's own error pages included, carries the security headers."""
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        """Only errors reach the terminal: one line per request would drown the URL."""

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        sys.stderr.write(f"qpert serve: {format % args}\n")


@functools.lru_cache(maxsize=1024)
def _thumbnail(path: Path, mtime_ns: int) -> bytes:
    """A small upright JPEG of the photo (``mtime_ns`` keys the cache: an edited photo gets a new one).
    Results pages stay light whatever the cameras' resolution; the full view loads the photo itself."""
    image = load_photo(path)
    image.thumbnail((THUMB_SIZE, THUMB_SIZE))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _search_params(params: dict[str, list[str]], itm_available: bool) -> tuple[str, int, bool, bool]:
    """(query, k, itm, compare) from the query string, or ``BadRequest`` saying what is wrong."""
    query = params.get("q", [""])[0].strip()
    if not query:
        raise BadRequest("the search query is empty: type what to look for")
    if len(query) > MAX_QUERY:
        raise BadRequest(f"the search query is too long ({len(query)} characters, at most {MAX_QUERY})")
    raw_k = params.get("k", ["10"])[0]
    if not re.fullmatch(r"[0-9]{1,3}", raw_k) or not 1 <= int(raw_k) <= MAX_K:
        raise BadRequest(f"k must be a whole number from 1 to {MAX_K}, got {raw_k!r}")
    itm, compare = _flag(params, "itm"), _flag(params, "compare")
    if itm and not itm_available:
        raise BadRequest("ITM re-ranking is not available for this index (no ITM head or no stored vision tokens)")
    return query, int(raw_k), itm, compare


def _flag(params: dict[str, list[str]], name: str) -> bool:
    value = params.get(name, ["0"])[0]
    if value not in ("0", "1"):
        raise BadRequest(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def make_server(index: PhotoIndex, host: str = "127.0.0.1", port: int = 0) -> SearchServer:
    """A server for ``index`` on ``host:port`` (0: any free port; see ``.url``); call ``serve_forever``."""
    try:
        return SearchServer(index, (host, port))
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from e


def serve(index_dir: Path, host: str = "127.0.0.1", port: int = 8765, device: str = "auto") -> None:
    """Open the index and serve its search page until Ctrl-C (also during loading: no traceback)."""
    try:
        index = PhotoIndex(index_dir, device=device)
        try:
            _serve_until_interrupted(make_server(index, host, port))
        finally:
            index.close()
    except KeyboardInterrupt:
        print("\nqpert: stopped", flush=True)


def _serve_until_interrupted(server: SearchServer) -> None:
    index = server.index
    print(f"qpert: searching {len(index)} photos of {index.photos_dir} at {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
