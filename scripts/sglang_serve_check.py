#!/usr/bin/env python3
"""Serve an NVILA checkpoint with SGLang on a GPU and ask it about one image through the OpenAI client.

usage:  .venv/bin/python scripts/sglang_serve_check.py [--model MODEL] [--sglang-python PY] [--work-dir DIR] [--image PNG]
                                              [--prompt TEXT] [--port P] [--json OUT] [--dry-run]
        make gpu-check [MODEL=...] [SGLANG_PY=...]

It runs in the project's .venv (nvila for `nvila convert` and the processor's token count, the `openai` client
of the test extra); SGLang runs in its own interpreter, --sglang-python. Steps:
  1. MODEL: an "-hf" folder (config.json model_type nvila / nvila_lite) is served as it is; a llava-layout folder
     is converted with `nvila convert MODEL WORK/<name>-hf --to hf --replace`; a Hub id is downloaded with
     huggingface_hub first and then treated as a folder.
  2. `PY -m sglang.launch_server --model-path HF --trust-remote-code --host 127.0.0.1 --port P` starts in its own
     process group, its output in WORK/server.log; GET /health is polled until it answers 200. If the server
     exits or --startup-timeout passes, the error names the reason and shows the log's last lines.
  3. One chat completion (temperature 0): a user message with the image as a base64 data URL, then --prompt. The
     answer and the token usage are printed. The prompt's token count must equal the input_ids length the
     folder's own processor gives for the same message: a shorter prompt means SGLang dropped the image (its
     chat-template handling keeps media only for templates it reads as taking OpenAI-style content lists).
  4. The server's process group gets SIGTERM (SIGKILL after 30 s) on every way out, Ctrl-C included.
--dry-run prints the commands and the request instead of running them (no GPU, sglang or network needed).
Exit status: 0 an answer came back and the prompt length is right; 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "Efficient-Large-Model/NVILA-Lite-2B"
DEFAULT_IMAGE = ROOT / "tests/fixtures/official/media/china_800x600.png"
HF_TYPES = ("nvila", "nvila_lite")


class CheckError(Exception):
    """A failed step; the message says what happened and what to look at."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_local(model: str) -> bool:
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") != 1


def layout(folder: Path) -> str:
    """``"hf"`` for a converted folder, ``"llava"`` otherwise (`nvila convert` checks that layout itself)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckError(f"{folder}/config.json is unreadable ({e}); --model needs a checkpoint folder") from None
    return "hf" if cfg.get("model_type") in HF_TYPES else "llava"


def plan(args: argparse.Namespace, folder: Path | None) -> tuple[list[str] | None, Path]:
    """(the convert command or None, the "-hf" folder to serve) for ``folder`` (None: a Hub id not fetched yet)."""
    name = Path(args.model.rstrip("/")).name
    if folder is not None and layout(folder) == "hf":
        return None, folder
    out = args.work_dir / f"{name}-hf"
    return [args.nvila, "convert", str(folder or args.model), str(out), "--to", "hf", "--replace"], out


def server_command(args: argparse.Namespace, hf: Path, port: int | str) -> list[str]:
    return [args.sglang_python, "-m", "sglang.launch_server", "--model-path", str(hf), "--trust-remote-code",
            "--host", "127.0.0.1", "--port", str(port), *args.server_arg]


def messages(image_url: str, prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                         {"type": "text", "text": prompt}]}]


def data_url(image: Path) -> str:
    kind = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(image.suffix.lower())
    if kind is None:
        raise CheckError(f"{image}: use a .png, .jpg or .webp image")
    return f"data:image/{kind};base64," + base64.b64encode(image.read_bytes()).decode("ascii")


def expected_prompt_tokens(hf: Path, image: Path, prompt: str) -> int:
    """The input_ids length of the folder's own processor for the request's message (media tokens expanded)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(hf), trust_remote_code=True)
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.open(image).convert("RGB")},
                                         {"type": "text", "text": prompt}]}]
    out = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(out["input_ids"][0])


def tail(path: Path, n: int = 40) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except OSError:
        return "(no log)"


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    """Seconds until GET url answers 200; CheckError when the server exits or ``timeout`` passes."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise CheckError(f"the SGLang server exited with status {proc.returncode} before it was healthy; "
                             f"last lines of {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise CheckError(f"the SGLang server was not healthy after {timeout:.0f} s ({url}); last lines of {log}:\n"
                     f"{tail(log)}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it has its own session), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def ask(port: int, image: Path, prompt: str, max_tokens: int) -> dict[str, Any]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", timeout=600)
    model = client.models.list().data[0].id
    start = time.monotonic()
    r = client.chat.completions.create(model=model, messages=messages(data_url(image), prompt),
                                       max_tokens=max_tokens, temperature=0)
    return {"served_model": model, "answer": r.choices[0].message.content or "",
            "finish_reason": r.choices[0].finish_reason, "seconds": round(time.monotonic() - start, 2),
            "usage": r.usage.model_dump() if r.usage else None}


def dry_run(args: argparse.Namespace) -> int:
    folder = Path(args.model).expanduser() if is_local(args.model) else None
    if folder is None:
        print(f"# {args.model}: a Hub id, downloaded with huggingface_hub.snapshot_download; converted if it is "
              "in the llava layout:")
    convert, hf = plan(args, folder)
    print(shlex.join(convert) if convert else f"# {hf} is an '-hf' folder: served as it is")
    port = args.port or "PORT"   # the real run picks a free port
    print(shlex.join(server_command(args, hf, port)) + f"  > {args.work_dir / 'server.log'} 2>&1")
    print(f"# wait for GET http://127.0.0.1:{port}/health == 200 (at most {args.startup_timeout:.0f} s), then:")
    request = {"model": "<the served model id>", "max_tokens": args.max_tokens, "temperature": 0,
               "messages": messages(f"data:image/...;base64,<{args.image.name}>", args.prompt)}
    print(f"POST http://127.0.0.1:{port}/v1/chat/completions " + json.dumps(request))
    print(f"# expect usage.prompt_tokens == the input_ids length of {hf}'s processor for that message")
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Convert, serve, ask; returns the result (raises CheckError on a failed step)."""
    result: dict[str, Any] = {"model": args.model, "image": str(args.image), "prompt": args.prompt}
    if is_local(args.model):
        folder = Path(args.model).expanduser()
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=args.model))
    convert, hf = plan(args, folder)
    if convert:
        print("+ " + shlex.join(convert), flush=True)
        if subprocess.run(convert, check=False).returncode != 0:
            raise CheckError(f"`{shlex.join(convert)}` failed (its message is above)")
    result["hf_folder"] = str(hf)
    expected = expected_prompt_tokens(hf, args.image, args.prompt)
    port = args.port or free_port()
    cmd = server_command(args, hf, port)
    log = args.work_dir / "server.log"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print("+ " + shlex.join(cmd) + f"  > {log} 2>&1", flush=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        result["startup_seconds"] = round(wait_healthy(proc, f"http://127.0.0.1:{port}/health", log,
                                                       args.startup_timeout), 1)
        result.update(ask(port, args.image, args.prompt, args.max_tokens))
    finally:
        stop(proc)
    got = (result.get("usage") or {}).get("prompt_tokens")
    result["expected_prompt_tokens"] = expected
    problems = []
    if not result["answer"].strip():
        problems.append("the answer is empty")
    if got != expected:
        problems.append(f"the server counted {got} prompt tokens, the folder's processor {expected}"
                        + (" (far fewer: SGLang dropped the image; see the chat template's content format in "
                           "its log)" if isinstance(got, int) and got < expected // 2 else ""))
    result["problems"] = problems
    result["ok"] = not problems
    return result


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="details: the docstring of scripts/sglang_serve_check.py")
    ap.add_argument("--model", default=DEFAULT_MODEL, help=f"llava or '-hf' folder, or Hub id (default {DEFAULT_MODEL})")
    ap.add_argument("--sglang-python", default=sys.executable,
                    help="the interpreter with sglang installed (default: this one)")
    ap.add_argument("--nvila", default=str(Path(sys.executable).with_name("nvila")),
                    help="the nvila command (default: next to this interpreter)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "build/gpu-check",
                    help="where the converted folder and server.log go (default build/gpu-check)")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the image to ask about (png, jpg, webp)")
    ap.add_argument("--prompt", default="Describe the image in one sentence.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for sglang.launch_server (repeat: --server-arg=--mem-fraction-static "
                         "--server-arg=0.8)")
    ap.add_argument("--json", type=Path, help="also write the result (with provenance) to this file")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and the request, run nothing")
    args = ap.parse_args()
    if not args.image.is_file():
        ap.error(f"no image {args.image}")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the finally blocks: the server is stopped
    try:
        if args.dry_run:
            return dry_run(args)
        result = run(args)
    except CheckError as e:
        print(f"sglang_serve_check: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"answer: {result['answer']}")
    print(f"usage: {result['usage']}; expected prompt tokens {result['expected_prompt_tokens']}; server start "
          f"{result['startup_seconds']} s; request {result['seconds']} s")
    for p in result["problems"]:
        print(f"sglang_serve_check: FAILED: {p}", file=sys.stderr)
    if args.json:
        from nvila.base.files import write_json
        from nvila.base.provenance import provenance

        write_json(args.json, {**result, "provenance": provenance(model=args.model,
                                                                  sglang_python=args.sglang_python)})
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
