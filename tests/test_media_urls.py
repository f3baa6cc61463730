"""Server media URL policy: data URLs, allowed local paths, and http(s) fetching with limits (loopback)."""

from __future__ import annotations

import base64
import functools
import http.server
import threading

import pytest
from conftest import MEDIA

from nvila.base.errors import MediaError
from nvila.serve.media_urls import MediaPolicy, fetch_media


@pytest.fixture(scope="module")
def http_root():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(MEDIA))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_fetch_allowed(http_root: str) -> None:
    data = fetch_media(f"{http_root}/hopper_64x64.png", MediaPolicy(allow_remote=True))
    assert data == (MEDIA / "hopper_64x64.png").read_bytes()


def test_remote_fetch_refused_by_default(http_root: str) -> None:
    with pytest.raises(MediaError, match="--allow-remote-media"):
        fetch_media(f"{http_root}/hopper_64x64.png", MediaPolicy())


def test_remote_fetch_size_limit_and_status(http_root: str) -> None:
    with pytest.raises(MediaError, match="exceeds"):
        fetch_media(f"{http_root}/china_800x600.png", MediaPolicy(allow_remote=True, max_remote_bytes=1000))
    with pytest.raises(MediaError, match="HTTP 404"):
        fetch_media(f"{http_root}/missing.png", MediaPolicy(allow_remote=True))


def test_remote_fetch_unreachable() -> None:
    import socket

    with socket.socket() as s:        # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MediaError, match="could not fetch"):
        fetch_media(f"http://127.0.0.1:{port}/x.png", MediaPolicy(allow_remote=True, remote_timeout_s=2))


def test_data_and_local_urls(tmp_path) -> None:
    raw = (MEDIA / "hopper_64x64.png").read_bytes()
    assert fetch_media("data:image/png;base64," + base64.b64encode(raw).decode(), MediaPolicy()) == raw
    policy = MediaPolicy(allowed_dir=MEDIA)
    assert fetch_media("hopper_64x64.png", policy) == str((MEDIA / "hopper_64x64.png").resolve())
    assert fetch_media(f"file://{MEDIA / 'hopper_64x64.png'}", policy).endswith("hopper_64x64.png")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "escape.png").symlink_to(MEDIA / "hopper_64x64.png")   # a link inside pointing outside
    with pytest.raises(MediaError, match="outside the allowed"):
        fetch_media("escape.png", MediaPolicy(allowed_dir=allowed))
    with pytest.raises(MediaError, match="outside the allowed"):
        fetch_media("../../../../etc/passwd", policy)
    with pytest.raises(MediaError, match="disabled"):
        fetch_media("hopper_64x64.png", MediaPolicy())
    with pytest.raises(MediaError, match="scheme"):
        fetch_media("ftp://example.com/x.png", policy)
