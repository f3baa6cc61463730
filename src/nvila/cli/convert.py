"""``nvila convert``: a checkpoint from the llava layout to the "-hf" layout, or back."""

from __future__ import annotations

import argparse

HELP = "convert a checkpoint between the llava layout (llm/, vision_tower/, mm_projector/) and the '-hf' layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint folder or Hugging Face Hub id (either layout)")
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=("hf", "llava"),
                   help="hf: one root folder that transformers (Auto classes) and SGLang load; llava: the layout of "
                        "the released NVILA checkpoints")
    p.add_argument("--replace", action="store_true", help="replace OUT if it exists (once the new folder is complete)")


def run(args: argparse.Namespace) -> int:
    from nvila.checkpoint.convert import convert

    print(convert(args.src, args.out, args.to, replace=args.replace))
    return 0
