"""``nvila bench-train``: peak memory and step time, full fine-tuning vs LoRA + ViT LayerNorm."""

from __future__ import annotations

import argparse

HELP = "peak memory and step time: full fine-tuning vs LoRA + ViT LayerNorm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (official layout)")
    p.add_argument("--modes", default="full,lora", help="comma-separated: full, lora (default: both)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp32")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--data", default=None, help="folder with shapes.jsonl (default: recipes/examples/data)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def run(args: argparse.Namespace) -> int:
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
        from nvila.base.files import write_json
        from nvila.base.provenance import provenance

        write_json(args.json, {"model": str(args.model), "results": results, **summary,
                               "provenance": provenance(model=str(args.model), modes=modes, steps=args.steps,
                                                        batch_size=args.batch_size)})
    return 0
