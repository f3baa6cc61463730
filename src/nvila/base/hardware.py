"""What this machine computes well: CPU features, devices and dtypes, and the kernel choices that follow.

The one place nvila looks at the hardware. Every rule keys on the features read here, so a rule can be
tested for any CPU class by faking :func:`cpu_flags`. Measurements behind the rules: ``nvila bench-kernels``
(docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nvila.base.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ``NVILA_EMULATE_CPU=avx2`` on a CPU with AVX-512 approximates an AVX2-only CPU, for measurements: nvila's
# rules then see no AVX-512/VNNI/AMX flags, and torch's kernel providers must be capped to AVX2 by these
# variables, which they read when the process starts (ATen's dispatch, oneDNN, FBGEMM; MKL ignores its own
# cap on AMD CPUs, where it runs an AVX2-class path anyway). Memory bandwidth, caches and clocks stay those
# of the real CPU, and helpers that read cpuinfo directly still see AVX-512: compare ratios, not times.
EMULATE_ENV = "NVILA_EMULATE_CPU"
EMULATION_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                           "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}}
_ABOVE_AVX2 = ("avx512", "amx", "avx_vnni", "avx10")


def emulated_cpu() -> str | None:
    """The CPU class being emulated (``NVILA_EMULATE_CPU``), None when running as the hardware is.

    Raises ConfigError for an unknown class or when torch's kernel providers were not capped to match."""
    want = os.environ.get(EMULATE_ENV, "").strip().lower()
    if not want:
        return None
    if want not in EMULATION_CAPS:
        raise ConfigError(f"{EMULATE_ENV}={want!r}: only {sorted(EMULATION_CAPS)} can be emulated")
    caps = EMULATION_CAPS[want]
    wrong = {k: v for k, v in caps.items() if os.environ.get(k, "").lower() != v.lower()}
    if wrong:
        prefix = " ".join(f"{k}={v}" for k, v in caps.items())
        raise ConfigError(f"{EMULATE_ENV}={want} needs torch's kernels capped too, from the start of the process: "
                          f"run with `{prefix} {EMULATE_ENV}={want} ...` (missing or different: {sorted(wrong)})")
    return want


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read), read once per process:
    quantized linears ask on every forward call. Under :func:`emulated_cpu` the flags above it are dropped."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    flags = frozenset(line.partition(":")[2].split())
    if emulated_cpu() == "avx2":
        flags = frozenset(f for f in flags if not f.startswith(_ABOVE_AVX2))
    return flags


def cpu_class() -> str:
    """The CPU class kernel rules are chosen for: ``amx``, ``avx512_bf16``, ``avx2``, ``arm`` or ``generic``."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    if flags & {"asimd", "sve"}:
        return "arm"
    return "generic"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16, AMX, or ARM's BF16 extension)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) or (cpu_class() == "arm" and "bf16" in cpu_flags())


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


@dataclass(frozen=True)
class CpuRules:
    """What runs where on one CPU class: the choices measured with ``nvila bench-kernels`` (``source``).

    ``fp32_math_on_16bit_weights``: ``dtype="auto"`` keeps weights stored in bf16 in 16 bits and computes in
    float32 (lossless against the float32 reference; :mod:`nvila.model.mixed`) instead of computing in bf16.
    ``packed_fp16_max_rows``: rows up to which a 16-bit linear runs FBGEMM's fp16 GEMM (above: unpack to
    float32 and ``F.linear``). ``decode_mv``: single-row bf16 products through ``torch.mv``.
    ``bf16_quant_max_rows``: rows up to which a weight-only quantized linear with bf16 activations takes the
    fused op. ``int8_gemm``: the W8A8 kernel (:data:`INT8_GEMMS`). ``weight_only_bf16_rows``: float32 rows up
    to which a weight-only quantized linear (W8A16/W4A16) rounds its input to bf16 for the fused op, where
    the op's float32 form is slower than a float32 GEMM (0: never). ``quant_llm``: the LLM scheme
    ``nvila quantize`` picks by default (``--llm auto``): the fastest decode that passes the accuracy guard.
    """

    auto_bf16: bool
    fp32_math_on_16bit_weights: bool
    packed_fp16_max_rows: int
    decode_mv: bool
    bf16_quant_max_rows: int
    int8_gemm: str
    weight_only_bf16_rows: int
    quant_llm: str
    source: str


# How a W8A8 linear multiplies on a CPU (nvila.model.kernels):
#   int_mm     torch._int_mm (oneDNN, VNNI/AMX): int8 x int8 -> int32, activations per token, symmetric 8-bit
#   fbgemm     FBGEMM's dynamic int8 linear (quantized::linear_dynamic): activations per call, asymmetric,
#              7-bit (reduce_range: exact on CPUs whose int8 pair sums go through int16, i.e. without VNNI)
#   reference  dequantized codes through a float GEMM (per token, symmetric 8-bit): no fast int8 op known
INT8_GEMMS = ("int_mm", "fbgemm", "reference")


UNLIMITED = 1 << 62
RULES: dict[str, CpuRules] = {
    # torch.mv outstreams F.linear for one bf16 row only here (earlier AMX measurements; no kernels JSON yet)
    "amx": CpuRules(True, False, UNLIMITED, True, 16, "int_mm", 0, "w4a16",
                    "no kernels-amx.json in the repository yet"),
    "avx512_bf16": CpuRules(True, False, UNLIMITED, False, 16, "int_mm", 0, "w4a16",
                            "docs/perf/kernels-avx512_bf16.json"),
    # bf16 GEMMs are emulated (slower than fp32): float32 math; FBGEMM's fp16 GEMM reads half the bytes of
    # fp32 at every row count. torch._int_mm has no fast path without VNNI (2 GOP/s measured on a real AVX2
    # CPU) while FBGEMM's int8 linear is 2-17x float32; the weight-only ops are 2x slower than float32 with
    # float32 rows, 8-9x faster with bf16 rows (decode). W8A8 decodes fastest: the LLM default.
    "avx2": CpuRules(False, True, UNLIMITED, False, 1, "fbgemm", 1, "w8a8", "docs/perf/kernels-avx2-emulated.json"),
    # no FBGEMM on ARM: bf16 where the CPU has it (ARMv8.6 BF16), else plain float32
    "arm": CpuRules(True, False, UNLIMITED, False, 1, "reference", 0, "w4a16", "unmeasured: no ARM machine available"),
    "generic": CpuRules(False, False, UNLIMITED, False, 1, "reference", 0, "w4a16", "the reference's float32 kernels"),
}


def cpu_rules() -> CpuRules:
    """The rules of this CPU's class (``auto_bf16`` on ARM only with the BF16 extension)."""
    rules = RULES[cpu_class()]
    if cpu_class() == "arm" and not cpu_has_native_bf16():
        return dataclasses.replace(rules, auto_bf16=False)
    return rules


def decode_kernel_wins() -> bool:
    """True where ``torch.mv`` outstreams ``F.linear`` for one bf16 row (AMX CPUs)."""
    return cpu_rules().decode_mv


@functools.cache
def _libc() -> object | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give memory freed by the process back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks of tens of MB (a model's weights) in the heap; when a model is converted layer by
    layer into another form, they would otherwise add up to the size of the replaced weights.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# ---- devices and dtypes ----------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; errors if CUDA is asked for but missing."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a valid device (cpu, cuda, cuda:N or auto)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/"auto" -> bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point type; use float32, bfloat16 or float16")
        return dtype
    if dtype in (None, "auto"):
        native = device.type == "cuda" or (device.type == "cpu" and cpu_rules().auto_bf16)
        return torch.bfloat16 if native else torch.float32
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


# ---- fused quantized kernels on CPU ----------------------------------------------------------------
# Largest row count for which a quantized linear takes torch's fused op instead of dequantize-then-matmul.
# Without native bf16 / int8 dot products the fused ops are matrix-vector kernels: one row only.
CPU_MAX_ROWS = {"w8a16": 1, "w4a16": 1, "w8a8": 1}
# W8A8 on CPUs with int8 dot products: the integer GEMM wins at every row count.
CPU_INT8_DOT_MAX_ROWS = 1 << 62


def cpu_max_rows(scheme: str, dtype: torch.dtype) -> int:
    """Rows up to which the fused CPU op runs a ``scheme`` layer with activations of ``dtype``
    (W8A8: ``torch._int_mm``, see :func:`cpu_int8_gemm` for the other int8 kernels)."""
    if scheme == "w8a8":
        return CPU_INT8_DOT_MAX_ROWS if cpu_int8_gemm() == "int_mm" else 0
    if dtype == torch.bfloat16 and cpu_has_native_bf16() and scheme != "w8a8":
        return cpu_rules().bf16_quant_max_rows
    return CPU_MAX_ROWS[scheme]


def cpu_int8_gemm() -> str:
    """The W8A8 kernel of this CPU (:data:`INT8_GEMMS`); ``int_mm`` needs int8 dot products, ``fbgemm`` FBGEMM."""
    choice = cpu_rules().int8_gemm
    if choice == "int_mm" and not cpu_has_int8_dot():
        return "reference"
    if choice == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        return "reference"
    return choice


# FP8 tensor cores (torch._scaled_mm): Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x).
FP8_MIN_CAPABILITY = (8, 9)


def fp8_device(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` computes FP8 GEMMs natively, the device described for messages)."""
    if device.type != "cuda":
        return False, str(device)
    capability = torch.cuda.get_device_capability(device)
    where = f"{device} ({torch.cuda.get_device_name(device)}, compute capability {capability[0]}.{capability[1]})"
    return capability >= FP8_MIN_CAPABILITY, where
