"""Fused integer kernels from torch, and when a quantized linear uses them.

Every quantized linear has a reference path (dequantize the weight, float matmul) that defines the scheme
and works everywhere; a fused op runs only for shapes it accepts and where it was measured faster
(:func:`nvila.base.hardware.cpu_max_rows` on CPUs; measured with ``nvila bench-kernels``, docs/performance.md).
The ops:

    W8A16  aten._weight_int8pack_mm(x, q (N, K) int8, scale (N,))
    W4A16  aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero) on CPU, the tinygemm kernel
           aten._weight_int4pack_mm on CUDA (bf16 activations, sm80+); packed is an opaque tiled layout
           that dequantizes (code - 8) * s + z and needs N % 16 == 0 and a group in INT4_KERNEL_GROUPS
    W8A8   torch._int_mm(q_x (M, K) int8, q^T (K, N) int8) -> int32, exact (cuBLASLt on CUDA: M > 16,
           K and N multiples of 8)

oneDNN's qlinear is not used: on AVX2 CPUs without VNNI its int16 pair sums saturate for full-range int8
weights (wrong results, not only slow).
"""

from __future__ import annotations

import torch

from nvila.base.hardware import cpu_max_rows
from nvila.formats.quant import GROUP_SIZES as INT4_KERNEL_GROUPS


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
