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
           K and N multiples of 8); on CPUs without int8 dot products (AVX2) FBGEMM's dynamic int8 linear
           (``quantized::linear_dynamic``) instead, on rows scaled to the same peak so that its one scale per
           call acts per token: 7-bit codes (:func:`fbgemm_int8_reference` is its definition)

oneDNN's qlinear is not used: on AVX2 CPUs without VNNI its int16 pair sums saturate for full-range int8
weights (wrong results, not only slow).
"""

from __future__ import annotations

import torch

from nvila.base.hardware import cpu_int8_gemm, cpu_max_rows, cpu_rules
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


def bf16_rows_for_kernel(scheme: str, x: torch.Tensor, rows: int) -> bool:
    """True when a weight-only layer should round float32 ``x`` to bf16 for its fused op: on CPUs where that
    op's float32 form is slower than a float32 GEMM while its bf16 form is several times faster (AVX2
    decode, :attr:`~nvila.base.hardware.CpuRules.weight_only_bf16_rows`). The result moves by the bf16
    rounding of the input and output rows."""
    return (scheme != "w8a8" and x.device.type == "cpu" and x.dtype == torch.float32
            and rows <= cpu_rules().weight_only_bf16_rows)


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


# ---- FBGEMM's dynamic int8 linear (CPUs without int8 dot products) --------------------------------------
# 7-bit activation codes: AVX2's u8 x s8 pair sums go through int16 and saturate for 8-bit codes; with codes
# below 128 and weights in [-127, 127] they are exact (FBGEMM's ``reduce_range``).
FBGEMM_REDUCE_RANGE = True


def use_fbgemm(x: torch.Tensor) -> bool:
    """True when a W8A8 linear runs ``x`` through FBGEMM's int8 linear (the CPU rule, :func:`cpu_int8_gemm`)."""
    return x.device.type == "cpu" and cpu_int8_gemm() == "fbgemm"


def fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FBGEMM's packed form of (N, K) int8 codes with one float scale per output channel (no bias)."""
    import warnings

    with warnings.catch_warnings():        # quantized tensors are deprecated in torch; FBGEMM still takes them
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight.contiguous(), scale.double(),
                                                     torch.zeros(weight.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, None)


def fbgemm_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The (N, K) int8 codes of :func:`fbgemm_pack`, exactly."""
    return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def fbgemm_int8_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 @ dequantized codes^T -> (M, N) float32, x quantized as :func:`fbgemm_int8_reference` says."""
    peak = _row_peaks(x)
    return torch.ops.quantized.linear_dynamic((x / peak).contiguous(), packed, FBGEMM_REDUCE_RANGE).mul_(peak)


def fbgemm_int8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What :func:`fbgemm_int8_linear` computes, written out.

    FBGEMM quantizes a call's whole input with one scale and zero point. To make that scale per token, every
    row is first divided by its largest magnitude r (the product is linear in each row, so the output row is
    multiplied by r again). The normalized rows u = x / r are quantized with the scale s and zero point z
    torch's ``_choose_qparams_per_tensor`` picks for their min and max (0 included) over [0, 127]: codes
    round(u * (1 / s) + z) (one fused multiply-add in float32; round half to even; clamped to uint8 only, so
    a half-way peak may give 128, which the int16 pair sums still hold); integer sums (codes - z) . w are
    exact (float64 here), then sum * (s * scale[n]) * r in float32. In effect: symmetric 7-bit codes per
    token."""
    x = x.float()
    peak = _row_peaks(x)
    u = x / peak
    s, z = torch._choose_qparams_per_tensor(u, FBGEMM_REDUCE_RANGE)
    inverse = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)
    # u * inverse + z rounded once to float32 (FBGEMM's fused multiply-add; exact in float64), then to integer
    codes = torch.clamp(torch.round((u.double() * inverse.double() + z).float()), 0, 255)
    acc = (codes.double() - z) @ weight.double().t()
    return (acc.float() * (torch.tensor(s, dtype=torch.float32) * scale.float())).mul_(peak)


def _row_peaks(x: torch.Tensor) -> torch.Tensor:
    """(M, 1) largest magnitude of each row (1 for an all-zero row)."""
    high, low = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
    peak = torch.maximum(high, low.neg())
    return torch.where(peak > 0, peak, torch.ones_like(peak))
