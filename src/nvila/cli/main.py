"""``nvila`` command line: a registry of verbs, one module each, each a thin function over the library.

Every verb module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit status``. Errors nvila
raises on purpose (bad media, bad checkpoint, prompt too long, ...) are printed as one ``error: ...`` line
with exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Sequence

from nvila.base.errors import NvilaError
from nvila.cli import (
    bench,
    bench_kernels,
    bench_serve,
    bench_train,
    chat,
    convert,
    evaluate,
    infer,
    merge,
    nano,
    prune,
    quantize,
    random_checkpoint,
    serve,
    soak,
    train,
)

# verb -> module, in the order `nvila --help` lists them
COMMANDS: dict[str, ModuleType] = {
    "infer": infer, "chat": chat, "serve": serve, "eval": evaluate, "train": train, "merge": merge,
    "convert": convert, "quantize": quantize, "prune": prune, "nano": nano, "random-checkpoint": random_checkpoint,
    "bench": bench, "bench-serve": bench_serve, "bench-train": bench_train, "bench-kernels": bench_kernels,
    "soak": soak,
}


def build_parser() -> argparse.ArgumentParser:
    from nvila import __version__

    parser = argparse.ArgumentParser(prog="nvila", description="NVILA vision-language models")
    parser.add_argument("--version", action="version", version=f"nvila {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, verb in COMMANDS.items():
        verb.add_arguments(sub.add_parser(name, help=verb.HELP, description=verb.HELP))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except NvilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
