"""``nvila bench-serve``: server throughput, one client at a time vs concurrent clients."""

from __future__ import annotations

import argparse

from nvila.cli.common import add_lora_arg, add_model_args, load_model

HELP = "server throughput: sequential vs concurrent clients"
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--json", default=None, metavar="FILE")


def run(args: argparse.Namespace) -> int:
    from nvila.serve.app import ServerSettings, create_app
    from nvila.serve.loadtest import free_port, run_load, start_server

    pipe = load_model(args)
    port = free_port()
    app = create_app(pipe, ServerSettings(model_id="bench"), max_queue=max(64, args.concurrency * 2),
                     max_batch=args.max_batch)
    server = start_server(app, port)
    try:
        run_load(port, "bench", 2, 1, args.max_tokens)  # warm-up
        seq = run_load(port, "bench", args.requests, 1, args.max_tokens)
        conc = run_load(port, "bench", args.requests, args.concurrency, args.max_tokens)
    finally:
        server.should_exit = True
    result = {"sequential": seq, f"concurrency_{args.concurrency}": conc,
              "throughput_ratio": conc["requests_per_s"] / seq["requests_per_s"]}
    for name, r in (("sequential", seq), (f"concurrency {args.concurrency}", conc)):
        print(f"{name:>16}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
              f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, failures {r['failures']}")
    print(f"throughput ratio: x{result['throughput_ratio']:.2f}")
    if args.json:
        from nvila.base.files import write_json
        from nvila.base.provenance import provenance

        write_json(args.json, {**result, "provenance": provenance(model=args.model or "nvila:nano", lora=args.lora,
                                                                  requests=args.requests,
                                                                  concurrency=args.concurrency,
                                                                  max_tokens=args.max_tokens)})
    return 0
