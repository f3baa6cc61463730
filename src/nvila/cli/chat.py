"""``nvila chat``: an interactive multi-turn chat with streaming answers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nvila.base.errors import NvilaError
from nvila.cli.common import add_lora_arg, add_model_args, add_sampling_args, generation_options, load_model
from nvila.processing.media import media_part

HELP = "interactive multi-turn chat with streaming"
CHAT_HELP = """commands: /image PATH, /video PATH (attach to your next message), /reset, /exit"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--system", default=None, help="system prompt (default: the model's)")
    add_sampling_args(p)


def run(args: argparse.Namespace) -> int:
    pipe = load_model(args)
    options = generation_options(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    interactive = sys.stdin.isatty()
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history, pending = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith(("/image ", "/video ")):
            kind, path = line[1:6], line[7:].strip()
            try:
                part = media_part(path)
            except NvilaError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            pending.append(part if part["type"] == kind else {"type": kind, kind: path})
            print(f"({kind} attached: {Path(path).name})", file=sys.stderr)
            continue
        turn = {"role": "user", "content": pending + [{"type": "text", "text": line}]}
        answer = ""
        try:
            print("nvila> " if interactive else "", end="", flush=True)
            for piece in pipe.stream(system + history + [turn], **options):
                answer += piece
                print(piece, end="", flush=True)
            print()
        except NvilaError as e:  # the turn is dropped, the conversation so far is kept
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": answer}]
        pending = []
