#!/usr/bin/env bash
# Install what the chat page's browser tests (tests/test_chat_page.py) need, if it is missing:
#   - the `playwright` Python package, into the venv (PY=.venv/bin/python by default);
#   - Debian's Chromium (/usr/bin/chromium), with apt-get when running as root or with passwordless sudo.
# Playwright's own browser download (`playwright install`) is never used: it fetches from a CDN, which offline
# and sandboxed machines cannot reach; the tests launch Debian's Chromium instead (tests/browser.py).
# Where no browser can be installed this script only warns (exit 0): the tests then skip and say why.
set -euo pipefail
PY=${PY:-.venv/bin/python}

if ! "$PY" -c "import playwright" 2>/dev/null; then
    "$PY" -m pip install --quiet "playwright>=1.40"
fi

for exe in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$exe" >/dev/null 2>&1; then
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_browser: no Chromium found and no apt-get here; the browser tests will skip" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=sudo
else
    echo "ensure_browser: no Chromium found; install it (apt-get install chromium) as root, or the browser tests skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    echo "ensure_browser: apt-get could not install chromium; the browser tests will skip" >&2
fi
