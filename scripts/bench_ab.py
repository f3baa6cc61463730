"""Has a change made anything slower? ``nvila bench`` of an earlier commit and of the working tree, in turns.

    python scripts/bench_ab.py --base COMMIT --model DIR [--quantized QDIR] [--compare fast,fp32] [--rounds 2] \
        [--json OUT]

The earlier commit is checked out into a temporary git worktree and run from there with the same virtual
environment (``PYTHONPATH``); the two versions alternate, ``--rounds`` times each, so a machine whose speed
drifts slows both alike. For every setup and metric the JSON holds each run's value, the medians and the
ratio now / base (for times below 1 is faster, for tokens/s above 1 is). Peak RSS of a quantized setup is the
process's high-water mark after the float setups, as in ``nvila bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_rss_bytes", "weight_bytes")


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """``runs["base"|"now"]``: ``nvila bench`` JSONs -> per setup and metric: values, medians, ratio now/base."""
    out: dict[str, Any] = {}
    for setup in runs["now"][0]["setups"]:
        rows = {}
        for metric in METRICS:
            values = {v: [r["setups"][setup][metric] for r in runs[v]] for v in ("base", "now")}
            med = {v: statistics.median(x) for v, x in values.items()}
            rows[metric] = {"values": values, "median": med, "now_over_base": med["now"] / med["base"]}
        out[setup] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the earlier commit")
    p.add_argument("--model", required=True)
    p.add_argument("--quantized", default=None)
    p.add_argument("--compare", default="fast,fp32")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    nvila = [sys.executable, "-m", "nvila", "bench", "--model", args.model, "--compare", args.compare,
             "--runs", "3", "--warmup", "1", "--new-tokens", str(args.new_tokens)]
    if args.quantized:
        nvila += ["--quantized", args.quantized]
    known = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}"],
                           capture_output=True, text=True)
    if known.returncode:
        print(f"bench_ab: --base {args.base!r} is not a commit of {ROOT}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "now": []}
    with tempfile.TemporaryDirectory(prefix="nvila-ab-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), args.base], check=True)
        try:
            for i in range(args.rounds):
                for version in ("base", "now"):
                    env = dict(os.environ)
                    env.pop("PYTHONPATH", None)
                    if version == "base":
                        env["PYTHONPATH"] = str(tree / "src")
                    out = Path(tmp) / f"{version}-{i}.json"
                    print(f"round {i + 1}/{args.rounds}: {version}", flush=True)
                    done = subprocess.run([*nvila, "--json", str(out)], env=env, stdout=subprocess.DEVNULL)
                    if done.returncode:
                        what = args.base if version == "base" else "the working tree"
                        print(f"bench_ab: nvila bench of {what} failed with exit status {done.returncode}",
                              file=sys.stderr)
                        return done.returncode
                    runs[version].append(json.loads(out.read_text()))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    summary = summarize(runs)
    for setup, rows in summary.items():
        print(setup)
        for metric, row in rows.items():
            print(f"  {metric:22s} base {row['median']['base']:.4g}  now {row['median']['now']:.4g}  "
                  f"now/base {row['now_over_base']:.3f}")
    if args.json:
        from nvila.base.files import write_json
        from nvila.base.provenance import provenance

        write_json(args.json, {"base": args.base, "setups": summary,
                               "provenance": provenance(base=args.base, model=args.model, quantized=args.quantized,
                                                        compare=args.compare, rounds=args.rounds)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
