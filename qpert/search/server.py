"""``qpert serve``: a local search page over an index, with a small JSON API.

Starlette on uvicorn (h11): one asyncio event loop holds every connection, so an idle or slow
client costs a socket and a few kilobytes, never a worker that others wait for. The model runs on
one thread of its own (PyTorch inference on one module from several threads is unsafe, and one
search at a time is what a CPU can do anyway), photos are read on a few others, and the loop keeps
answering the page, thumbnails and photos while a slow ITM search runs. Photos are served by
catalog id through ``PhotoIndex.open_photo`` and nothing else, so no request path ever reaches the
file system, and what is sent is read from the one descriptor that was checked.

uvicorn closes a connection that stays silent after a response (``timeout_keep_alive``);
:class:`GuardedProtocol` adds the deadlines it lacks (a silent new connection, a request head that
takes too long to arrive, as a slowloris sends it, a client that stops reading) and the connection
limit, decided when a connection arrives.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import parse_qs

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigError, UnsupportedModelError
from ..terminal import printable
from .catalog import PhotoRow
from .indexer import THUMBNAILS
from .photos import DECODE_ERRORS, file_hash
from .query_boxes import QueryBoxOptions
from .searcher import PhotoIndex
from .thumbnails import Thumbnails

T = TypeVar("T")

#: The page's files, by URL; nothing else under ``static/`` or elsewhere is served.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
PHOTO_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
PHOTO_ID = re.compile(r"[0-9]{1,18}")
MAX_K = 100
MAX_QUERY = 500
KEEP_ALIVE_TIMEOUT = 5.0  # seconds a connection may stay silent before its first or next request
HEADER_TIMEOUT = 10.0  # seconds a request line and headers may take to arrive in full, however they trickle
SEND_TIMEOUT = 20.0  # seconds a client may stop reading an answer before the connection is dropped
MAX_CONNECTIONS = 1024  # open connections; one arriving beyond them is answered 503
LISTEN_BACKLOG = 1024  # connections the kernel holds until the event loop accepts them
PHOTO_READERS = 4  # threads reading photos and making thumbnails (these decode two at a time)
CHUNK = 64 * 1024  # a photo is sent in pieces of this size, as fast as the client reads them
GRACE = 3.0  # seconds a stopping server gives the answers in progress
#: A Host header: a DNS name or IPv4 address, or a bracketed IPv6 address, with an optional port.
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::[0-9]{1,5})?")
DNS_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
#: Sent with every answer, uvicorn's own (400, 500, 503) included: uvicorn's ``headers`` setting.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'",
    "Cross-Origin-Resource-Policy": "same-origin",  # other sites' pages cannot embed the photos or answers
    "Referrer-Policy": "no-referrer",
}


class BadRequest(ValueError):
    """A request the page or a user got wrong: answered 400 with its message, never a traceback."""


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the deadlines and the connection limit it lacks.

    uvicorn times a connection out only while it is silent after a response. Here a new connection
    gets that same ``timeout_keep_alive`` before its first byte, each request head must arrive in full
    within ``header_timeout`` of the connection or the previous answer (a client trickling a byte at
    a time is still cut off), and a client that stops reading an answer for ``send_timeout`` is
    dropped. Each is a timer on the event loop: nothing waits on a thread.

    uvicorn's ``limit_concurrency`` counts the open connections when a request arrives, so a burst
    over the limit is refused whole; here a connection arriving while ``max_connections`` are open is
    the one refused: its request is answered 503 (uvicorn's own answer) and it is closed.
    """

    def __init__(self, *args: Any, header_timeout: float, send_timeout: float, max_connections: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.send_timeout, self.max_connections = header_timeout, send_timeout, max_connections
        self._head_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._answered: object = None  # the request cycle before the head being waited for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self.limit_concurrency = 0 if len(self.connections) > self.max_connections else None  # 0: refuse
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_deadline is not None and self.cycle is not self._answered:  # a request's head is in
            self._head_deadline.cancel()
            self._head_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:  # no pipelined request began
            self._await_head()

    def _await_head(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._answered = self.cycle
        self._head_deadline = self.loop.call_later(self.header_timeout, self.transport.close)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.send_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        for deadline in (self._head_deadline, self._send_deadline):
            if deadline is not None:
                deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a malformed request, with the security headers every answer carries."""
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"connection", b"close"),
        ]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=msg.encode()), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class HostAndMethodGuard:
    """Before any route: only GET (and HEAD), and only for a Host naming this machine (DNS rebinding).

    Starlette's ``TrustedHostMiddleware`` does not fit: it cuts the Host header at its first colon
    (so ``[::1]:8765`` becomes ``[``), has no address ranges (127.0.0.0/8) and compares names as
    written, not in their canonical form; ``host_allowed`` does all three.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str]):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not host_allowed(Headers(scope=scope).get("host", ""), self.allowed_hosts):
                return await _error("unknown Host header", 403)(scope, receive, send)
            if scope["method"] not in ("GET", "HEAD"):
                return await _error(f"{scope['method']} is not supported", 501)(scope, receive, send)
        await self.app(scope, receive, send)


class PhotoStream(Response):
    """The checked open photo, sent in ``CHUNK`` pieces as the client takes them (uvicorn waits while
    the client is behind): a connection holds a piece or two of memory whatever the photo's size, and
    nothing opens the file again by its path."""

    def __init__(self, photo: BinaryIO, media_type: str, read: Callable[..., Any]):
        self.photo, self.read = photo, read
        self.status_code, self.media_type, self.background = 200, media_type, None
        self.init_headers({"Cache-Control": "private, max-age=300"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while chunk := await self.read(self.photo.read, CHUNK):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.photo.close()


class ListeningSocket(socket.socket):
    """The listening socket, pausing ``accept`` for a moment once the process is out of descriptors.

    asyncio's accept loop (CPython 3.11) goes on calling ``accept`` up to ``backlog`` times after
    EMFILE, logging each failure and scheduling its one-second retry each time: a thousand calls and
    timers a second. Answering "nothing to accept" for the rest of that round leaves one retry."""

    _out_until = 0.0

    @classmethod
    def listen_on(cls, address: tuple[str, int]) -> ListeningSocket:
        sock = cls(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    def accept(self) -> tuple[socket.socket, Any]:
        if time.monotonic() < self._out_until:
            raise BlockingIOError(errno.EAGAIN, "not accepting for a moment: out of file descriptors")
        try:
            return super().accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._out_until = time.monotonic() + 0.5  # asyncio retries in 1 s
            raise


class SearchServer:
    """The page and API for ``index``, on a socket bound at once (see ``url``) and served by uvicorn in
    the thread that calls ``serve_forever`` until ``shutdown``."""

    def __init__(
        self,
        index: PhotoIndex,
        address: tuple[str, int],
        allowed_hosts: Iterable[str] = (),
        keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ):
        self.index = index
        self.allowed_hosts = allowed_host_names(address[0], allowed_hosts)
        self.socket = ListeningSocket.listen_on(address)
        self.server_address = self.socket.getsockname()
        self.thumbnails = Thumbnails(index.index_dir / THUMBNAILS)
        self.static = {
            route: (resources.files(__package__).joinpath("static", name).read_bytes(), ctype)
            for route, (name, ctype) in STATIC.items()
        }
        self._model = ThreadPoolExecutor(1, thread_name_prefix="qpert-model")
        self._readers = ThreadPoolExecutor(PHOTO_READERS, thread_name_prefix="qpert-photos")
        config = uvicorn.Config(
            self._app(),
            http=functools.partial(
                GuardedProtocol,
                header_timeout=header_timeout,
                send_timeout=send_timeout,
                max_connections=max_connections,
            ),
            loop="asyncio",
            ws="none",
            lifespan="off",
            interface="asgi3",
            timeout_keep_alive=keep_alive_timeout,  # type: ignore[arg-type]  # a float works: a call_later delay
            backlog=LISTEN_BACKLOG,
            timeout_graceful_shutdown=GRACE,  # type: ignore[arg-type]
            headers=list(SECURITY_HEADERS.items()),
            server_header=False,
            proxy_headers=False,  # no proxy in front: X-Forwarded-* are the client's own words
            log_config=None,  # leave the process's logging alone; uvicorn's warnings reach stderr
            log_level="warning",
            access_log=False,  # one line per request would drown the URL
        )
        config.load()
        self._uvicorn = uvicorn.Server(config)
        # uvicorn sets these on its first tick, after it has begun accepting: set before, no answer lacks them
        self._uvicorn.server_state.default_headers = list(config.encoded_headers)
        self._serving, self._stopped = threading.Event(), threading.Event()

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

    def serve_forever(self) -> None:
        """Serve until ``shutdown`` (or, in the main thread, SIGINT / SIGTERM, re-raised on the way out)."""
        self._serving.set()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (from another thread) and wait until it has returned."""
        self._uvicorn.should_exit = True
        if self._serving.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        self._model.shutdown(wait=False, cancel_futures=True)
        self._readers.shutdown(wait=False, cancel_futures=True)

    def _app(self) -> Starlette:
        routes = [Route(path, functools.partial(self._static, path)) for path in self.static]
        routes += [
            Route("/api/info", self._info),
            Route("/api/search", self._search),
            Route("/photo/{photo_id}", functools.partial(self._photo, thumbnail=False)),
            Route("/thumb/{photo_id}", functools.partial(self._photo, thumbnail=True)),
        ]
        app = Starlette(routes=routes, exception_handlers={404: _not_found})
        app.router.redirect_slashes = False  # /photo/1/ is not a photo: 404, not a redirect
        app.add_middleware(HostAndMethodGuard, allowed_hosts=self.allowed_hosts)
        return app

    async def _on(self, executor: ThreadPoolExecutor, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    async def _static(self, path: str, _request: Request) -> Response:
        body, ctype = self.static[path]
        return Response(body, media_type=ctype, headers={"Cache-Control": "no-cache"})

    async def _info(self, _request: Request) -> Response:
        return _json(await self._on(self._model, self._read_info))

    def _read_info(self) -> dict[str, Any]:
        self.index.refresh()
        return {
            "photos": len(self.index),
            "model": self.index.settings.model,
            "detector": self.index.settings.detector,
            "itm": self.itm_available,
            "query_boxes": self.index.settings.query_boxes is not None,
            "qpert": self.index.settings.qpert.to_dict(),
            "max_k": MAX_K,
        }

    async def _search(self, request: Request) -> Response:
        params = parse_qs(request.scope["query_string"].decode("latin-1"))
        try:
            return _json(await self._on(self._model, self._run_search, params))
        except (ValueError, UnsupportedModelError) as e:  # BadRequest, or the index refusing the query
            return _error(str(e), 400)
        except Exception as e:  # a bug, not a user mistake: log it, answer 500 JSON
            sys.stderr.write(f"qpert serve: search failed: {printable(repr(e))}\n")
            return _error(f"search failed: {e}", 500)

    def _run_search(self, params: Mapping[str, list[str]]) -> dict[str, Any]:
        start = time.perf_counter()
        self.index.refresh()  # a `qpert index` run finished meanwhile: answer from its index
        query, k, itm, compare = _search_params(params, self.itm_available)
        boxes = QueryBoxOptions() if _flag(params, "query_boxes") else None  # refused by indexes without
        hits = self.index.search(query, k=k, qpert=True, itm=itm, query_boxes=boxes)
        result: dict[str, Any] = {"query": query, "k": k, "itm": itm, "qpert": [h.to_json() for h in hits]}
        if compare:
            result["baseline"] = [h.to_json() for h in self.index.search(query, k=k, qpert=False, itm=itm)]
        result["seconds"] = round(time.perf_counter() - start, 4)
        return result

    async def _photo(self, request: Request, thumbnail: bool) -> Response:
        raw_id = request.path_params["photo_id"]
        if not PHOTO_ID.fullmatch(raw_id):
            return _error("not found", 404)
        try:
            if thumbnail:
                body = await self._on(self._readers, self._thumbnail, int(raw_id))
                return Response(body, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})
            photo, row = await self._on(self._readers, self.index.open_photo, int(raw_id))
        except (KeyError, *DECODE_ERRORS):  # unknown id, a link out of the folder, a photo gone or broken
            return _error("no such photo", 404)
        return PhotoStream(
            photo, PHOTO_TYPES[Path(row.path).suffix.lower()], functools.partial(self._on, self._readers)
        )

    def _thumbnail(self, photo_id: int) -> bytes:
        photo, row = self.index.open_photo(photo_id)
        with photo:
            return self.thumbnails.get(photo, _content_hash(photo, row))


async def _not_found(_request: Request, _exc: Exception) -> Response:
    return _error("not found", 404)


def _json(data: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(data), status, media_type="application/json", headers={"Cache-Control": "no-store"})


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


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
