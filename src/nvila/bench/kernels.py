"""Kernel benchmark (``nvila bench-kernels``): every linear path nvila can take, on NVILA-Lite-2B's shapes.

Each path runs the same linear (random weights) and reports the median time of ``runs`` calls after a
warm-up, on this machine and thread count. The kernel rules of :mod:`nvila.base.hardware` come from these
tables; the JSON records the CPU it ran on, so a rule can cite the run it was measured with.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from nvila.base.files import write_json
from nvila.base.hardware import UNLIMITED
from nvila.base.provenance import provenance
from nvila.model.mixed import PackedFp16Linear, fbgemm_fp16_available
from nvila.model.quantized import W4A16Linear, W8A8Linear, W8A16Linear

# (rows, in, out, what): decode rows of the LLM, a 152-token prefill, one 448 SigLIP tile's MLP
SHAPES: tuple[tuple[int, int, int, str], ...] = (
    (1, 1536, 1536, "decode q/o_proj"), (1, 1536, 8960, "decode up_proj"), (1, 8960, 1536, "decode down_proj"),
    (1, 1536, 151936, "decode LM head"), (16, 1536, 8960, "16 rows up_proj"), (152, 1536, 8960, "prefill up_proj"),
    (1024, 1152, 4304, "ViT fc1"), (1024, 4304, 1152, "ViT fc2"),
)


@dataclass
class Path:
    """One way to compute a linear: built once per shape (``make``), then timed (the returned callable)."""

    name: str
    make: Callable[[nn.Linear, torch.Tensor], Callable[[], torch.Tensor] | None]   # None: not applicable


def _float(dtype: torch.dtype, mv: bool = False) -> Callable[[nn.Linear, torch.Tensor], Any]:
    def make(lin: nn.Linear, x: torch.Tensor) -> Any:
        w, xx = lin.weight.to(dtype), x.to(dtype)
        if mv:
            return (lambda: torch.mv(w, xx.reshape(-1))) if x.shape[0] == 1 else None
        return lambda: F.linear(xx, w)
    return make


def _packed_fp16(lin: nn.Linear, x: torch.Tensor) -> Any:
    if not fbgemm_fp16_available():
        return None
    m = PackedFp16Linear(_bf16_copy(lin), UNLIMITED)
    return lambda: m(x)


def _bf16_copy(lin: nn.Linear) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=False)
    out.weight.data = lin.weight.detach().bfloat16()
    return out


def _upcast(lin: nn.Linear, x: torch.Tensor) -> Any:
    w = lin.weight.detach().bfloat16()
    return lambda: F.linear(x, w.float())


def _onednn(lin: nn.Linear, x: torch.Tensor) -> Any:
    """oneDNN's float32 linear on a weight reordered once into its blocked layout (what torch.compile's
    freezing uses on CPU)."""
    w = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None)
    return lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _mkl_packed(lin: nn.Linear, x: torch.Tensor) -> Any:
    """MKL's packed-weight sgemm (``cblas_sgemm_pack``), packed for this row count."""
    w = lin.weight.detach()
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, x.shape[0])
    return lambda: torch.ops.mkl._mkl_linear(x, packed, w, None, x.shape[0])


def _one_thread(lin: nn.Linear, x: torch.Tensor) -> Any:
    def run() -> torch.Tensor:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return F.linear(x, lin.weight)
        finally:
            torch.set_num_threads(threads)
    return run


def _quant(cls: type, path: str, dtype: torch.dtype) -> Callable[[nn.Linear, torch.Tensor], Any]:
    def make(lin: nn.Linear, x: torch.Tensor) -> Any:
        m = cls.from_float(lin, group_size=128) if cls is W4A16Linear else cls.from_float(lin)
        xx = x.to(dtype)
        if path == "kernel" and cls is W4A16Linear and lin.out_features % 16:
            return None
        if path == "fbgemm":
            return (lambda: m.fbgemm(xx)) if "fbgemm" in torch.backends.quantized.supported_engines else None
        return (lambda: m.kernel(xx)) if path == "kernel" else (lambda: m.reference(xx))
    return make


PATHS: tuple[Path, ...] = (
    Path("fp32 F.linear", _float(torch.float32)),
    Path("fp32 F.linear, 1 thread", _one_thread),
    Path("fp32 oneDNN, reordered weight", _onednn),
    Path("fp32 MKL, packed weight", _mkl_packed),
    Path("bf16 F.linear", _float(torch.bfloat16)),
    Path("bf16 torch.mv", _float(torch.bfloat16, mv=True)),
    Path("bf16 w, fp32 x: FBGEMM fp16", _packed_fp16),
    Path("bf16 w, fp32 x: upcast + F.linear", _upcast),
    Path("W8A16 fused, bf16 x", _quant(W8A16Linear, "kernel", torch.bfloat16)),
    Path("W8A16 fused, fp32 x", _quant(W8A16Linear, "kernel", torch.float32)),
    Path("W8A16 reference, bf16 x", _quant(W8A16Linear, "reference", torch.bfloat16)),
    Path("W4A16 fused g128, bf16 x", _quant(W4A16Linear, "kernel", torch.bfloat16)),
    Path("W4A16 fused g128, fp32 x", _quant(W4A16Linear, "kernel", torch.float32)),
    Path("W4A16 reference g128, bf16 x", _quant(W4A16Linear, "reference", torch.bfloat16)),
    Path("W8A8 fused (_int_mm), fp32 x", _quant(W8A8Linear, "kernel", torch.float32)),
    Path("W8A8 FBGEMM int8, fp32 x", _quant(W8A8Linear, "fbgemm", torch.float32)),
    Path("W8A8 reference, fp32 x", _quant(W8A8Linear, "reference", torch.float32)),
)


# A fast kernel is repeated for at least this long (up to MAX_CALLS calls): a sub-millisecond decode row timed
# only ``runs`` times moved its median by 25-100 % between runs on a shared 2-core VM.
MIN_TIME_S = 0.5
MAX_CALLS = 500


def _median_ms(fn: Callable[[], torch.Tensor], runs: int, budget_s: float) -> float:
    """Median of at least ``runs`` timed calls after one warm-up call, repeated for :data:`MIN_TIME_S` when that
    takes more; no new call starts after ``budget_s`` once two are timed."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if len(times) >= 2 and elapsed >= budget_s:
            break
        if len(times) >= runs and (elapsed >= MIN_TIME_S or len(times) >= MAX_CALLS):
            break
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


@torch.inference_mode()
def measure(shapes: tuple[tuple[int, int, int, str], ...] | None = None, runs: int = 5,
            budget_s: float = 10.0) -> list[dict[str, Any]]:
    """One row per shape (default :data:`SHAPES`): the median milliseconds of every applicable path
    (``budget_s`` caps how long a slow path is repeated)."""
    rows = []
    for m, k, n, what in shapes or SHAPES:
        gen = torch.Generator().manual_seed(0)
        lin = nn.Linear(k, n, bias=False)
        lin.weight.data = torch.randn(n, k, generator=gen) * k**-0.5
        x = torch.randn(m, k, generator=gen)
        times = {}
        for path in PATHS:
            fn = path.make(lin, x)
            if fn is not None:
                times[path.name] = _median_ms(fn, runs, budget_s)
        rows.append({"rows": m, "in": k, "out": n, "what": what, "ms": times,
                     "gflops": {name: gflops(m, k, n, ms) for name, ms in times.items()}})
    return rows


def gflops(rows: int, k: int, n: int, ms: float) -> float:
    """Multiply-adds of a (rows, k) x (k, n) product counted as 2 operations each, per second, in billions."""
    return 2 * rows * k * n / (ms * 1e6)


# The second table (GFLOP/s; int8: GOP/s): the float32 GEMM backends torch ships, and what nvila's rules pick
# instead of them on some CPU class (bf16, FBGEMM fp16 on 16-bit weights, the two int8 GEMMs).
BACKENDS = ("fp32 F.linear", "fp32 F.linear, 1 thread", "fp32 oneDNN, reordered weight", "fp32 MKL, packed weight",
            "bf16 F.linear", "bf16 w, fp32 x: FBGEMM fp16", "W8A8 fused (_int_mm), fp32 x", "W8A8 FBGEMM int8, fp32 x")


def print_table(rows: list[dict[str, Any]]) -> None:
    """Paths down, shapes across (rows x in x out): milliseconds of every path, then the throughput of the
    float32 GEMM backends and of the rules' alternatives (:data:`BACKENDS`)."""
    from rich.console import Console
    from rich.table import Table

    threads = torch.get_num_threads()
    for title, key, names in ((f"linear kernels, ms (median; {threads} threads)", "ms", [p.name for p in PATHS]),
                              (f"GEMM throughput, GFLOP/s (int8: GOP/s; {threads} threads)", "gflops", BACKENDS)):
        table = Table(title=title)
        table.add_column("path")
        for r in rows:
            table.add_column(f"{r['rows']}x{r['in']}x{r['out']}\n{r['what']}", justify="right")
        for name in names:
            table.add_row(name, *[f"{r[key][name]:.3g}" if name in r[key] else "-" for r in rows])
        Console(width=200).print(table)


def run(json_path: str | None = None, runs: int = 5) -> list[dict[str, Any]]:
    rows = measure(runs=runs)
    print_table(rows)
    if json_path:
        write_json(json_path, {"kernels": rows, "provenance": provenance(runs=runs)})
    return rows
