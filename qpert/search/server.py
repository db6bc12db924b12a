"""``qpert serve``: a local search page over an index, with a small JSON API.

Standard library only (``http.server``). Photos are served by catalog id through
``PhotoIndex.open_photo`` and nothing else, so no request path ever reaches the file system, and
what is sent is read from the one descriptor that was checked. One lock serializes the model:
PyTorch inference on one module from several threads is unsafe. A fixed pool of workers serves
the connections; when all are busy, new ones wait in the kernel's listen queue (back-pressure),
and every read has a timeout, so idle or slow clients cannot pile up threads or hold the server.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import queue
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigError, UnsupportedModelError
from ..terminal import printable
from .catalog import PhotoRow
from .indexer import THUMBNAILS
from .photos import DECODE_ERRORS, file_hash
from .query_boxes import QueryBoxOptions
from .searcher import PhotoIndex
from .thumbnails import Thumbnails

#: The page's files, by URL; nothing else under ``static/`` or elsewhere is served.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
PHOTO_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
PHOTO_ROUTE = re.compile(r"/(photo|thumb)/([0-9]{1,18})")
MAX_K = 100
MAX_QUERY = 500
WORKERS = 8  # connections served at once
REQUEST_TIMEOUT = 20.0  # seconds any read or write of a request may take
IDLE_TIMEOUT = 2.0  # seconds a connection may wait for its (next) request before it is closed
LISTEN_BACKLOG = 64  # connections the kernel holds while every worker is busy
#: A Host header: a DNS name or IPv4 address, or a bracketed IPv6 address, with an optional port.
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::[0-9]{1,5})?")
DNS_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'",
    "Cross-Origin-Resource-Policy": "same-origin",  # other sites' pages cannot embed the photos or answers
    "Referrer-Policy": "no-referrer",
}


class BadRequest(ValueError):
    """A request the page or a user got wrong: answered 400 with its message, never a traceback."""


class SearchServer(HTTPServer):
    """The HTTP server, holding the open index, the lock that serializes its model and its workers."""

    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        index: PhotoIndex,
        address: tuple[str, int],
        allowed_hosts: Iterable[str] = (),
        workers: int = WORKERS,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._workers: list[threading.Thread] = []  # none yet: a failed bind closes the server at once
        super().__init__(address, Handler)
        self.index = index
        self.allowed_hosts = allowed_host_names(address[0], allowed_hosts)
        self.request_timeout, self.idle_timeout = request_timeout, idle_timeout
        self.model_lock = threading.Lock()
        self.thumbnails = Thumbnails(index.index_dir / THUMBNAILS)
        self.static = {
            route: (resources.files(__package__).joinpath("static", name).read_bytes(), ctype)
            for route, (name, ctype) in STATIC.items()
        }
        self._free = threading.BoundedSemaphore(workers)
        self._connections: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(workers):
            self._workers.append(threading.Thread(target=self._work, name=f"qpert-serve-{i}", daemon=True))
            self._workers[-1].start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    @property
    def loopback_only(self) -> bool:
        """Bound to a loopback address: no other machine can connect."""
        return ipaddress.ip_address(self.server_address[0]).is_loopback

    @property
    def itm_available(self) -> bool:
        return bool(self.index.retriever.has_itm and self.index.settings.itm_features)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Hand the connection to a free worker; with none free, stop accepting until one is."""
        self._free.acquire()
        self._connections.put((request, client_address))

    def _work(self) -> None:
        while True:
            job = self._connections.get()
            if job is None:
                return
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                self._free.release()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Out of file descriptors (or memory): pause before the next try instead of spinning."""
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.1)
            raise

    def server_close(self) -> None:
        super().server_close()
        for _ in self._workers:
            self._connections.put(None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser hanging up early (a newer search drops the old images) is no reason for a traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: SearchServer
    server_version = "qpert"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout
        super().setup()

    def handle(self) -> None:
        """Requests of one connection, closed as soon as it stays idle for ``idle_timeout``."""
        self.close_connection = False
        while not self.close_connection and self._request_arrives():
            self.handle_one_request()

    def _request_arrives(self) -> bool:
        self.connection.settimeout(self.server.idle_timeout)
        try:
            return bool(self.rfile.peek(1))
        except OSError:  # timed out, or reset
            return False
        finally:
            self.connection.settimeout(self.timeout)

    def do_GET(self) -> None:
        if not host_allowed(self.headers.get("Host", ""), self.server.allowed_hosts):
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

    def _info(self) -> dict[str, Any]:
        with self.server.model_lock:
            self.server.index.refresh()
            index = self.server.index
            return {
                "photos": len(index),
                "model": index.settings.model,
                "detector": index.settings.detector,
                "itm": self.server.itm_available,
                "query_boxes": index.settings.query_boxes is not None,
                "qpert": index.settings.qpert.to_dict(),
                "max_k": MAX_K,
            }

    def _api_search(self, params: dict[str, list[str]]) -> None:
        try:
            start = time.perf_counter()
            with self.server.model_lock:
                self.server.index.refresh()  # a `qpert index` run finished meanwhile: answer from its index
                query, k, itm, compare = _search_params(params, self.server.itm_available)
                boxes = QueryBoxOptions() if _flag(params, "query_boxes") else None  # refused by indexes without
                hits = self.server.index.search(query, k=k, qpert=True, itm=itm, query_boxes=boxes)
                result = {"query": query, "k": k, "itm": itm, "qpert": [h.to_json() for h in hits]}
                if compare:
                    result["baseline"] = [
                        h.to_json() for h in self.server.index.search(query, k=k, qpert=False, itm=itm)
                    ]
            result["seconds"] = round(time.perf_counter() - start, 4)
        except (ValueError, UnsupportedModelError) as e:  # BadRequest, or the index refusing the query
            return self._send_json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
        except Exception as e:  # a bug, not a user mistake: log it, answer 500 JSON
            self.log_error("search failed: %r", e)
            return self._send_json({"error": f"search failed: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._send_json(result)

    def _photo(self, photo_id: int, thumbnail: bool) -> None:
        try:
            photo, row = self.server.index.open_photo(photo_id)
            with photo:
                if thumbnail:
                    body, ctype = self.server.thumbnails.get(photo, _content_hash(photo, row)), "image/jpeg"
                else:
                    body, ctype = photo.read(), PHOTO_TYPES[Path(row.path).suffix.lower()]
        except (KeyError, *DECODE_ERRORS):  # unknown id, a link out of the folder, a photo gone or broken
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

    def log_message(self, format: str, *args: Any) -> None:
        """Only errors reach the terminal: one line per request would drown the URL."""

    def log_error(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"qpert serve: {printable(format % args)}\n")


def _content_hash(photo: BinaryIO, row: PhotoRow) -> str:
    """The open photo's SHA-256: the catalog's while the file is as indexed, else read from it."""
    st = os.fstat(photo.fileno())
    if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == row.stat_key:
        return row.sha256
    sha = file_hash(photo)
    photo.seek(0)
    return sha


def allowed_host_names(bind_host: str, extra: Iterable[str]) -> frozenset[str]:
    """The Host names answered besides loopback ones: ``extra`` (``--allow-host``) and the address
    the server is bound to, unless that is a wildcard (0.0.0.0, ::)."""
    names = {host_name(name) for name in extra}
    if not is_wildcard(bind_host):
        names.add(host_name(bind_host))
    return frozenset(names)


def host_name(name: str) -> str:
    """``name`` as a Host header names it (lower case; an IPv6 address bracketed, in its short form);
    ``ConfigError`` when it is not a host name or address."""
    canonical = _canonical(name.strip().lower())
    if canonical is None:
        raise ConfigError(f"not a host name or address: {name!r}")
    return canonical


def _canonical(name: str) -> str | None:
    bracketed = name.startswith("[") and name.endswith("]")
    if bracketed or ":" in name:
        try:
            return f"[{ipaddress.IPv6Address(name[1:-1] if bracketed else name).compressed}]"
        except ValueError:
            return None
    return name if DNS_NAME.fullmatch(name) else None


def is_wildcard(host: str) -> bool:
    try:
        return host == "" or ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def check_exposure(host: str, allowed_hosts: list[str]) -> None:
    """A server on every interface must be told which Host names to answer: it never answers all."""
    if is_wildcard(host) and not allowed_hosts:
        raise ConfigError(
            f"--host {host or repr('')} listens on every network interface: add --allow-host NAME for "
            "each name or address browsers use to reach this machine (other Host headers are refused, "
            "against DNS rebinding)"
        )


def host_allowed(header: str, allowed: frozenset[str]) -> bool:
    """DNS rebinding: answer only a Host naming this machine's loopback (exactly: ``localhost``,
    127.x.y.z, [::1]) or one of ``allowed``; a port may follow."""
    match = HOST_HEADER.fullmatch(header.strip().lower())
    name = _canonical(match.group(1)) if match else None
    return name is not None and (name in allowed or _is_loopback(name))


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        address = ipaddress.IPv6Address(name[1:-1]) if name.startswith("[") else ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return address.is_loopback


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


def make_server(
    index: PhotoIndex, host: str = "127.0.0.1", port: int = 0, allowed_hosts: Iterable[str] = (), **options: Any
) -> SearchServer:
    """A server for ``index`` on ``host:port`` (0: any free port; see ``.url``); call ``serve_forever``.
    Listening on every interface (0.0.0.0, ::) needs ``allowed_hosts``: the names clients use for it."""
    allowed_hosts = list(allowed_hosts)
    check_exposure(host, allowed_hosts)
    try:
        return SearchServer(index, (host, port), allowed_hosts, **options)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from e


def serve(
    index_dir: Path, host: str = "127.0.0.1", port: int = 8765, device: str = "auto", allowed_hosts: Iterable[str] = ()
) -> None:
    """Open the index and serve its search page until Ctrl-C (also during loading: no traceback)."""
    allowed_hosts = [host_name(name) for name in allowed_hosts]
    check_exposure(host, allowed_hosts)  # before the slow part: loading the index
    try:
        index = PhotoIndex(index_dir, device=device)
        try:
            _serve_until_interrupted(make_server(index, host, port, allowed_hosts))
        finally:
            index.close()
    except KeyboardInterrupt:
        print("\nqpert: stopped", flush=True)


def _serve_until_interrupted(server: SearchServer) -> None:
    index = server.index
    if not server.loopback_only:
        names = ", ".join(sorted(server.allowed_hosts | {"localhost"}))
        print(
            f"warning: {server.url} is reachable from other machines: anyone who can connect can search and view "
            f"these photos (there is no password). Answering Host names: {names}",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"qpert: searching {len(index)} photos of {printable(str(index.photos_dir))} at {server.url}  (Ctrl-C to stop)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
