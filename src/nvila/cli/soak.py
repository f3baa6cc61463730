"""``nvila soak``: many mixed requests against a real server process: failures, latency, memory, overload."""

from __future__ import annotations

import argparse

HELP = "soak-test a server: mixed text/image/video/JSON-schema load, latency, memory growth and the 429 bound"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint the server loads (a small one: this measures the server)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warm", type=int, default=100, help="memory is compared with its value after this many requests")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=32, help="the server's queue bound (the overload burst is 2x it)")
    p.add_argument("--image", default=None, help="image sent in image requests (default: a test photo)")
    p.add_argument("--video", default=None, help="video sent in video requests (default: a test clip)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report (with provenance)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from nvila.base.files import write_json
    from nvila.base.provenance import provenance
    from nvila.serve.soak import SoakConfig, default_media, soak, verdict

    image, video = default_media()
    cfg = SoakConfig(args.model, Path(args.image) if args.image else image, Path(args.video) if args.video else video,
                     args.requests, args.concurrency, args.warm, args.max_tokens, args.max_queue)
    report = soak(cfg, progress=True)
    problems = verdict(report)
    report["problems"] = problems
    print(json.dumps({k: v for k, v in report.items() if k != "failure_examples"}, indent=2))
    if args.json:
        write_json(args.json, {**report, "provenance": provenance(model=args.model)})
    for p in problems:
        print(f"soak: FAILED: {p}")
    return 1 if problems else 0
