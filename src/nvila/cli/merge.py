"""``nvila merge``: fold a LoRA adapter into its base model and write the official layout."""

from __future__ import annotations

import argparse

HELP = "fold a LoRA adapter into its base model and write the official layout"
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint folder (official layout) or Hugging Face Hub id")
    p.add_argument("--lora", required=True, metavar="ADAPTER_DIR", help="LoRA adapter folder trained on --model")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", default="float32",
                   help="dtype the merge is computed in (default float32); tensors are written in their stored dtype")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from nvila import api

    pipe = api.load(args.model, dtype=args.dtype, device=args.device, fast=False, lora=args.lora)
    print(pipe.save(args.out))
    return 0
