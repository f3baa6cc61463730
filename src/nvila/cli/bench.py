"""``nvila bench``: stage timings, decode speed and memory of setups, side by side (nvila.bench.run)."""

from __future__ import annotations

import argparse

HELP = "measure stage timings, decode speed and memory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--media", nargs="+", default=[], metavar="FILE", help="media (default: a synthetic image)")
    p.add_argument("--image-size", type=int, default=448, help="side of the synthetic image (default 448)")
    p.add_argument("--frames", type=int, default=None, help="use a synthetic video of N frames instead")
    p.add_argument("--text", default="Describe this in detail.")
    p.add_argument("--setup", default="auto", help="setup to measure: auto (what nvila.load picks here; default) | "
                   "fp32 | bf16 | fast | fp32-w16")
    p.add_argument("--compare", default=None, metavar="A,B", help="measure setups side by side, e.g. fp32,fast")
    p.add_argument("--quantized", default=None, metavar="DIR",
                   help="also measure this quantized checkpoint (nvila quantize of --model), after the setups")
    p.add_argument("--quant-dtype", default="auto",
                   help="dtype of the quantized model's float parts and activations (default auto)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="then load every setup at once and time them in turns for ROUNDS rounds (ratios robust "
                        "to a machine whose speed drifts; memory adds up)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default=None, metavar="FILE", help="write the medians as JSON")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="instead: decode tokens/s of --setup with and without this JSON schema as response_format, "
                   "side by side (--runs rounds after --warmup)")
    p.add_argument("--sweep", default=None, metavar="V1,V2,..",
                   help="also measure time to first token of the auto setup vs image sizes (or frame counts with "
                   "--frames)")


def run(args: argparse.Namespace) -> int:
    from nvila.bench.run import BenchJob, run_structured
    from nvila.bench.run import run as run_bench
    from nvila.cli.common import json_schema_format

    setups = tuple(args.compare.split(",")) if args.compare else (args.setup,)
    sweep = tuple(int(x) for x in args.sweep.split(",")) if args.sweep else ()
    job = BenchJob(model=args.model, setups=setups, device=args.device, media=tuple(args.media),
                   image_size=args.image_size, frames=args.frames, text=args.text, quantized=args.quantized,
                   quant_dtype=args.quant_dtype, runs=args.runs, warmup=args.warmup, interleave=args.interleave,
                   new_tokens=args.new_tokens, json=args.json, plot=args.plot, sweep=sweep,
                   response_format=json_schema_format(args.json_schema) if args.json_schema else None)
    if job.response_format is not None:
        run_structured(job)
    else:
        run_bench(job)
    return 0
