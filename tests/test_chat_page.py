"""The chat page of `nvila serve` (`/`), end to end: a real `nvila serve` subprocess on a fixture checkpoint and
Debian's Chromium driven by Playwright (tests/browser.py; scripts/ensure_browser.sh installs both).

One nvila-lite server for the chat itself (the image turn must give the reference answer, token by token) and
one with --api-key for the key prompt; `--no-ui` is checked on the app the CLI builds. The browser tests skip,
saying why, only where no browser is installed.
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from browser import attach, chromium, missing_browser, open_chat, send, settings, wait_finished
from conftest import CHECKPOINTS, fixture_cases, fixture_pipeline
from test_server import AVI, CHINA, HOPPER, ServerProcess, reference

NO_BROWSER = missing_browser()
needs_browser = pytest.mark.skipif(NO_BROWSER is not None, reason=f"no browser for the chat page tests: {NO_BROWSER}")


@pytest.fixture(scope="module")
def lite():
    server = ServerProcess("nvila-lite")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secured():
    server = ServerProcess("nvila-lite", "--api-key", "secret")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def chat_requests(page) -> list[dict]:
    """The bodies of the page's POSTs to v1/chat/completions, recorded from now on (a live list)."""
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
            else None)
    return bodies


def engine(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()["engine"]


# ---- the page is served, publicly, and only without --no-ui -------------------------------------------------
def test_page_and_assets_are_public_when_the_api_needs_a_key(secured) -> None:
    page = httpx.get(f"{secured.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/chat.js"' in page.text and 'href="static/chat.css"' in page.text
    for asset in ("chat.js", "chat.css"):
        assert httpx.get(f"{secured.url}/static/{asset}", timeout=10).status_code == 200, asset
    assert httpx.get(f"{secured.url}/v1/models", timeout=10).status_code == 401


def served_app(monkeypatch, *flags: str):
    """The ASGI app that `nvila serve --model nvila-lite FLAGS` hands to uvicorn (captured: no socket; the session's
    cached fixture pipeline instead of a second copy)."""
    import uvicorn

    from nvila.cli import serve
    from nvila.cli.main import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: apps.append(app))
    monkeypatch.setattr(serve, "load_model", lambda _: fixture_pipeline("nvila-lite"))
    assert main(["serve", "--model", str(CHECKPOINTS / "nvila-lite"), *flags]) == 0
    return apps[-1]


@pytest.mark.parametrize("flags, page", [((), 200), (("--no-ui",), 404)])
def test_no_ui_serves_no_page(monkeypatch, flags: tuple[str, ...], page: int) -> None:
    from starlette.testclient import TestClient

    with TestClient(served_app(monkeypatch, *flags)) as client:
        for path in ("/", "/static/chat.js"):
            assert client.get(path).status_code == page, (flags, path)
        assert client.get("/v1/models").status_code == 200


# ---- chatting in the browser --------------------------------------------------------------------------------
@needs_browser
def test_image_turn_streams_the_reference_answer(browser, lite) -> None:
    """The fixture image through the file picker, greedy 16 tokens: the answer arrives in several deltas and
    ends as the reference's text; the request is the server's own streaming API with a data: URL."""
    spec = fixture_cases()["nvila-lite/img_china_800x600"]
    log: list[str] = []
    page = open_chat(browser, lite.url, log)
    bodies = chat_requests(page)
    assert page.inner_text("#model") == "model: nvila-lite" and page.is_hidden("#auth")
    settings(page, temperature=0, max_tokens=16)
    attach(page, CHINA)
    answer = send(page, spec["prompt"])
    assert wait_finished(answer) == "done"
    assert answer.locator(".text").text_content() == reference("nvila-lite/img_china_800x600")["generation"]["response"]
    assert int(answer.get_attribute("data-deltas")) > 1, "the answer did not stream"
    user = page.locator("article.msg.user").last
    assert user.locator(".media img").count() == 1 and user.locator(".text").text_content() == spec["prompt"]
    assert page.locator("#attachments .attachment").count() == 0 and page.is_enabled("#send")
    (body,) = bodies
    assert body["stream"] is True and body["model"] == "nvila-lite" and body["temperature"] == 0
    assert body["max_tokens"] == 16 and "response_format" not in body
    image, text = body["messages"][0]["content"]
    prefix = "data:image/png;base64,"
    assert image["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(image["image_url"]["url"][len(prefix):]) == CHINA.read_bytes()
    assert text == {"type": "text", "text": spec["prompt"]}
    # nothing but the server's own page, files and API (offline), and no script errors
    assert f"{lite.url}/static/chat.js" in log and f"{lite.url}/v1/models" in log
    assert all(entry.startswith(lite.url) for entry in log), [e for e in log if not e.startswith(lite.url)]


@needs_browser
def test_multi_turn_drop_video_keyboard_json_mode_and_new_chat(browser, lite) -> None:
    page = open_chat(browser, lite.url)
    bodies = chat_requests(page)
    settings(page, temperature=0, max_tokens=6)
    # an image dropped on the page and a video from the picker: both previewed, both sent
    transfer = page.evaluate_handle(
        """b64 => { const dt = new DataTransfer();
                    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                    dt.items.add(new File([bytes], 'hopper.png', {type: 'image/png'})); return dt; }""",
        base64.b64encode(HOPPER.read_bytes()).decode())
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    page.locator("#attachments .attachment img").wait_for()
    attach(page, AVI)
    assert page.locator("#attachments .attachment video").count() == 1
    # Shift+Enter is a new line, Enter sends
    page.click("#prompt")
    page.keyboard.type("What is shown?")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("Be brief.")
    page.keyboard.press("Enter")
    first = page.locator("article.msg.assistant").nth(0)
    assert wait_finished(first) == "done"
    kinds = [p["type"] for p in bodies[0]["messages"][0]["content"]]
    assert kinds == ["image_url", "video_url", "text"]
    assert bodies[0]["messages"][0]["content"][2]["text"] == "What is shown?\nBe brief."
    assert bodies[0]["messages"][0]["content"][1]["video_url"]["url"].startswith("data:video/")
    user = page.locator("article.msg.user").last
    assert user.locator(".media img").count() == 1 and user.locator(".media video").count() == 1
    # the second turn carries the first, and JSON mode sends response_format
    settings(page, json_mode=True)
    second = send(page, "And in JSON?")
    assert wait_finished(second) in ("done", "error")   # the toggle only asks; the server decides
    roles = [m["role"] for m in bodies[1]["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == first.locator(".text").text_content()
    assert bodies[1]["response_format"] == {"type": "json_object"}
    # a new chat forgets the conversation
    page.click("#new-chat")
    assert page.locator("article.msg").count() == 0 and page.is_visible("#empty")
    settings(page, json_mode=False)
    assert wait_finished(send(page, "hi")) == "done"
    assert [m["role"] for m in bodies[2]["messages"]] == ["user"] and "response_format" not in bodies[2]


@needs_browser
def test_stop_ends_the_generation_and_the_page_stays_usable(browser, lite) -> None:
    """A ~4000-token answer (about 6 s unloaded) stopped as soon as text shows: it stops growing, the server's
    engine is idle again soon after (it noticed the closed connection) and the next turn is answered.

    "Soon": within 3 s, or half the time of the ~4000 tokens left (10x a measured 400) on a loaded machine."""
    prompt = "Write a very long essay about rivers."
    t0 = time.monotonic()
    calib = httpx.post(f"{lite.url}/v1/chat/completions", timeout=60, json={
        "model": "nvila-lite", "max_tokens": 400, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
    t_400 = time.monotonic() - t0
    assert calib.json()["usage"]["completion_tokens"] == 400, "greedy decoding stopped early; the bound is void"
    page = open_chat(browser, lite.url)
    settings(page, temperature=0, max_tokens=4096)
    answer = send(page, prompt)
    page.wait_for_function("el => el.dataset.state === 'streaming' && el.textContent.length > 0",
                           arg=answer.element_handle())
    page.click("#stop")
    t0 = time.monotonic()
    assert wait_finished(answer) == "stopped"
    stopped_text = answer.locator(".text").text_content()
    assert stopped_text and answer.locator(".note").text_content() == "stopped"
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    bound = max(3.0, 5 * t_400)
    while (state := engine(lite))["running"] or state["waiting"]:
        assert time.monotonic() - t0 < bound, (f"the server kept generating {bound:.1f} s after the page stopped "
                                               f"(400 tokens take {t_400:.2f} s): {state}")
        time.sleep(0.05)
    assert answer.locator(".text").text_content() == stopped_text
    settings(page, max_tokens=4)
    assert wait_finished(send(page, "Thanks, that is enough.")) == "done"


@needs_browser
def test_server_error_message_is_shown_and_the_turn_can_be_retried(browser, lite) -> None:
    page = open_chat(browser, lite.url)
    page.set_input_files("#file", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"not a png"}])
    page.locator("#attachments .attachment").wait_for()
    answer = send(page, "What is this?")
    assert wait_finished(answer) == "error"
    want = httpx.post(f"{lite.url}/v1/chat/completions", timeout=30, json={
        "model": "nvila-lite", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(b"not a png").decode()}},
            {"type": "text", "text": "What is this?"}]}]})
    assert want.status_code == 400
    assert answer.locator(".note").text_content() == want.json()["error"]["message"]
    # the failed turn goes back to the composer
    assert page.input_value("#prompt") == "What is this?"
    assert page.locator("#attachments .attachment").count() == 1


@needs_browser
def test_api_key_is_asked_for_and_a_wrong_key_shows_the_servers_message(browser, secured) -> None:
    page = open_chat(browser, secured.url)
    assert page.is_visible("#auth") and page.inner_text("#model") == "API key required"
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.getElementById('auth-message').textContent !== ''")
    assert page.inner_text("#auth-message") == "invalid or missing API key"   # the server's error.message
    page.fill("#api-key", "secret")
    page.click("#auth button[type=submit]")
    page.wait_for_function("() => document.getElementById('auth').hidden")
    assert page.inner_text("#model") == "model: nvila-lite"
    with page.expect_request("**/v1/chat/completions") as request:
        answer = send(page, "hi")
    assert request.value.headers["authorization"] == "Bearer secret"
    assert wait_finished(answer) == "done"
    assert page.evaluate("sessionStorage.getItem('nvila-api-key')") == "secret"
    page.reload()   # the key is kept for the tab's session
    page.wait_for_function("() => document.getElementById('model').textContent === 'model: nvila-lite'")
    assert page.is_hidden("#auth")
