"""CPU fast path: kernels chosen by measurement on AVX512-BF16 machines (see README, Performance).

Two swaps, applied by :func:`nvila.load` for bf16 on CPU: the vision tower's attention runs as bf16
GEMMs (:func:`shifted_bf16_attention`), and on CPUs with AMX the LLM's linears take a matrix-vector
kernel for single-row (decode) products.

Measured on 2-core machines with bf16 weights larger than the caches (LLM shapes of NVILA-Lite-2B): on
an AMX CPU ``F.linear`` with one input row streams 17-21 GB/s of weights, ``torch.mv`` 26-28 GB/s; on an
AVX512-BF16 CPU without AMX it is the other way round (1 x 1536 -> 151,936, the tied LM head: ``F.linear``
29.7 GB/s, ``torch.mv`` 23.2; 1 x 1536 -> 8960: 30.1 vs 19.8). With two or more rows ``F.linear`` wins
everywhere. Decoding one sequence is all single-row products, so on AMX CPUs
(:func:`decode_kernel_wins`) the LLM's linears are swapped for :class:`DecodeLinear`, which takes the
matrix-vector kernel for one row and ``F.linear`` otherwise. Parameter names and values are unchanged
(a module swap, not a conversion).
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


def decode_kernel_wins() -> bool:
    """True where ``torch.mv`` outstreams ``F.linear`` for one bf16 row: measured on AMX CPUs (see above)."""
    return "amx_bf16" in cpu_flags()


def cpu_has_int8_dot() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


# ---- vision attention ------------------------------------------------------------------------------
VISION_ATTENTION = "nvila_cpu_bf16"   # the name it is registered under in transformers' AttentionInterface
SHIFTED_MIN_TOKENS = 512              # shorter sequences: SDPA (measured faster at 257 tokens, slower at 1024)
SCORE_BYTES = 4 << 20                 # bf16 score block per GEMM call (1024 x 1024 tiles: 2 heads; 1 and 4 were slower)


def shifted_bf16_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """Unmasked attention of bf16 (B, H, T, D) tensors on CPU as bf16 GEMMs, a few heads at a time; (B, T, H, D) out.

    torch's CPU flash kernel computes a ViT's attention at float32 speed (a 448 SigLIP tile, 16 x 1024 x 72:
    28-29 ms, the same in float32), while a bf16 GEMM runs ~4x faster here. A bf16 GEMM rounds its output to
    bf16, though: scores s of size ~20 would carry errors of ~0.05 and the softmax weights 5 % errors. So
    each head takes two GEMMs on inputs widened by one column: the first gives the row maxima m, the
    second computes s - m inside the GEMM (query column -m, key column 1) before the output is rounded,
    which leaves the largest weights, the ones that matter, accurate to bf16 precision. The probabilities
    are bf16 in the second product, as in GPU flash attention. Measured on that tile: 17 ms, relative
    error 0.26-0.44 % (float64 reference; flash in bf16: 0.18-0.23 %; the same GEMMs without the shift: 2 %).

    Anything else (a mask, causal, dropout, gradients, other dtypes or devices, CPUs without native bf16,
    fewer than :data:`SHIFTED_MIN_TOKENS` queries) goes to transformers' SDPA function: for a DINOv2-S tile
    (6 x 257 x 64) the per-head calls cost more than they save (3.2 ms vs 3.0).
    """
    b, h, t, d = query.shape
    plain = (attention_mask is not None or is_causal or (dropout > 0.0 and module.training)
             or query.device.type != "cpu" or query.dtype != torch.bfloat16 or not cpu_has_native_bf16()
             or (torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)))
             or key.shape[1] != h or t < SHIFTED_MIN_TOKENS)
    if plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = d**-0.5 if scaling is None else scaling
    s_len = key.shape[2]
    group = max(1, SCORE_BYTES // (t * s_len * 2))                      # heads per call: scores stay in cache
    out = query.new_empty(b, t, h, d)                                    # (B, T, H, D), what the caller reshapes
    qa = query.new_zeros(b, h, t, d + 1)                                 # [q, -m]
    qa[..., :d] = query
    ka = key.new_ones(b, h, s_len, d + 1)                                # [k, 1]
    ka[..., :d] = key
    for i in range(b):
        for j in range(0, h, group):
            qg, kt = qa[i, j : j + group], ka[i, j : j + group].transpose(1, 2)
            scores = torch.bmm(qg, kt)                                   # (G, T, S) q.k
            torch.amax(scores, dim=-1, out=qg[..., d])
            qg[..., d].neg_()
            torch.bmm(qg, kt, out=scores)                                # q.k - m, rounded after the shift
            probs = torch.softmax(scores.mul_(scale), dim=-1)
            out[i, :, j : j + group] = torch.bmm(probs, value[i, j : j + group]).transpose(0, 1)
    return out, None


def use_fast_vision_attention(vision_model: nn.Module) -> None:
    """Run the attention of a transformers vision model (SigLIP, DINOv2) through :func:`shifted_bf16_attention`.

    Registered with transformers' ``AttentionInterface`` and selected on the model's config, the way any
    attention backend is chosen; the weights are untouched.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VISION_ATTENTION, shifted_bf16_attention)
    vision_model.set_attn_implementation(VISION_ATTENTION)
