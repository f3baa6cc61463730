"""``nvila bench-kernels``: every linear path nvila can take, timed on NVILA-Lite-2B's shapes on this machine."""

from __future__ import annotations

import argparse

HELP = "time the float and quantized linear kernels on this CPU (the measurements behind the kernel rules)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=5,
                   help="timed calls per kernel at least (median; default 5; fast kernels are repeated for 0.5 s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table as JSON")


def run(args: argparse.Namespace) -> int:
    from nvila.bench.kernels import run as run_kernels

    run_kernels(args.json, args.runs)
    return 0
