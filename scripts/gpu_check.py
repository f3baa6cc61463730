#!/usr/bin/env python3
"""Every CUDA path of nvila, checked in one command on a machine with a GPU (``make gpu-check``).

usage:  .venv/bin/python scripts/gpu_check.py [--out FILE] [--work-dir DIR] [--stages a,b,...] [--quick]
                                              [--sglang-python PY] [--sglang-model MODEL]

Stages, in order (each records status ok / failed / skipped with the reason, its seconds and its numbers):
  parity_fp32    the 39 official fixture cases in float32 on the device (TF32 off): prompt ids, media-embedding
                 counts, last-position logits (< 1e-4 of the reference's) and 16 greedy tokens
  bf16           the same cases in bfloat16: max logit error (< BF16_LOGIT_BOUND, tests/test_fast.py's bound),
                 first greedy token and 16-token agreement with the reference
  quant_kernels  W8A16, W8A8 and W4A16 g128 linears on NVILA-Lite-2B shapes, 1 / 16 / 152 rows: the fused CUDA
                 op against the layer's reference math (dequantize, then a float GEMM)       [CUDA]
  bench          `nvila bench` on a random checkpoint with NVILA-Lite-2B's shapes: fp32 vs bf16, and the model
                 after `nvila quantize` (W8A8 ViT + W4A16 LLM, 4 calibration prompts)        [CUDA]
  train          a few steps of the tiny LoRA recipe in bf16 and in fp8 (sm89+), tokens/s   [CUDA]
  sglang         scripts/sglang_serve_check.py: the model converted to "-hf", served by SGLang, one image
                 request through the openai client                                            [CUDA + sglang]
Without CUDA the stages marked [CUDA] are skipped with that reason and the others run on the CPU, so the script
itself is tested on any machine (tests/test_gpu_check.py, with --quick: one case per fixture model). It writes
one JSON report (default docs/perf/gpu-<device name>.json; with provenance) and exits 1 if a stage failed.
Meant to fit 10 minutes on one H100 (not yet run on a GPU); the random checkpoint (~4 GiB) is written once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "official"
RECIPE = ROOT / "recipes" / "examples" / "tiny-lora.yaml"
STAGES = ("parity_fp32", "bf16", "quant_kernels", "bench", "train", "sglang")
BF16_LOGIT_BOUND = 0.75          # tests/test_fast.py
QUANT_REL_BOUND = 2e-2           # fused op vs reference math, both in bf16 (relative to the output's max)
NVILA = [sys.executable, "-m", "nvila"]


class Skip(Exception):
    """A stage that cannot run here; the message is the reason."""


def cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise Skip("needs CUDA (no GPU visible to torch)")
    return torch


def fixture_cases(quick: bool) -> list[tuple[str, dict]]:
    cases = sorted(json.loads((FIXTURES / "outputs" / "index.json").read_text()).items())
    if quick:
        seen: set[str] = set()
        cases = [(c, s) for c, s in cases if not (c.split("/")[0] in seen or seen.add(c.split("/")[0]))]
    return cases


def parity_report() -> Any:
    """recipes/parity/report.py (`make parity`), for its fixture prompts: the one place they are built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("parity_report", ROOT / "recipes" / "parity" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fixture_run(dtype: str, quick: bool) -> list[dict[str, Any]]:
    """Every fixture case on the device in ``dtype``: equality flags and errors against the reference."""
    import numpy as np
    import torch

    import nvila

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prompts = parity_report()
    pipes: dict[str, Any] = {}
    rows = []
    for case, spec in fixture_cases(quick):
        variant = case.split("/")[0]
        if variant not in pipes:
            pipes[variant] = nvila.load(FIXTURES / "checkpoints" / variant, dtype=dtype, device=device())
        pipe, msgs = pipes[variant], prompts.messages(spec)
        ref = json.loads((FIXTURES / "outputs" / f"{case}.json").read_text())
        want = np.load(FIXTURES / "outputs" / f"{case}.npz")["last_logits"]
        prompt = pipe.prepare(msgs)
        logits = pipe.next_token_logits(msgs).float().cpu().numpy()
        out = pipe.generate(msgs, max_new_tokens=16)
        rows.append({"case": case, "ids_equal": prompt.input_ids == ref["prompt"]["input_ids"],
                     "media_embeddings_equal": prompt.num_media_embeddings == ref["num_visual_tokens"],
                     "max_logit_error": float(np.abs(logits - want).max()),
                     "first_token_equal": int(logits.argmax()) == int(want.argmax()),
                     "greedy_equal": out.output_token_ids == ref["generation"]["output_ids"]})
    return rows


def stage_parity_fp32(args: argparse.Namespace) -> dict[str, Any]:
    rows = fixture_run("float32", args.quick)
    bad = [r["case"] for r in rows if not (r["ids_equal"] and r["media_embeddings_equal"] and r["greedy_equal"]
                                           and r["max_logit_error"] < 1e-4)]
    return {"ok": not bad, "device": device(), "cases": len(rows), "failed_cases": bad,
            "max_logit_error": max(r["max_logit_error"] for r in rows), "rows": rows}


def stage_bf16(args: argparse.Namespace) -> dict[str, Any]:
    rows = fixture_run("bfloat16", args.quick)
    err = max(r["max_logit_error"] for r in rows)
    per_variant: dict[str, list[bool]] = {}
    for r in rows:
        per_variant.setdefault(r["case"].split("/")[0], []).append(r["first_token_equal"])
    first_ok = all(sum(v) >= len(v) - 1 for v in per_variant.values())   # >= 12 of 13 per model, as tested
    return {"ok": err < BF16_LOGIT_BOUND and first_ok, "device": device(), "cases": len(rows),
            "max_logit_error": err, "bound": BF16_LOGIT_BOUND,
            "first_token_equal": sum(r["first_token_equal"] for r in rows),
            "greedy_equal": sum(r["greedy_equal"] for r in rows), "rows": rows}


def stage_quant_kernels(args: argparse.Namespace) -> dict[str, Any]:
    torch = cuda()
    from nvila.model.quantized import W4A16Linear, W8A8Linear, W8A16Linear

    torch.manual_seed(0)
    shapes = [(1536, 1536), (1536, 8960), (8960, 1536), (1152, 4304)]
    rows, ok = [], True
    for cls in (W8A16Linear, W8A8Linear, W4A16Linear):
        for n_in, n_out in shapes:
            lin = torch.nn.Linear(n_in, n_out, bias=True)
            q = (cls.from_float(lin, group_size=128) if cls is W4A16Linear else cls.from_float(lin)).cuda()
            for n_rows in (1, 16, 152):
                x = torch.randn(n_rows, n_in, device="cuda", dtype=torch.bfloat16)
                fused, ref = q.kernel(x).float(), q.reference(x).float()
                rel = float((fused - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                ok &= rel < QUANT_REL_BOUND
                rows.append({"scheme": cls.__name__, "in": n_in, "out": n_out, "rows": n_rows, "rel_error": rel})
    return {"ok": ok, "bound": QUANT_REL_BOUND, "max_rel_error": max(r["rel_error"] for r in rows), "rows": rows}


def run(cmd: list[str], log: Path, timeout: float) -> None:
    """Run a command, its output to ``log``; raise with the log's tail on failure."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[2:5])} ... exited {proc.returncode}:\n{tail}")


def stage_bench(args: argparse.Namespace) -> dict[str, Any]:
    cuda()
    base, quant = args.work_dir / "nvila-lite-2b", args.work_dir / "nvila-lite-2b-w4"
    if not (base / "config.json").is_file():
        run([*NVILA, "random-checkpoint", "--preset", "nvila-lite-2b", "--out", str(base)],
            args.work_dir / "random.log", 1200)
    if not (quant / "quant_config.json").is_file():
        run([*NVILA, "quantize", "--model", str(base), "--out", str(quant), "--calib-samples", "4", "--device",
             "cuda"], args.work_dir / "quantize.log", 1200)
    out = args.work_dir / "bench.json"
    run([*NVILA, "bench", "--model", str(base), "--device", "cuda", "--compare", "fp32,bf16", "--quantized",
         str(quant), "--runs", "3", "--warmup", "1", "--new-tokens", "32", "--json", str(out)],
        args.work_dir / "bench.log", 1200)
    report = json.loads(out.read_text())
    report.pop("provenance", None)
    return {"ok": True, **report}


def stage_train(args: argparse.Namespace) -> dict[str, Any]:
    torch = cuda()
    result: dict[str, Any] = {"ok": True}
    capability = torch.cuda.get_device_capability()
    for precision in ("bf16", "fp8"):
        if precision == "fp8" and capability < (8, 9):
            result[precision] = {"status": "skipped", "reason": f"fp8 needs sm89+, this GPU is sm{capability[0]}"
                                                                f"{capability[1]}"}
            continue
        out = args.work_dir / f"train-{precision}"
        run([*NVILA, "train", "--config", str(RECIPE), "--output-dir", str(out), "--device", "cuda",
             f"train.precision={precision}", "train.max_steps=6", "train.save_every=0"],
            args.work_dir / f"train-{precision}.log", 900)
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        warm = steps[1:] or steps                        # the first step includes compilation and warm-up
        result[precision] = {"steps": len(steps), "final_loss": steps[-1]["loss"],
                             "tokens_per_s": sorted(s["tokens_per_s"] for s in warm)[len(warm) // 2]}
    return result


def stage_sglang(args: argparse.Namespace) -> dict[str, Any]:
    cuda()
    python = args.sglang_python
    if not python or subprocess.run([python, "-c", "import sglang"], capture_output=True).returncode:
        raise Skip(f"no interpreter with sglang ({python or 'pass --sglang-python'}; make gpu-check installs one)")
    out = args.work_dir / "sglang.json"
    run([sys.executable, str(ROOT / "scripts" / "sglang_serve_check.py"), "--model", args.sglang_model,
         "--sglang-python", python, "--work-dir", str(args.work_dir / "sglang"), "--json", str(out)],
        args.work_dir / "sglang.log", 1800)
    report = json.loads(out.read_text())
    report.pop("provenance", None)
    return {"ok": bool(report.get("ok")), **report}


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "parity_fp32": stage_parity_fp32, "bf16": stage_bf16, "quant_kernels": stage_quant_kernels,
    "bench": stage_bench, "train": stage_train, "sglang": stage_sglang,
}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="report JSON (default docs/perf/gpu-<device>.json)")
    ap.add_argument("--work-dir", type=Path, default=ROOT / "build" / "gpu-check")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--quick", action="store_true", help="one fixture case per model (what the CPU test runs)")
    ap.add_argument("--sglang-python", default=os.environ.get("SGLANG_PY"), help="interpreter with sglang installed")
    ap.add_argument("--sglang-model", default="Efficient-Large-Model/NVILA-Lite-2B")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.stages.split(",")) - set(STAGES))
    if unknown:
        ap.error(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": device_name(), "stages": {}}
    for name in (s for s in STAGES if s in args.stages.split(",")):
        t0 = time.perf_counter()
        try:
            result = RUNNERS[name](args)
            entry = {"status": "ok" if result.pop("ok") else "failed", **result}
        except Skip as e:
            entry = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # a stage's crash is its failure; the other stages still run
            entry = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["stages"][name] = entry
        print(f"{name:14s} {entry['status']:8s} {entry['seconds']:7.1f} s  {entry.get('reason', '')}".rstrip(),
              flush=True)
    from nvila.base.files import write_json
    from nvila.base.provenance import provenance

    out = args.out or ROOT / "docs" / "perf" / f"gpu-{report['device']}.json"
    write_json(out, {**report, "provenance": provenance(stages=args.stages, quick=args.quick)})
    print(f"report: {out}")
    return 1 if any(e["status"] == "failed" for e in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
