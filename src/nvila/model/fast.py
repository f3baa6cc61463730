"""CPU fast path: kernels chosen by measurement on AVX512-BF16 machines (see README, Performance).

Measured on the 2-core reference machine with bf16 weights larger than the caches (LLM shapes of
NVILA-Lite-2B): ``F.linear`` with one input row streams 17-21 GB/s of weights, ``torch.mv`` 26-28 GB/s;
with two or more rows ``F.linear`` wins again. Decoding one sequence is all single-row products, so the
LLM's linears are swapped for :class:`DecodeLinear`, which takes the matrix-vector kernel for one row
and ``F.linear`` otherwise. Parameter names and values are unchanged (a module swap, not a conversion).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class DecodeLinear(nn.Linear):
    """``nn.Linear`` that uses ``torch.mv`` for a single bf16 row on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            y = torch.mv(self.weight, x.reshape(-1))                 # (out,)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_decode_linear(module: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` inside ``module`` for :class:`DecodeLinear` in place.

    The swapped modules keep their Parameters (and so tied weights stay tied). Returns the count.
    """
    count = 0
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = DecodeLinear  # same fields, different forward: parameters are untouched
            count += 1
    return count


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_head(llm: nn.Module) -> None:
    """Make the LM head's input contiguous before its matmul.

    Generation asks the LLM for the last position's logits only, and transformers takes that position as
    a strided view of the hidden states; CPU GEMMs on such a view of a batch are pathologically slow
    (measured: 9 x 576 -> 49,155 in bf16 842 ms strided vs 4.5 ms contiguous; float32 100 vs 17 ms).
    """
    head = llm.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read), read once per process:
    quantized linears ask on every forward call."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 GEMMs beat fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
