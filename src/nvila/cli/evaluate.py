"""``nvila eval``: accuracy of a model on an evaluation dataset (default model: NVILA-Nano)."""

from __future__ import annotations

import argparse

from nvila.cli.common import add_lora_arg, add_model_args, load_model

HELP = "accuracy of a model on an evaluation dataset (default model: NVILA-Nano)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--dataset", default="easy-vqa", help="evaluation dataset (default: easy-vqa)")
    p.add_argument("--split", default="test")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="the dataset's folder, for generated datasets (nano-video: default data/nano-video)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None, metavar="FILE", help="write the report (accuracy, n, predictions)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from nvila.base.files import write_json
    from nvila.base.provenance import provenance
    from nvila.eval.datasets import load_eval
    from nvila.eval.run import evaluate

    items = load_eval(args.dataset, args.split, args.data)
    if args.limit is not None:
        items = items[: args.limit]
    report = evaluate(load_model(args), items, batch_size=args.batch_size, progress=not args.no_progress)
    report = {"dataset": args.dataset, "split": args.split, "model": args.model or "nvila-nano", **report,
              "provenance": provenance(model=args.model or "nvila:nano", lora=args.lora, dataset=args.dataset,
                                       split=args.split, limit=args.limit)}
    print(f"{args.dataset} {args.split}: accuracy {report['accuracy']:.4f} ({report['correct']}/{report['n']}), "
          f"{report['items_per_s']:.1f} questions/s")
    if args.json:
        write_json(args.json, report)
    return 0
