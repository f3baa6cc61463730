"""``nvila quantize``: write a quantized checkpoint (W8A8 vision tower, W4A16/W8A16/W8A8 LLM) with an error report.

A thin layer over :mod:`nvila.quant`: load the float model, build calibration prompts, quantize, save the
official layout + ``quant_config.json``, and write ``quant_report.json`` (per-layer relative errors) next
to it. ``nvila.load(OUT)`` / ``--model OUT`` then run the quantized model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nvila.base.errors import NvilaError

HELP = "quantize a checkpoint for deployment (W8A8 vision tower, W4A16 LLM) and report errors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="float checkpoint folder (official layout) or Hugging Face Hub id")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--vision", default="w8a8", help="vision tower scheme: w8a8 (SmoothQuant) | none (default: w8a8)")
    p.add_argument("--llm", default="auto", help="LLM scheme: w4a16 (AWQ) | w8a8 (SmoothQuant) | w8a16 | none | "
                   "auto: the one that decodes fastest on this machine's CPU class (w8a8 on AVX2 CPUs, whose "
                   "FBGEMM int8 kernel outruns the 4-bit one; w4a16 elsewhere; default)")
    p.add_argument("--calib", default=None, metavar="DATA", help="folder of images or training .json/.jsonl "
                   "(default: the example images in recipes/examples/data/images)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration prompts used (default 64)")
    p.add_argument("--calib-seed", type=int, default=None, help="draw the calibration prompts at random with "
                   "this seed (default: the first ones)")
    p.add_argument("--group-size", type=int, default=128, help="W4A16 input channels per scale (default 128)")
    p.add_argument("--bias-correction", action="store_true", help="add each LLM layer's mean output error "
                   "over the calibration inputs to its bias")
    p.add_argument("--rounding", default="gptq", choices=("gptq", "nearest"),
                   help="W4A16 rounding: gptq (error-compensating, from the inputs' second moments; default) "
                   "or nearest")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="AWQ clipping search for W4A16 (default: only with --rounding nearest)")
    p.add_argument("--no-sequential", dest="sequential", action="store_false",
                   help="calibrate every LLM layer on float inputs instead of the outputs of the quantized "
                   "layers before it")
    p.add_argument("--alpha", type=float, default=0.3, help="SmoothQuant migration strength, vision tower "
                   "(default 0.3)")
    p.add_argument("--llm-alpha", type=float, default=0.5, help="SmoothQuant migration strength, W8A8 LLM "
                   "(default 0.5)")
    p.add_argument("--dtype", default="float32", help="dtype calibration runs in (default float32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")


def _scheme(value: str) -> str | None:
    return None if value.lower() == "none" else value.lower()


def llm_scheme(value: str, device: str) -> str | None:
    """``--llm``: ``auto`` is the CPU class's choice (:attr:`~nvila.base.hardware.CpuRules.quant_llm`) for a
    model quantized on and for this CPU, W4A16 on a GPU (fused 4-bit kernels)."""
    from nvila.base.hardware import cpu_rules

    if value.lower() != "auto":
        return _scheme(value)
    return "w4a16" if not str(device).startswith("cpu") else cpu_rules().quant_llm


def run(args: argparse.Namespace) -> int:
    from nvila import api
    from nvila.base.files import write_json
    from nvila.base.provenance import provenance
    from nvila.formats.quant import QuantSpec
    from nvila.quant.data import calibration_conversations, calibration_prompts
    from nvila.quant.model import quantize_pipeline

    spec = QuantSpec(vision=_scheme(args.vision), llm=llm_scheme(args.llm, args.device), group_size=args.group_size,
                     alpha=args.alpha, llm_alpha=args.llm_alpha, bias_correction=args.bias_correction,
                     rounding=args.rounding, sequential=args.sequential, clip=args.clip)   # validated before the slow parts
    calibration_conversations(args.calib, args.calib_samples, args.calib_seed)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NvilaError(f"output folder {out} exists and is not empty; choose a new path")
    pipe = api.load(args.model, dtype=args.dtype, device=args.device, fast=False)
    prompts = calibration_prompts(pipe.processor, args.calib, args.calib_samples, args.calib_seed)
    result = quantize_pipeline(pipe, spec, prompts)
    pipe.save(out)
    calibration = {"data": args.calib or "default images", "seed": args.calib_seed, **result.config["calibration"]}
    report = {"model": args.model, "out": str(out), "vision": spec.vision, "llm": spec.llm,
              "group_size": spec.group_size, "rounding": spec.rounding, "sequential": spec.sequential,
              "alpha": spec.alpha, "llm_alpha": spec.llm_alpha, "calibration": calibration,
              "summary": result.summary(), "layers": result.report,
              "provenance": provenance(model=args.model)}
    write_json(out / "quant_report.json", report)
    print(json.dumps(report, indent=2))
    return 0
