"""Fused integer kernels from torch, and the rule that decides when a quantized linear uses them.

Every quantized linear has a reference path (dequantize the weight, float matmul) that defines the scheme
and always works; a fused op is used only where it was measured to be faster and only for shapes it
accepts. Candidates in torch 2.13, each checked against the reference on the machine below:

    W8A16  aten._weight_int8pack_mm(x, q (N, K) int8, scale (N,))             matches (float rounding)
    W4A16  aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero)       matches (float rounding)
           packed = aten._convert_weight_to_int4pack_for_cpu(codes (N, K) int32, 1), an opaque tiled
           layout; needs N % 16 == 0 and group in {32, 64, 128, 256}; dequantizes (code - 8) * s + z
    W8A8   torch._int_mm(q_x (M, K) int8, q^T (K, N) int8) -> int32           exact
           onednn.qlinear_pointwise: WRONG on AVX2 CPUs without VNNI for full-range int8 weights
           (int16 pair sums saturate; errors up to ~20% of the output range here, exact only for
           7-bit weights), so it is not a candidate

Measured with the modules' own ``kernel()`` / ``reference()`` on the development machine (AMD EPYC,
AVX2, no AVX512/VNNI/native bf16), one thread (a training job held both cores; with two threads tiny
ops spent most of their time waiting for each other), float32 activations, ms, median of 3::

    rows x in x out           F.linear fp32   W8A16 kernel / ref   W8A8 kernel / ref   W4A16 kernel / ref
    1 x 2048 x 2048 (decode)      1.8             7.3 / 7.8            3.6 / 5.0           10.0 / 42.1
    64 x 1152 x 4304              18.1            526 / 27.5           271 / 24.1          708 / 67.7
    512 x 1152 x 4304 (ViT fc1)   104              -  / 92             -  / 103             -  / 169

On this CPU the fused ops are matrix-vector kernels: they win for one row (decode) and lose 10-25x as
soon as there are a few dozen rows. So the CPU rule (:data:`CPU_MAX_ROWS`) is: fused op for a single
row, reference otherwise. The W8A8 reference computes the integer product in a float32 matmul (exact
while sums stay below 2^24, float32 rounding beyond), so both paths agree. None of the schemes beats the
float32 ``F.linear`` for decoding here: on this CPU they save memory (int8 weights are half the size of
bf16 ones, 4-bit about a quarter), not time.
Machines with AVX512-VNNI/AMX may differ: re-measure before changing :data:`CPU_MAX_ROWS`.

They do. On an AVX512-BF16/VNNI AMD EPYC (one thread, the other core busy, ms, median), with *bf16*
activations: decode 1 x 1536 x 8960 F.linear bf16 7.2, W8A16 fused 1.8, W4A16 fused (g128) 0.47;
16 x 1536 x 8960 bf16 7.8, W8A16 15.0, W4A16 7.0; 1024 x 1152 x 4304 bf16 21.5-55.7, ``torch._int_mm``
10.7-33 (exact), but the whole eager W8A8 layer (per-token quantize, ``_int_mm``, dequantize) 0.8-1.2x
bf16 because quantizing a wide input is cache-unfriendly (a compiled quantize: 1.1 ms instead of 22 for
1024 x 4304). With *float32* activations every fused op is 5-40x slower than ``F.linear`` there. The
rule below uses them for the weight-only schemes (:data:`CPU_BF16_MAX_ROWS`).

W8A8 after quantizing activations in 256-row chunks (:func:`nvila.quant.linear.quantize_rows_int8`, 2-3 ms
for 1024 x 4304 instead of 25) and dequantizing in place, same machine, one thread, ms (kernel = per-token
quantize + ``torch._int_mm`` + dequantize; reference = the same codes multiplied in float32)::

    rows x in x out       F.linear fp32   F.linear bf16   reference   kernel
    1 x 1152 x 4304           1.05            0.56          1.45       0.29
    16 x 1152 x 4304          2.44            0.74          3.14       0.53
    64 x 1152 x 4304          15.3            1.77          8.13       1.10
    256 x 1152 x 4304         25.7            9.79          30.4       3.61
    1024 x 1152 x 4304        124             24.2          152        14.7 (bf16 input: 16.4)
    1024 x 4304 x 1152        118             39.2          123        15.1 (bf16 input: 27.3)

With int8 dot-product instructions (VNNI/AMX) the fused W8A8 path wins at every row count, against the
bf16 ``F.linear`` too (1.4-2.6x on ViT shapes), so :func:`cpu_max_rows` lifts its row limit there.

Then the passes around the GEMM were cut (same machine, two threads, whole SigLIP tower of NVILA-Lite-2B
on one 448 tile, 26 layers, medians of 5 alternating runs): dequantizing in row chunks straight into the
output (:func:`nvila.quant.linear.dequantize_rows`), applying fc2's input scale while quantizing, one
quantization shared by q, k and v, and fc1 -> GELU -> fc2 fused (:class:`nvila.quant.linear.W8A8MLP`)
took the quantized tower from 1.55 to 1.47-1.57 s (bf16: 1.82-1.90 s; 1.18x -> 1.22-1.25x). ``torch.aminmax``
for the per-token range was 10x slower than ``amax`` and ``amin`` (1.69 s for the tower). Then the float
work shared with the bf16 tower shrank (attention as bf16 GEMMs, 27 -> 17 ms a layer, and contiguous
tokens: :mod:`nvila.model.fast`, :mod:`nvila.model.vision`) and the fused MLP's GELU got cheaper
(:func:`nvila.quant.linear.gelu_tanh_`): 1.31-1.37x. What remains per layer: ``torch._int_mm`` 17.7 ms
(bf16 ``F.linear`` on the same shapes: ~40 ms), attention ~17 ms (bf16, not quantized),
quantize/dequantize/GELU passes ~6 ms, LayerNorms ~0.5 ms.

CUDA (code path only, no GPU was available to measure it): W4A16 uses the tinygemm kernel
``aten._weight_int4pack_mm`` (bfloat16 activations, compute capability >= 8.0), W8A8 uses ``torch._int_mm``
(cuBLASLt; needs M > 16 and K, N multiples of 8), W8A16 the reference.
"""

from __future__ import annotations

import torch

INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# Largest number of rows for which the fused CPU op is used, from the AVX2 table above.
CPU_MAX_ROWS = {"w8a16": 1, "w4a16": 1, "w8a8": 1}
# The same with bf16 activations on CPUs with native bf16 (AVX512-BF16/AMX), from the second table: the
# weight-only ops beat dequantize-then-matmul up to at least 16 rows there (measured at 1 and 16 rows).
CPU_BF16_MAX_ROWS = {"w8a16": 16, "w4a16": 16, "w8a8": 1}


# W8A8 on CPUs with int8 dot-product instructions (the table above): the integer GEMM for any number of rows.
CPU_INT8_DOT_MAX_ROWS = 1 << 62


def cpu_max_rows(scheme: str, dtype: torch.dtype) -> int:
    """Rows up to which the fused CPU op runs a ``scheme`` layer with activations of ``dtype``."""
    from nvila.model.fast import cpu_has_int8_dot, cpu_has_native_bf16

    if scheme == "w8a8" and cpu_has_int8_dot():
        return CPU_INT8_DOT_MAX_ROWS
    if dtype == torch.bfloat16 and cpu_has_native_bf16():
        return CPU_BF16_MAX_ROWS[scheme]
    return CPU_MAX_ROWS[scheme]


def use_kernel(scheme: str, x: torch.Tensor, rows: int, out_features: int, in_features: int,
               group_size: int | None = None) -> bool:
    """True when the fused op should run ``x`` (``rows`` rows) for this layer shape; False: reference."""
    if x.device.type == "cpu":
        if rows > cpu_max_rows(scheme, x.dtype):
            return False
        if scheme == "w4a16":
            return out_features % 16 == 0 and group_size in INT4_KERNEL_GROUPS
        return True
    if x.device.type == "cuda":
        if scheme == "w4a16":
            return cuda_int4_ok(x, out_features, in_features, group_size)
        if scheme == "w8a8":
            return rows > 16 and in_features % 8 == 0 and out_features % 8 == 0
    return False


def cuda_int4_ok(x: torch.Tensor, out_features: int, padded_in: int, group_size: int | None) -> bool:
    """Shape/dtype/device limits of the CUDA tinygemm W4A16 kernel."""
    return (x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
            and out_features % 8 == 0 and group_size in INT4_KERNEL_GROUPS and inner_k_tiles(padded_in) > 0)


def inner_k_tiles(padded_in: int) -> int:
    """The tinygemm ``innerKTiles`` for an input width (K must be a multiple of 16 x tiles); 0: none fits."""
    return next((t for t in (8, 4, 2) if padded_in % (16 * t) == 0), 0)


def int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, K) float @ ((N, K) int8 * (N,) scale)^T -> (M, N) in x's dtype."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, scale.to(x.dtype))


def int4_pack(codes: torch.Tensor, packed: torch.Tensor, device: torch.device, padded_in: int) -> torch.Tensor:
    """The fused op's weight layout: from (N, Kp) codes in [0, 15] (CPU) or the stored bytes (CUDA)."""
    if device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), inner_k_tiles(padded_in))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def int4_scale_zero(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, G) scales and integer zero points -> the fused op's (G, N, 2) [scale, offset] table.

    Our codes dequantize as (q - zero) * scale; the op computes (q - 8) * scale + offset, so
    offset = (8 - zero) * scale.
    """
    s = scale.float()
    offset = (8 - zero.float()) * s
    return torch.stack([s, offset], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_weight_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_zero: torch.Tensor) -> torch.Tensor:
    """(M, Kp) float @ dequantized (N, Kp) 4-bit weight^T -> (M, N)."""
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_zero)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zero)


def int8_int8_mm(qx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (N, K) int8^T -> (M, N) int32, exact."""
    return torch._int_mm(qx.contiguous(), weight.t())
