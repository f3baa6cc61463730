"""``nvila train``: run a training recipe (one process, or one per device under torchrun)."""

from __future__ import annotations

import argparse

from nvila.cli.main import command


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--output-dir", default=None, help="run folder (default: the recipe's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.max_steps=10")


@command("train", "train or fine-tune from a recipe (torchrun-ready)", _train_args)
def train(args: argparse.Namespace) -> int:
    from nvila.train.recipe import load_recipe
    from nvila.train.trainer import Trainer

    recipe = load_recipe(args.config, args.overrides)
    trainer = Trainer(recipe, args.output_dir, resume=args.resume, device=args.device,
                      progress=not args.no_progress)
    out = trainer.run()
    if trainer.dist.main:
        last = trainer.step
        print(f"trained {last} steps; model: {out / 'model'}; metrics: {out / 'metrics.jsonl'}")
    return 0


def _bench_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (official layout)")
    p.add_argument("--modes", default="full,lora", help="comma-separated: full, lora (default: both)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp32")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--data", default=None, help="folder with shapes.jsonl (default: recipes/examples/data)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


@command("bench-train", "peak memory and step time: full fine-tuning vs LoRA + ViT LayerNorm", _bench_train_args)
def bench_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from nvila.train.membench import EXAMPLE_DATA, compare

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = compare(args.model, modes, args.steps, args.batch_size, args.precision,
                      Path(args.data) if args.data else EXAMPLE_DATA, args.device)
    print(f"{'mode':<6} {'trainable':>14} {'peak GiB':>9} {'after load':>11} {'training':>9} {'step s':>7}")
    for r in results:
        print(f"{r['mode']:<6} {r['trainable_params']:>14,} {r['peak_gib']:>9.2f} {r['after_load_gib']:>11.2f} "
              f"{r['training_gib']:>9.2f} {r['step_s']:>7.2f}")
    by = {r["mode"]: r for r in results}
    summary = {}
    if "full" in by and "lora" in by:
        summary = {"peak_ratio": by["full"]["peak_gib"] / by["lora"]["peak_gib"],
                   "training_ratio": by["full"]["training_gib"] / max(by["lora"]["training_gib"], 1e-9),
                   "step_ratio": by["full"]["step_s"] / by["lora"]["step_s"]}
        print(f"full / lora: peak memory x{summary['peak_ratio']:.2f}, memory added by training "
              f"x{summary['training_ratio']:.2f}, step time x{summary['step_ratio']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": str(args.model), "results": results, **summary}, indent=2) + "\n")
    return 0
