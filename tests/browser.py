"""The chat page of `nvila serve` in a real browser: Playwright driving Debian's Chromium.

``scripts/ensure_browser.sh`` installs what is missing (the ``playwright`` package with pip, Chromium with
apt-get). Playwright's own browser download (``playwright install``) is never used: it fetches from a CDN that
offline machines cannot reach, so the browser is the system's Chromium, found on PATH.

``python tests/browser.py --screenshot docs/img/chat-page.png`` remakes the screenshot in docs/serving.md with
the helpers the tests use, on NVILA-Nano (the default model of ``nvila serve``; ``nvila nano build`` first).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# a closed network: no background connections (updates, sync, field trials) that would be refused or time out
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
STREAM_TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    """The system Chromium (or Chrome) on PATH, or None."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (run scripts/ensure_browser.sh)"
    if find_chromium() is None:
        return (f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); run scripts/ensure_browser.sh "
                "as root, or apt-get install chromium")
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium driven by Playwright (a ``playwright.sync_api.Browser``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_chat(browser: Any, url: str, log: list[str] | None = None, **context: Any) -> Any:
    """A new page on the chat page at ``url``, connected (the model id shown) unless the server wants a key.

    ``log`` collects every URL the page requests and its script errors (as ``"pageerror: ..."``)."""
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(STREAM_TIMEOUT_MS)
    if log is not None:
        page.on("request", lambda r: log.append(r.url))
        page.on("pageerror", lambda e: log.append(f"pageerror: {e}"))
    page.goto(url)
    page.wait_for_function("() => !document.getElementById('model').textContent.includes('connecting')")
    return page


def attach(page: Any, *paths: Path) -> None:
    """Choose files with the file picker; waits until each has its preview."""
    before = page.locator("#attachments .attachment").count()
    page.set_input_files("#file", [str(p) for p in paths])
    page.locator("#attachments .attachment").nth(before + len(paths) - 1).wait_for()


def settings(page: Any, temperature: float | None = None, max_tokens: int | None = None,
             json_mode: bool | None = None) -> None:
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    if json_mode is not None:
        page.set_checked("#json-mode", json_mode)


def send(page: Any, text: str) -> Any:
    """Type ``text`` into the message box and press Enter; returns the new answer (a Locator)."""
    answers = page.locator("article.msg.assistant")
    n = answers.count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    answer = answers.nth(n)
    answer.wait_for()
    return answer


def wait_finished(answer: Any) -> str:
    """Wait until the answer is no longer streaming; returns its final state (done, stopped or error)."""
    answer.page.wait_for_function("el => el.dataset.state !== 'streaming'", arg=answer.element_handle(),
                                  timeout=STREAM_TIMEOUT_MS)
    return answer.get_attribute("data-state")


def screenshot(out: Path) -> None:
    """The page on NVILA-Nano with an easy-VQA image, one question and its answer, saved as a PNG."""
    from test_server import ServerProcess

    from nvila.builders.nano import default_model

    folder, adapter = default_model()
    image = Path(__file__).resolve().parents[1] / "examples" / "media" / "easy-vqa-test-7.png"
    server = ServerProcess(str(folder), *(("--lora", str(adapter)) if adapter else ()),
                           "--served-model-name", "nvila-nano")
    try:
        with chromium() as browser:
            page = open_chat(browser, server.url, viewport={"width": 900, "height": 640}, device_scale_factor=1)
            settings(page, temperature=0, max_tokens=32)
            attach(page, image)
            first = send(page, "What is the green shape? Answer with one word.")
            assert wait_finished(first) == "done", first.inner_text()
            second = send(page, "What color is the shape?")
            assert wait_finished(second) == "done", second.inner_text()
            page.fill("#prompt", "Is the shape a circle?")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
    finally:
        server.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, required=True, help="where to write the PNG")
    if (reason := missing_browser()) is not None:
        sys.exit(reason)
    screenshot(parser.parse_args().screenshot)
