"""``nvila train``: run a training recipe (one process, or one per device under torchrun)."""

from __future__ import annotations

import argparse

HELP = "train or fine-tune from a recipe (torchrun-ready)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--output-dir", default=None, help="run folder (default: the recipe's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.max_steps=10")


def run(args: argparse.Namespace) -> int:
    from nvila.train.recipe import load_recipe
    from nvila.train.trainer import Trainer

    recipe = load_recipe(args.config, args.overrides)
    trainer = Trainer(recipe, args.output_dir, resume=args.resume, device=args.device,
                      progress=not args.no_progress)
    out = trainer.run()
    if trainer.dist.main:
        last = trainer.step
        print(f"trained {last} steps; model: {out / 'model'}; metrics: {out / 'metrics.jsonl'}")
    if trainer.dist.world > 1:
        # Everything is saved and the process group is closed. A torchrun process can still abort while the
        # interpreter tears down torch's native threads ("terminate called without an active exception",
        # seen intermittently with gloo after a finished run), which torchrun reports as a failed run: leave
        # without that teardown.
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
