"""``nvila prune``: keep the top-K examples of each training file by DeltaLoss (or a baseline scorer).

A thin layer over :func:`nvila.prune.prune`; rerunning the same command in the same ``--out`` folder
resumes scoring, and rerunning with another ``--keep`` re-selects without scoring again.
"""

from __future__ import annotations

import argparse
import json

HELP = "keep the most useful examples of each training file (DeltaLoss scoring)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nvila.prune import NORMALIZATIONS, SCORERS

    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="training file (LLaVA/OpenAI JSON or JSONL), one sub-dataset each (repeatable)")
    p.add_argument("--small", default=None, metavar="MODEL", help="small model: checkpoint folder or Hub id")
    p.add_argument("--large", default=None, metavar="MODEL", help="large model: checkpoint folder or Hub id")
    p.add_argument("--small-lora", default=None, metavar="ADAPTER_DIR", help="LoRA adapter merged into --small")
    p.add_argument("--large-lora", default=None, metavar="ADAPTER_DIR", help="LoRA adapter merged into --large")
    p.add_argument("--keep", type=float, required=True, help="fraction of each file to keep, in (0, 1]")
    p.add_argument("--out", required=True, help="output folder (new, empty, or a previous run's to resume)")
    p.add_argument("--scorer", default="deltaloss",
                   help="; ".join(f"{k}: {v.help}" for k, v in SCORERS.items()) + " (default: deltaloss)")
    p.add_argument("--normalize", default="mean", choices=NORMALIZATIONS,
                   help="answer log-probability per token (mean, default) or in total (sum)")
    p.add_argument("--independent-turns", action="store_true",
                   help="score each question as its own single-turn prompt (as training with "
                        "data.independent_turns sees it)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the random scorer (default 0)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: auto)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from nvila.prune import PruneJob, prune

    job = PruneJob(data=tuple(args.data), out=args.out, keep=args.keep, scorer=args.scorer, normalize=args.normalize,
                   small=args.small, large=args.large, small_lora=args.small_lora, large_lora=args.large_lora,
                   batch_size=args.batch_size, seed=args.seed, dtype=args.dtype, device=args.device,
                   progress=not args.no_progress, independent_turns=args.independent_turns)
    print(json.dumps(prune(job), indent=2))
    return 0
