"""Malformed requests against `nvila serve`: each gets a 4xx with OpenAI's error JSON and a specific message.

Never a 5xx, never a dropped connection, and the server keeps serving afterwards. Raw JSON goes through
httpx so that the client cannot "fix" anything. The server is nvila-video (TSP video pooling, so frame
counts must be multiples of 8), with --allowed-media-dir pointing at the fixture media folder.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from conftest import CHECKPOINTS, MEDIA, png_claiming
from test_server import ServerProcess, assert_openai_error

MODEL = "nvila-video"
URL_PATH = "/v1/chat/completions"
AVI = MEDIA / "clip_24f_12fps_176x144.avi"
PNG = MEDIA / "hopper_64x64.png"


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(MODEL, "--allowed-media-dir", str(MEDIA))
    yield s
    s.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chat(content, **extra) -> dict:
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}], **extra}


def image(url: str, text: str = "What is this?") -> dict:
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}])


def video(url: str, **part_extra) -> dict:
    return chat([{"type": "video_url", "video_url": {"url": url}, **part_extra},
                 {"type": "text", "text": "Describe."}])


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


BASE = chat("hello")
OUTSIDE = CHECKPOINTS / "nvila" / "config.json"  # a real file, but outside --allowed-media-dir
TRAVERSAL = str(MEDIA / ".." / ".." / "conftest.py")  # tests/conftest.py reached from inside MEDIA
_AVI = AVI.read_bytes()
AVI_HEADERS_ONLY = _AVI[: _AVI.index(b"00dc", _AVI.index(b"movi")) + 18]  # the container, no decodable frame
LONG_TEXT = " ".join(f"word{i % 97}" for i in range(40_000))


def _deep(n: int) -> str:
    return '{"model": "%s", "messages": %s}' % (MODEL, "[" * n + "]" * n)


# id -> (request, acceptable statuses, phrases: at least one must occur in error.message, case-insensitive)
# request: a dict (sent as JSON), (raw bytes, content-type), or a function building one of those (big bodies)
CASES: dict[str, tuple[object, set[int], tuple[str, ...]]] = {
    # --- media: data URLs and bytes ---
    "bad_base64": (image("data:image/png;base64,@@@not*base64!!!"), {400}, ("base64",)),
    "data_url_not_base64": (image("data:image/png,rawbytes"), {400}, ("base64",)),
    "empty_data_url": (image("data:image/png;base64,"), {400}, ("empty",)),
    "non_image_bytes": (image("data:image/png;base64," + b64(b"this is plain text, not a picture " * 20)), {400},
                        ("image",)),
    "truncated_png": (image("data:image/png;base64," + b64(PNG.read_bytes()[:300])), {400},
                      ("truncated", "corrupt", "image")),
    "huge_dimensions_png": (image("data:image/png;base64," + b64(png_claiming(100000, 100000))), {400},
                            ("decompression bomb", "too large", "pixels")),
    "zero_dimensions_png": (image("data:image/png;base64," + b64(png_claiming(0, 0))), {400},
                            ("zero", "width", "height", "image")),
    "truncated_video": (video("data:video/x-msvideo;base64," + b64(AVI.read_bytes()[: AVI.stat().st_size // 5])),
                        {400}, ("video", "frames", "truncated", "corrupt")),
    "non_video_bytes": (video("data:video/mp4;base64," + b64(b"\x00\x01 definitely not a video " * 50)), {400},
                        ("video",)),
    "video_headers_only": (video("data:video/x-msvideo;base64," + b64(AVI_HEADERS_ONLY)), {400},
                           ("no decodable video frames", "truncated", "corrupt")),
    # --- media: local paths and URLs ---
    "path_traversal_relative": (image("../../etc/passwd"), {400}, ("allowed", "outside")),
    "path_traversal_via_media_dir": (image(TRAVERSAL), {400}, ("allowed", "outside")),
    "path_outside_allowed_dir": (image(str(OUTSIDE)), {400}, ("allowed", "outside")),
    "file_url_etc_passwd": (image("file:///etc/passwd"), {400}, ("allowed", "outside")),
    "file_url_outside": (image(OUTSIDE.as_uri()), {400}, ("allowed", "outside")),
    "missing_file_in_allowed_dir": (image(str(MEDIA / "no_such_image.png")), {400},
                                    ("does not exist", "not found", "no such")),
    "http_url_disallowed": (image("http://127.0.0.1:9/cat.png"), {400}, ("remote",)),
    "https_url_disallowed": (video("https://127.0.0.1:9/clip.mp4"), {400}, ("remote",)),
    "unsupported_scheme": (image("ftp://127.0.0.1/cat.png"), {400}, ("scheme", "unsupported")),
    "image_url_missing_url": (chat([{"type": "image_url", "image_url": {}}, {"type": "text", "text": "x"}]),
                              {400, 422}, ("url",)),
    "image_url_number": (chat([{"type": "image_url", "image_url": {"url": 42}}]), {400, 422}, ("url",)),
    # --- video options ---
    "num_frames_12_tsp": (video(str(AVI), num_frames=12), {400}, ("multiple of 8", "divisible by 8")),
    "num_frames_zero": (video(str(AVI), num_frames=0), {400, 422}, ("num_frames",)),
    "num_frames_string": (video(str(AVI), num_frames="eight"), {400, 422}, ("num_frames",)),
    # --- schema: wrong types and ranges ---
    "content_number": (chat(12345), {400, 422}, ("content",)),
    "messages_not_list": (without(BASE, "messages") | {"messages": "hello"}, {400, 422}, ("messages",)),
    "messages_object": (without(BASE, "messages") | {"messages": {"role": "user", "content": "hi"}}, {400, 422},
                        ("messages",)),
    "message_not_object": (without(BASE, "messages") | {"messages": ["hi"]}, {400, 422}, ("messages",)),
    "max_tokens_string": (BASE | {"max_tokens": "ten"}, {422}, ("max_tokens",)),
    "max_tokens_zero": (BASE | {"max_tokens": 0}, {400, 422}, ("max_tokens",)),
    "temperature_negative": (BASE | {"temperature": -1}, {400, 422}, ("temperature",)),
    "top_p_two": (BASE | {"top_p": 2}, {400, 422}, ("top_p",)),
    "stream_string": (BASE | {"stream": "yes"}, {422}, ("stream",)),
    "stop_number": (BASE | {"stop": 7}, {400, 422}, ("stop",)),
    "seed_string": (BASE | {"seed": "abc"}, {422}, ("seed",)),
    "missing_messages": (without(BASE, "messages"), {400, 422}, ("messages",)),
    "missing_model": (without(BASE, "model"), {400, 422}, ("model",)),
    "empty_messages": (BASE | {"messages": []}, {400, 422}, ("messages",)),
    "unknown_role": (BASE | {"messages": [{"role": "wizard", "content": "hi"}]}, {400, 422}, ("role",)),
    "missing_role": (BASE | {"messages": [{"content": "hi"}]}, {400, 422}, ("role",)),
    "unknown_part_type": (chat([{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}}]),
                          {400, 422}, ("audio_url", "type")),
    "text_part_without_text": (chat([{"type": "text"}]), {400, 422}, ("text",)),
    "part_not_object": (chat(["just a string"]), {400, 422}, ("part", "content")),
    "unknown_model": (BASE | {"model": "gpt-4o"}, {404}, ("not found", "model")),
    # --- size ---
    "prompt_past_context": (chat(LONG_TEXT), {400}, ("context",)),
    "body_60mb": (lambda: (json.dumps(chat("x" * (60 * 2**20))).encode(), "application/json"), {413},
                  ("too large", "exceeds", "limit")),
    # --- not JSON ---
    "invalid_json": ((b'{"model": "nvila-video", "messages": [', "application/json"), {400, 422}, ("json",)),
    "empty_body": ((b"", "application/json"), {400, 422}, ("json", "body")),
    "json_array_body": ((b"[1, 2, 3]", "application/json"), {400, 422}, ("object", "body", "dict")),
    "wrong_content_type": ((json.dumps(BASE).encode(), "text/plain"), {400, 415, 422},
                           ("content-type", "json")),
    "deeply_nested_json": ((_deep(100_000).encode(), "application/json"), {400, 422},
                           ("json", "nest", "deep", "messages")),
}


# Cases the server currently gets wrong (strict: an unexpected pass fails, so fixes are noticed).
XFAIL: dict[str, str] = {}


def send(url: str, request: object) -> httpx.Response:
    if callable(request):
        request = request()
    with httpx.Client(timeout=120) as http:
        if isinstance(request, dict):
            return http.post(url + URL_PATH, json=request)
        raw, ctype = request
        return http.post(url + URL_PATH, content=raw, headers={"content-type": ctype})


def test_at_least_30_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(reason=XFAIL[c], strict=True)) if c in XFAIL else c for c in CASES])
def test_malformed_request(server, case: str) -> None:
    request, statuses, phrases = CASES[case]
    try:
        r = send(server.url, request)
    except httpx.HTTPError as e:
        pytest.fail(f"{case}: the connection failed instead of a 4xx answer: {type(e).__name__}: {e}\n"
                    f"{server.stderr()}")
    assert r.status_code < 500, f"{case}: HTTP {r.status_code}: {r.text[:500]}\n{server.stderr()}"
    assert r.status_code in statuses, f"{case}: HTTP {r.status_code} (want {sorted(statuses)}): {r.text[:500]}"
    err = assert_openai_error(r, r.status_code)
    message = err["message"].lower()
    assert any(p in message for p in phrases), f"{case}: message {err['message']!r} names none of {phrases}"
    assert server.alive(), server.stderr()



@pytest.mark.parametrize("method,path,status", [
    pytest.param("GET", "/v1/nonexistent", 404),
    pytest.param("GET", URL_PATH, 405)])
def test_routing_errors_are_openai_shaped(server, method: str, path: str, status: int) -> None:
    r = httpx.request(method, server.url + path, timeout=30)
    assert_openai_error(r, status)


def test_server_still_serves_after_fuzz(server) -> None:
    """Runs after the fuzz cases (file order): healthy, and a normal image + video request still works."""
    assert server.alive(), server.stderr()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    r = httpx.post(server.url + URL_PATH, timeout=120, json=video(str(AVI)) | {"max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] >= 1
    r = httpx.post(server.url + URL_PATH, timeout=120,
                   json=image("data:image/png;base64," + b64(PNG.read_bytes())) | {"max_tokens": 3})
    assert r.status_code == 200, r.text
