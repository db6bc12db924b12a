"""``qpert serve``: the JSON API and photo route over HTTP, Ctrl-C, and the page in headless Chromium."""

from __future__ import annotations

import dataclasses
import errno
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from types import SimpleNamespace
from urllib.error import HTTPError
from urllib.parse import urlencode, urlsplit
from urllib.request import urlopen

import numpy as np
import pytest
from helpers.search_fixtures import photo_folder, save_tiny_blip2, save_tiny_detr, write_photo
from PIL import Image

from qpert import QPertConfig
from qpert.search.detectors import DetectorOptions
from qpert.search.indexer import IndexSettings, build_index
from qpert.search.searcher import PhotoIndex
from qpert.search.server import make_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
QUERY = "a red square"
PHOTOS = 8
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """Six photos, a phone photo turned by its EXIF tag, and an indexed photo later replaced by a symlink
    pointing outside the folder (the indexer itself never follows such links)."""
    root = tmp_path_factory.mktemp("serve")
    photos = photo_folder(root / "photos")
    rotated = Image.open(write_photo(photos / "album1" / "rotated.jpg", seed=7))  # stored 64 wide, 48 high
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # shown turned 90 degrees clockwise: 48 wide, 64 high
    rotated.save(photos / "album1" / "rotated.jpg", exif=exif)
    link = write_photo(photos / "album0" / "link.jpg", seed=99)
    settings = IndexSettings(
        model=str(save_tiny_blip2(root / "model")),
        detector=str(save_tiny_detr(root / "detr")),
        detector_options=DetectorOptions(score_threshold=0.0, max_boxes=3),
        qpert=QPertConfig(alpha=4),
    )
    build_index(photos, root / "index", settings, device="cpu", batch_size=4, progress=False)
    link.unlink()
    link.symlink_to(write_photo(root / "outside" / "secret.jpg", seed=99))
    return root / "index"


@pytest.fixture(scope="module")
def served(index_dir):
    index = PhotoIndex(index_dir, device="cpu")
    server = make_server(index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ids = {r.path: r.id for r in index.rows.values()}
    yield SimpleNamespace(
        url=server.url, index=index, link_id=ids["album0/link.jpg"], rotated=index.rows[ids["album1/rotated.jpg"]]
    )
    server.shutdown()
    server.server_close()
    index.close()


def get(url: str) -> tuple[int, Message, bytes]:
    """Status, headers (looked up in any case, as HTTP names them) and body."""
    try:
        with urlopen(url, timeout=60) as response:
            return response.status, response.headers, response.read()
    except HTTPError as e:
        return e.code, e.headers, e.read()


def raw_get(base: str, path: str, host: str | None = None) -> tuple[int, Message, bytes]:
    """A GET of ``path`` exactly as written (urllib would not send some of these)."""
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def search(served, **params) -> tuple[int, dict]:
    status, headers, body = get(served.url + "api/search?" + urlencode(params))
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def test_info(served):
    status, headers, body = get(served.url + "api/info")
    info = json.loads(body)
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    assert info["photos"] == len(served.index) == PHOTOS
    assert info["model"] == served.index.settings.model and info["detector"] == served.index.settings.detector
    assert info["itm"] is True and info["qpert"]["alpha"] == 4


def test_search_json_matches_the_index(served):
    status, data = search(served, q=QUERY, k=4)
    assert status == 200 and data["query"] == QUERY and "baseline" not in data
    expected = [h.to_json() for h in served.index.search(QUERY, k=4)]
    assert data["qpert"] == expected
    assert [h["rank"] for h in data["qpert"]] == [1, 2, 3, 4]
    for hit in data["qpert"]:
        assert hit["boxes"] and not Path(hit["path"]).is_absolute()
        for b in hit["boxes"]:
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 < x1 <= hit["width"] and 0 <= y0 < y1 <= hit["height"] and b["label"]


@pytest.mark.parametrize("itm", ["0", "1"])
def test_compare_returns_both_rankings(served, itm):
    status, data = search(served, q=QUERY, k=5, compare=1, itm=itm)
    assert status == 200 and data["itm"] == (itm == "1")
    assert data["baseline"] == [h.to_json() for h in served.index.search(QUERY, k=5, qpert=False, itm=itm == "1")]
    assert len(data["qpert"]) == 5 and all((h["itm"] is not None) == (itm == "1") for h in data["qpert"])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"q": ""}, "empty"),
        ({"q": "   "}, "empty"),
        ({}, "empty"),
        ({"q": "x" * 501}, "too long"),
        ({"q": QUERY, "k": "0"}, "k must be"),
        ({"q": QUERY, "k": "abc"}, "k must be"),
        ({"q": QUERY, "k": "101"}, "k must be"),
        ({"q": QUERY, "k": "-3"}, "k must be"),
        ({"q": QUERY, "itm": "yes"}, "itm must be 0 or 1"),
        ({"q": QUERY, "compare": "2"}, "compare must be 0 or 1"),
    ],
)
def test_bad_search_requests_are_400_json(served, params, message):
    status, data = search(served, **params)
    assert status == 400 and message in data["error"]


def test_concurrent_searches_are_serialized_and_agree(served):
    expected = search(served, q=QUERY, k=3, itm=1)[1]["qpert"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: search(served, q=QUERY, k=3, itm=1), range(8)))
    assert all(status == 200 and data["qpert"] == expected for status, data in answers)


def test_photos_are_served_by_id_with_their_type(served):
    types = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
    for row in served.index.rows.values():
        if row.id == served.link_id:
            continue
        status, headers, body = get(f"{served.url}photo/{row.id}")
        assert status == 200 and headers["Content-Type"] == types[Path(row.path).suffix]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert body == (served.index.photos_dir / row.path).read_bytes()


def test_thumbnails_are_small_upright_jpegs(served, tmp_path):
    from qpert.search import thumbnails

    for row in served.index.rows.values():
        if row.id == served.link_id:
            continue
        status, headers, body = get(f"{served.url}thumb/{row.id}")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(body))
        assert thumb.format == "JPEG" and (thumb.width, thumb.height) == (row.width, row.height)  # small already
    big = tmp_path / "big.png"
    Image.new("RGB", (1600, 900), (10, 20, 30)).save(big)
    with open(big, "rb") as f:
        small = Image.open(io.BytesIO(thumbnails.make_thumbnail(f)))
    assert (small.width, small.height) == (thumbnails.SIZE, 216)
    status, _, body = get(f"{served.url}thumb/{served.link_id}")
    assert status == 404 and json.loads(body) == {"error": "no such photo"}


@pytest.mark.parametrize(
    "path",
    [
        "/photo/../../etc/passwd",
        "/photo/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/photo/..%2F..%2Fetc%2Fpasswd",
        "/photo/999999",
        "/photo/abc",
        "/photo/-1",
        "/photo/1.5",
        "/photo/",
        "/photo/1/",
        "/photo/1%00",
        "/photo/album0/photo0.jpg",
        "//etc/passwd",
        "/../etc/passwd",
        "/static/../server.py",
        "/static/index.html",
        "/static/%2e%2e/server.py",
        "/index.html",
        "/api/searchx",
        "/thumb/../../etc/passwd",
        "/thumb/abc",
        "/thumb/999999",
        "/thumbs/1",
    ],
)
def test_anything_but_a_catalog_id_is_404(served, path):
    status, headers, body = raw_get(served.url, path)
    assert status == 404 and headers["X-Content-Type-Options"] == "nosniff"
    assert b"root:" not in body and b"import" not in body


def test_symlink_out_of_the_photo_folder_is_refused(served):
    with pytest.raises(KeyError):
        served.index.photo_path(served.link_id)
    status, _, body = get(f"{served.url}photo/{served.link_id}")
    assert status == 404 and json.loads(body) == {"error": "no such photo"}


def test_other_methods_are_refused(served):
    connection = http.client.HTTPConnection(urlsplit(served.url).hostname, urlsplit(served.url).port, timeout=60)
    connection.request("POST", "/api/search?q=x", body=b"{}")
    response = connection.getresponse()
    assert response.status == 501 and response.getheader("X-Content-Type-Options") == "nosniff"
    connection.close()


def test_a_taken_port_is_a_clear_error(served):
    with pytest.raises(OSError, match="choose another --port"):
        make_server(served.index, port=urlsplit(served.url).port)


def test_foreign_host_header_is_refused(served):
    """DNS rebinding: a page on another site must not read a localhost server's photos."""
    assert raw_get(served.url, "/api/info", host="evil.example:80")[0] == 403
    assert raw_get(served.url, "/api/info", host=f"localhost:{urlsplit(served.url).port}")[0] == 200


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1.evil.example",
        "127.0.0.1.evil.example:80",
        "127.evil.example",
        "127.0.0.1evil",
        "localhost.evil.example",
        "localhost.",
        "evil.localhost",
        "[::1].evil.example",
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "127.0.0.1:",
        "",
        "evil.example",
        "127.0.0.1 evil",
        "[::2]",
    ],
)
def test_host_names_that_only_look_like_loopback_are_refused(served, host):
    status, _, body = raw_get(served.url, "/api/info", host=host)
    assert status == 403 and json.loads(body) == {"error": "unknown Host header"}


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.0.0.1:{port}",
        "localhost",
        "LocalHost:{port}",
        "127.0.0.2:{port}",
        "[::1]",
        "[::1]:{port}",
        "[0:0::1]:{port}",
    ],
)
def test_exact_loopback_names_are_answered(served, host):
    assert raw_get(served.url, "/api/info", host=host.format(port=urlsplit(served.url).port))[0] == 200


def test_allowed_host_names_are_answered_and_no_others(served):
    server = make_server(served.index, allowed_hosts=["Photos.Local", "fe80::1"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for host, status in [
            ("photos.local", 200),
            ("photos.local:8765", 200),
            ("[fe80::1]:80", 200),
            ("localhost", 200),
            ("photos.local.evil.example", 403),
            ("evil.example", 403),
        ]:
            assert raw_get(server.url, "/api/info", host=host)[0] == status, host
    finally:
        server.shutdown()
        server.server_close()


def test_every_interface_needs_allowed_hosts_and_still_checks_them(served):
    """--host 0.0.0.0 does not switch the Host check off: it needs the names to answer, and refuses others."""
    with pytest.raises(ValueError, match="--allow-host"):
        make_server(served.index, host="0.0.0.0")
    server = make_server(served.index, host="0.0.0.0", allowed_hosts=["photos.local"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert raw_get(url, "/api/info", host="evil.example")[0] == 403
        assert raw_get(url, "/api/info", host="photos.local")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_serving_on_every_interface_warns_of_the_exposure(index_dir):
    command = [
        sys.executable,
        "-m",
        "qpert",
        "serve",
        str(index_dir),
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--allow-host",
        "photos.local",
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        warning = next(line for line in process.stderr if line.startswith("warning: "))
        url = re.search(r"http://0\.0\.0\.0:(\d+)/", process.stdout.readline())
        assert "reachable from other machines" in warning and "photos.local" in warning and url, warning
        assert raw_get(f"http://127.0.0.1:{url.group(1)}/", "/api/info", host="evil.example")[0] == 403
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api/info",
        f"/api/search?q={QUERY.replace(' ', '+')}",
        "/api/search",
        "/photo/{id}",
        "/thumb/{id}",
        "/photo/999999",
        "/nothing",
    ],
)
def test_answers_may_not_be_embedded_by_other_sites(served, path):
    photo_id = next(r.id for r in served.index.rows.values() if r.id != served.link_id)
    _, headers, _ = raw_get(served.url, path.format(id=photo_id), host="localhost")
    assert headers["Cross-Origin-Resource-Policy"] == "same-origin"
    assert headers["X-Content-Type-Options"] == "nosniff" and "default-src 'self'" in headers["Content-Security-Policy"]


@pytest.fixture
def fresh(index_dir, tmp_path):
    """A small index of its own (the test changes its photos or files), with the served index's tiny BLIP-2."""
    photos = photo_folder(tmp_path / "photos", count=3)
    settings = IndexSettings(model=str(index_dir.parent / "model"), detector="none", qpert=QPertConfig(alpha=4))
    build_index(photos, tmp_path / "index", settings, device="cpu", progress=False)
    return SimpleNamespace(photos=photos, index_dir=tmp_path / "index", settings=settings)


@contextmanager
def serving(index_dir: Path, **options):
    index = PhotoIndex(index_dir, device="cpu")
    server = make_server(index, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        index.close()


def test_a_photo_swapped_for_a_link_never_serves_the_outside_file(fresh, tmp_path):
    """The photo is opened once and checked on its descriptor: swapping in a link between a path check
    and the read (a race the attacker can run in a loop) must not leak the file it points to."""
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(b"SECRET " * 1000)
    photo = fresh.photos / "album0" / "photo0.jpg"
    original = photo.read_bytes()
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            link = photo.with_name(".link")
            link.symlink_to(secret)
            os.replace(link, photo)
            copy = photo.with_name(".copy")
            copy.write_bytes(original)
            os.replace(copy, photo)

    with serving(fresh.index_dir) as server:
        photo_id = next(r.id for r in server.index.rows.values() if r.path == "album0/photo0.jpg")
        swapper = threading.Thread(target=swap, daemon=True)
        swapper.start()
        url = urlsplit(server.url)
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        answers = []
        try:
            for _ in range(400):  # before the fix, 5% of such requests leaked the file
                connection.request("GET", f"/photo/{photo_id}")
                response = connection.getresponse()
                answers.append((response.status, response.read()))
        finally:
            stop.set()
            swapper.join()
            connection.close()
    assert not [body for _, body in answers if b"SECRET" in body], "the file outside the folder was served"
    assert {status for status, _ in answers} <= {200, 404}
    assert any(status == 200 and body == original for status, body in answers)


def test_idle_and_half_sent_connections_are_closed_and_do_not_take_threads(fresh):
    with serving(fresh.index_dir, header_timeout=1.0, keep_alive_timeout=0.5) as server:
        threads = threading.active_count()
        host, port = server.server_address[:2]
        idle = [socket.create_connection((host, port), timeout=20) for _ in range(30)]
        for s in idle[::2]:  # half of them start a request and never finish it
            s.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        time.sleep(0.5)
        assert threading.active_count() <= threads, "a thread per connection"
        started = time.monotonic()
        for s in idle:
            assert s.recv(1024) == b"", "the server keeps an idle connection open"
            s.close()
        assert time.monotonic() - started < 15
        status, _, body = raw_get(server.url, "/api/info", host="localhost")
        assert status == 200 and json.loads(body)["photos"] == 3


def closed_within(sock: socket.socket, limit: float, dribble: bytes = b"") -> float:
    """Seconds until the server closes ``sock`` (reading what it sends meanwhile, and sending ``dribble``
    every 0.2 s, as a slowloris does); fails when it is still open after ``limit``."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < limit:
        try:
            if dribble:
                sock.sendall(dribble)
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    raise AssertionError(f"the server kept the connection open for {limit} s")


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)


def test_idle_connections_held_open_do_not_delay_a_search(fresh):
    """The slowloris of #23: 100 silent or half-sent connections, held (long timeouts), and a search
    still answers at once."""
    with serving(fresh.index_dir, keep_alive_timeout=60, header_timeout=60) as server:
        address = server.server_address[:2]
        idle = [socket.create_connection(address, timeout=20) for _ in range(100)]
        try:
            for s in idle[::2]:
                s.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            search(SimpleNamespace(url=server.url), q=QUERY, k=3)  # the model's first run, not the point
            started = time.monotonic()
            status, data = search(SimpleNamespace(url=server.url), q=QUERY, k=3, itm=1)
            took = time.monotonic() - started
            assert all(still_open(s) for s in idle), "the test meant them to be held"
        finally:
            for s in idle:
                s.close()
    assert status == 200 and len(data["qpert"]) == 3
    assert took < 2.0, f"a search took {took:.2f} s beside 100 idle connections"


def test_idle_slow_and_finished_connections_are_closed_on_their_deadlines(fresh):
    with serving(fresh.index_dir, keep_alive_timeout=0.5, header_timeout=1.5) as server:
        address = server.server_address[:2]
        silent = socket.create_connection(address, timeout=20)
        assert closed_within(silent, 5) < 1.4  # the keep-alive timeout, before any request
        answered = socket.create_connection(address, timeout=20)
        answered.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert answered.recv(12) == b"HTTP/1.1 200"
        assert closed_within(answered, 5) < 1.4  # silent after its answer
        trickling = socket.create_connection(address, timeout=20)
        trickling.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        assert 1.2 < closed_within(trickling, 8, dribble=b"a") < 4  # sending all along: the head's deadline
        for s in (silent, answered, trickling):
            s.close()
        assert raw_get(server.url, "/api/info", host="localhost")[0] == 200


def test_connections_beyond_the_limit_are_answered_503(fresh):
    """The connections that arrive while the limit is reached are refused, not the ones before them."""
    with serving(fresh.index_dir, max_connections=4, keep_alive_timeout=30, header_timeout=30) as server:
        held = [socket.create_connection(server.server_address[:2], timeout=20) for _ in range(6)]
        time.sleep(0.3)  # all accepted, in this order
        answers = []
        for s in held:
            s.sendall(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answers.append(s.makefile("rb").read())
            s.close()
        assert [a[:12] for a in answers] == [b"HTTP/1.1 200"] * 4 + [b"HTTP/1.1 503"] * 2
        assert all(b"x-content-type-options: nosniff" in a.lower() for a in answers)
        assert raw_get(server.url, "/api/info", host="localhost")[0] == 200


def test_a_slow_search_does_not_stall_the_page(fresh, monkeypatch):
    with serving(fresh.index_dir) as server:
        real_search = server.index.search

        def slow_search(*args, **kwargs):
            time.sleep(3)
            return real_search(*args, **kwargs)

        monkeypatch.setattr(server.index, "search", slow_search)
        with ThreadPoolExecutor(1) as pool:
            searching = pool.submit(search, SimpleNamespace(url=server.url), q=QUERY, k=3, itm=1)
            time.sleep(0.3)
            photo_id = next(iter(server.index.rows))
            for path in ("", "static/app.js", f"thumb/{photo_id}", f"photo/{photo_id}"):
                started = time.monotonic()
                assert get(server.url + path)[0] == 200
                assert time.monotonic() - started < 1.0, f"/{path} waited for the search"
            assert not searching.done()
            assert searching.result()[0] == 200


def test_a_client_that_stops_reading_a_photo_is_dropped(fresh):
    """The answer is sent as the client reads it; one that stops reading is cut off after the send
    timeout instead of holding the connection (and the photo's memory) for ever."""
    noise = np.random.default_rng(0).integers(0, 256, size=(2500, 2500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(fresh.photos / "noise.png", compress_level=1)  # 19 MB, more than socket buffers
    size = (fresh.photos / "noise.png").stat().st_size
    build_index(fresh.photos, fresh.index_dir, fresh.settings, device="cpu", progress=False)
    with serving(fresh.index_dir, send_timeout=1.0) as server:
        photo_id = next(r.id for r in server.index.rows.values() if r.path == "noise.png")
        reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(server.server_address[:2])
        reader.sendall(f"GET /photo/{photo_id} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        time.sleep(3)  # not reading
        received = 0
        reader.settimeout(5)
        try:
            while chunk := reader.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        reader.close()
        assert received < size / 2, f"{received} of {size} bytes arrived"
        assert get(f"{server.url}photo/{photo_id}")[2] == (fresh.photos / "noise.png").read_bytes()


def test_a_malformed_request_is_400_with_the_security_headers(served):
    url = urlsplit(served.url)
    with socket.create_connection((url.hostname, url.port), timeout=20) as s:
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        head = s.recv(65536).lower()
    assert head.startswith(b"http/1.1 400") and b"x-content-type-options: nosniff" in head


def test_out_of_file_descriptors_does_not_spin_the_accept_loop(fresh, monkeypatch):
    calls = []

    def accept(self):
        calls.append(time.monotonic())
        raise OSError(errno.EMFILE, "Too many open files")

    with serving(fresh.index_dir) as server:
        monkeypatch.setattr(socket.socket, "accept", accept)
        waiting = socket.create_connection(server.server_address[:2])  # the listening socket stays readable
        time.sleep(1.0)
        monkeypatch.undo()
        waiting.close()
    assert 1 <= len(calls) <= 30, f"{len(calls)} accept() calls in a second"


def big_jpeg(path: Path, seed: int, size: tuple[int, int] = (4000, 3000)) -> Path:
    """A 12-Mpx camera-size JPEG (a gradient with a square: cheap to make, still a real photo)."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    x, y = 100 * seed, 50 * seed
    image.paste((200, 30, 30), (x, y, x + size[0] // 4, y + size[1] // 4))
    image.save(path, quality=90)
    return path


@pytest.fixture
def decodes(monkeypatch):
    """Every image decode (Pillow's load) in this process: the pixels decoded and how many ran at once."""
    from PIL import ImageFile

    real_load = ImageFile.ImageFile.load
    record = SimpleNamespace(sizes=[], running=0, most=0, lock=threading.Lock())

    def load(image):
        if image.tile:  # a decode still to do, not a no-op on a loaded image
            with record.lock:
                record.sizes.append(image.size)
                record.running += 1
                record.most = max(record.most, record.running)
            try:
                time.sleep(0.2)
                return real_load(image)
            finally:
                with record.lock:
                    record.running -= 1
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return record


def test_thumbnails_of_camera_photos_are_decoded_small_few_at_a_time_and_cached(fresh, decodes):
    for i in range(4):
        big_jpeg(fresh.photos / f"camera{i}.jpg", seed=i)
    build_index(fresh.photos, fresh.index_dir, fresh.settings, device="cpu", progress=False)
    with serving(fresh.index_dir) as server:
        rows = [r for r in server.index.rows.values() if r.path.startswith("camera")]
        decodes.sizes.clear()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda r: get(f"{server.url}thumb/{r.id}"), rows))
    assert all(status == 200 for status, _, _ in answers)
    for _, _, body in answers:
        assert max(Image.open(io.BytesIO(body)).size) == 384
    assert len(decodes.sizes) == 4 and max(w * h for w, h in decodes.sizes) <= 4000 * 3000 // 16, decodes.sizes
    assert decodes.most <= 2, f"{decodes.most} photos decoded at once"
    cached = sorted((fresh.index_dir / "thumbnails").iterdir())
    assert [p.name for p in cached] == sorted(f"{r.sha256}-384.jpg" for r in rows)
    assert sorted(p.read_bytes() for p in cached) == sorted(body for _, _, body in answers)

    decodes.sizes.clear()  # a new server (another run) finds them on disk
    with serving(fresh.index_dir) as server:
        assert [get(f"{server.url}thumb/{r.id}")[0] for r in rows] == [200] * 4
    assert decodes.sizes == []


def test_an_edited_photo_gets_a_new_thumbnail(fresh):
    with serving(fresh.index_dir) as server:
        row = next(r for r in server.index.rows.values() if r.path == "album0/photo0.jpg")
        before = get(f"{server.url}thumb/{row.id}")[2]
        write_photo(fresh.photos / "album0" / "photo0.jpg", seed=1234)  # not re-indexed yet
        after = get(f"{server.url}thumb/{row.id}")[2]
    assert after != before
    assert Image.open(io.BytesIO(after)).size == Image.open(fresh.photos / "album0" / "photo0.jpg").size


def test_a_running_server_follows_a_new_index(fresh):
    """`qpert index` run again while `qpert serve` runs: the server answers from the new index (ITM included)."""
    with serving(fresh.index_dir) as server:
        assert search(SimpleNamespace(url=server.url), q=QUERY, k=10, itm=1)[0] == 200
        (fresh.photos / "album1" / "photo1.png").unlink()
        write_photo(fresh.photos / "new" / "added.jpg", seed=77)
        write_photo(fresh.photos / "album0" / "photo0.jpg", seed=78)  # changed: its old tokens are collected
        build_index(
            fresh.photos,
            fresh.index_dir,
            dataclasses.replace(fresh.settings, qpert=QPertConfig(alpha=2)),
            device="cpu",
            progress=False,
        )
        status, data = search(SimpleNamespace(url=server.url), q=QUERY, k=10, itm=1)
        info = json.loads(get(server.url + "api/info")[2])
    assert status == 200, data
    assert sorted(h["path"] for h in data["qpert"]) == ["album0/photo0.jpg", "album0/photo2.webp", "new/added.jpg"]
    assert info["photos"] == 3 and info["qpert"]["alpha"] == 2
    reference = PhotoIndex(fresh.index_dir, device="cpu")
    try:
        assert data["qpert"] == [h.to_json() for h in reference.search(QUERY, k=10, itm=True)]
    finally:
        reference.close()


def test_page_and_its_files_are_served(served):
    status, headers, body = get(served.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="query"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name, ctype in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        status, headers, _ = get(f"{served.url}static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(ctype)


def test_serve_stops_cleanly_on_ctrl_c(index_dir):
    command = [sys.executable, "-m", "qpert", "serve", str(index_dir), "--port", "0", "--device", "cpu"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line
        assert json.loads(get(url.group(0) + "api/info")[2])["photos"] == PHOTOS
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "stopped" in out and "Traceback" not in err, (process.returncode, out, err)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"the page test needs {CHROMIUM} and {CHROMEDRIVER}: install Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with Service's path: Selenium Manager never downloads anything
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.mark.browser
def test_page_end_to_end(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(served.url)
    wait.until(lambda d: f"{PHOTOS} photos" in d.find_element(By.ID, "info").text)
    assert browser.find_element(By.ID, "itm-option").is_displayed()

    browser.find_element(By.ID, "search").click()  # empty query: a message, no request
    assert "Type what to look for" in browser.find_element(By.ID, "status").text

    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("4")
    browser.find_element(By.ID, "query").send_keys(QUERY + Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-qpert .result")) == 4)
    expected = served.index.search(QUERY, k=4)
    results = browser.find_elements(By.CSS_SELECTOR, "#results-qpert .result")
    assert [int(r.get_attribute("data-id")) for r in results] == [h.id for h in expected]
    assert not browser.find_element(By.ID, "results-baseline").is_displayed()
    assert "q=a+red+square" in browser.current_url
    for result, hit in zip(results, expected):
        boxes = result.find_elements(By.CSS_SELECTOR, ".frame .box")
        assert len(boxes) == len(hit.boxes) and boxes[0].find_element(By.CLASS_NAME, "box-label").text.startswith(
            hit.boxes[0]["label"]
        )
        assert_box_placed(result.find_element(By.CLASS_NAME, "frame"), boxes[0], hit)
    loaded = next(h for h in expected if h.id != served.link_id)
    wait.until(lambda d: image_width(d, f"#results-qpert .result[data-id='{loaded.id}'] img") == loaded.width)

    browser.find_element(By.ID, "compare").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-baseline .result")) == 4)
    assert browser.find_element(By.ID, "results-baseline").is_displayed()
    assert_changed_marks_agree(browser)

    browser.find_element(By.CSS_SELECTOR, f"#results-qpert .result[data-id='{loaded.id}']").click()
    lightbox = browser.find_element(By.ID, "lightbox")
    wait.until(lambda d: lightbox.is_displayed())
    wait.until(lambda d: image_width(d, "#lightbox img") == loaded.width)
    frame = lightbox.find_element(By.CLASS_NAME, "frame")
    assert frame.size["width"] > 300 and len(frame.find_elements(By.CLASS_NAME, "box")) == len(loaded.boxes)
    assert loaded.path in browser.find_element(By.ID, "lightbox-caption").text
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait.until(lambda d: not lightbox.is_displayed())

    assert_no_script_errors(browser)


@pytest.mark.browser
def test_page_from_a_link_with_itm(served, browser):
    """A shared URL runs its search; a photo that is not served says so; ITM re-ranks; EXIF turns are honoured."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(served.url + "?" + urlencode({"q": QUERY, "k": PHOTOS}))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-qpert .result")) == PHOTOS)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f".result[data-id='{served.link_id}'] .frame.missing"))

    browser.find_element(By.ID, "itm").click()  # re-runs the search, re-ranked
    wait.until(lambda d: "re-ranked by ITM" in d.find_element(By.ID, "status").text)
    shown = [int(r.get_attribute("data-id")) for r in browser.find_elements(By.CSS_SELECTOR, "#results-qpert .result")]
    assert shown == [h.id for h in served.index.search(QUERY, k=PHOTOS, itm=True)]
    assert "itm=1" in browser.current_url

    # boxes are in upright pixels: the browser must show an EXIF-turned photo upright too, or they miss
    rotated = served.rotated
    assert natural_size(browser, f"/photo/{rotated.id}") == [rotated.width, rotated.height] == [48, 64]
    assert_no_script_errors(browser)


def assert_no_script_errors(driver) -> None:
    """No script error and no Content-Security-Policy violation in the browser's console."""
    assert not [e["message"] for e in driver.get_log("browser") if e["source"] in ("javascript", "security")]


def image_width(driver, selector: str) -> int:
    """The loaded image's natural width (0 until it has loaded)."""
    return driver.execute_script(
        "const i = document.querySelector(arguments[0]); return i && i.complete ? i.naturalWidth : 0;", selector
    )


def natural_size(driver, url: str) -> list[int] | None:
    return driver.execute_async_script(
        "const done = arguments[1], image = new Image(); "
        "image.onload = () => done([image.naturalWidth, image.naturalHeight]); "
        "image.onerror = () => done(null); image.src = arguments[0];",
        url,
    )


def assert_box_placed(frame, box, hit) -> None:
    """The overlay sits where the box is in photo pixels, scaled to the displayed frame."""
    scale = frame.size["width"] / hit.width
    x0, y0, x1, _ = hit.boxes[0]["box"]
    assert abs(box.location["x"] - frame.location["x"] - x0 * scale) <= 1.5
    assert abs(box.location["y"] - frame.location["y"] - y0 * scale) <= 1.5
    assert abs(box.size["width"] - (x1 - x0) * scale) <= 1.5


def assert_changed_marks_agree(driver) -> None:
    """A photo is highlighted exactly when its rank differs between the columns (or it is in one only)."""
    from selenium.webdriver.common.by import By

    columns = [
        {
            int(r.get_attribute("data-id")): (
                int(r.get_attribute("data-rank")),
                "changed" in r.get_attribute("class").split(),
            )
            for r in driver.find_elements(By.CSS_SELECTOR, f"#results-{name} .result")
        }
        for name in ("qpert", "baseline")
    ]
    for this, other in (columns, columns[::-1]):
        for photo_id, (rank, changed) in this.items():
            assert changed == (other.get(photo_id, (None,))[0] != rank)
