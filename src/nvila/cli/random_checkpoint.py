"""``nvila random-checkpoint``: a random checkpoint with a released model's exact shapes."""

from __future__ import annotations

import argparse

HELP = "write a random checkpoint with a released model's exact shapes"

def add_arguments(p: argparse.ArgumentParser) -> None:
    from nvila.builders.presets import PRESETS

    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (default: bf16, as released)")
    p.add_argument("--layers", type=int, default=None, help="truncate LLM and ViT to N layers (quick tests)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from nvila.base.hardware import resolve_dtype
    from nvila.builders.presets import random_checkpoint as write

    out = write(args.preset, args.out, resolve_dtype(args.dtype, torch.device("cpu")), args.layers, args.seed)
    print(out)
    return 0
