"""Quantized linear layers: module swaps for ``nn.Linear`` whose tensors are what the checkpoint stores.

    W8A16Linear  weight int8 (N, K), weight_scale (N,)             y = x (q * s)^T + b
    W4A16Linear  weight uint8 (N, Kp / 2): two 4-bit codes a byte,  y = x ((q - z) * s)^T + b, with s and z
                 weight_scale (N, G), weight_zero uint8 (N, G)        per group of ``group_size`` input channels
    W8A8Linear   weight int8 (N, K), weight_scale (N,)             y = (q_x q^T) * s * s_x + b, q_x the int8
                                                                      codes of x, one scale per token (dynamic)

(N = out_features, K = in_features, G = Kp / group_size groups.) All keep ``bias`` under its name, and
any may hold ``input_scale`` (K,): a per-input-channel factor multiplied into x first. It carries the
SmoothQuant/AWQ scale of a linear whose input comes from an op the scale could not be folded into
(see :mod:`nvila.quant.calibrate`).

Weights are symmetric int8 per output channel (codes in [-127, 127]) or asymmetric 4-bit per group with
integer zero points (so 0.0 is exact). When K is not a multiple of ``group_size`` the last group is
shorter: it is stored zero-padded to a whole group (Kp = K rounded up), the padding dequantizes to 0 and
the group's range is computed over real columns only, so nothing changes numerically. The 4-bit bytes
keep the even column in the high nibble (the layout CUDA's tinygemm packer reads).

``reference(x)`` dequantizes and multiplies (the definition; every device, every shape); ``kernel(x)``
runs torch's fused op; ``forward`` picks one with :func:`nvila.model.kernels.use_kernel`.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from nvila.base.errors import ConfigError
from nvila.formats.quant import check_group_size
from nvila.model import kernels

EPS = 1e-8  # smallest quantization step: an all-zero row/group quantizes to codes 0 with this scale


# ---- quantization math ---------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: (..., K) -> codes (..., K) int8 in [-127, 127], scales (..., 1) float32."""
    w = w.float()
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) / 127
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_rows_int8(x: torch.Tensor, chunk: int = 256,
                       scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) :func:`quantize_int8` of (M, K) activations, bit-identical to it, in row chunks.

    One float32 chunk at a time, updated in place: the whole-tensor version's four (M, K) float32
    temporaries cost more than the int8 GEMM that follows (256-row chunks measured best). ``scale`` (K,):
    a per-channel factor applied first, in float32, as the chunk is copied (the same as quantizing
    ``x.float() * scale``, without a separate pass over the input).
    """
    m = x.shape[0]
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(m, 1, device=x.device)
    factor = scale.to(device=x.device, dtype=torch.float32) if scale is not None else None
    buf = torch.empty(min(chunk, m), x.shape[1], device=x.device)      # the caller's x stays as it is
    for start in range(0, m, chunk):
        rows = buf[: min(chunk, m - start)]
        if factor is not None:
            torch.mul(x[start : start + chunk], factor, out=rows)
        else:
            rows.copy_(x[start : start + chunk])
        _quantize_chunk(rows, codes[start : start + chunk], scales[start : start + chunk])
    return codes, scales


def _quantize_chunk(rows: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Quantize float32 ``rows`` (r, K) per row into ``codes`` (r, K) int8 and ``scales`` (r, 1); rows is used up."""
    # max |x| from amax and amin: no |x| copy, and torch.aminmax is much slower on CPU
    high, low = rows.amax(dim=-1, keepdim=True), rows.amin(dim=-1, keepdim=True)
    step = torch.maximum(high, low.neg_()).clamp_(min=EPS).div_(127)
    scales.copy_(step)
    codes.copy_(rows.div_(step).round_().clamp_(-127, 127))


def dequantize_rows(acc: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype, chunk: int = 128) -> torch.Tensor:
    """(M, N) integer sums (int32, or exact float32) -> acc * col_scale * row_scale + bias in ``dtype``.

    Computed in float32 a few rows at a time and rounded to ``dtype`` once, written straight into the
    output: separate whole-tensor passes (int32 -> float32, two scalings, cast, bias) cost about as much
    as the int8 GEMM itself on a CPU.
    """
    m, n = acc.shape
    out = torch.empty(m, n, dtype=dtype, device=acc.device)
    cols = col_scale.to(device=acc.device, dtype=torch.float32)
    b = bias.to(device=acc.device, dtype=torch.float32) if bias is not None else None
    buf = torch.empty(min(chunk, m), n, device=acc.device)
    for start in range(0, m, chunk):
        rows = buf[: min(chunk, m - start)]
        _dequantize_chunk(acc[start : start + chunk], cols, row_scale[start : start + chunk], b, rows,
                          out[start : start + chunk])
    return out


def _dequantize_chunk(acc: torch.Tensor, cols: torch.Tensor, rows_scale: torch.Tensor, bias: torch.Tensor | None,
                      work: torch.Tensor, out: torch.Tensor) -> None:
    """out = acc * cols * rows_scale + bias for one chunk, via the float32 ``work`` buffer (out may be work)."""
    torch.mul(acc, cols, out=work)
    if bias is not None:
        torch.addcmul(bias, work, rows_scale, out=out)
    else:
        torch.mul(work, rows_scale, out=out)


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference-mode tensors, which torch does not track."""
    return None if t.is_inference() else t._version


def padded_width(in_features: int, group_size: int) -> int:
    """K rounded up to a whole number of groups."""
    return -(-in_features // group_size) * group_size


def quantize_int4(w: torch.Tensor, group_size: int, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise quantization with integer zero points.

    (N, K) float -> codes (N, Kp) uint8 in [0, 2^bits - 1], scales (N, G) float32, zeros (N, G) uint8.
    The range of every group includes 0 (zero padding is then harmless and 0.0 dequantizes exactly).
    """
    top = 2**bits - 1
    n, k = w.shape
    groups = F.pad(w.float(), (0, padded_width(k, group_size) - k)).view(n, -1, group_size)   # (N, G, g)
    lo = groups.amin(dim=-1).clamp(max=0)
    hi = groups.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / top).clamp(min=EPS)                                                 # (N, G)
    zero = torch.round(-lo / scale).clamp(0, top)
    codes = torch.round(groups / scale[..., None] + zero[..., None]).clamp(0, top)
    return codes.view(n, -1).to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, Kp) codes, (N, G) scales and zeros -> (N, Kp) float32 weight."""
    n = codes.shape[0]
    groups = codes.view(n, -1, group_size).float()                                           # (N, G, g)
    return ((groups - zero.float()[..., None]) * scale.float()[..., None]).view(n, -1)


def dequantize_packed_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """(N, Kp / 2) bytes of :func:`pack_int4`, (N, G) scales and zeros -> (N, Kp) float32 weight.

    :func:`dequantize_int4` of :func:`unpack_int4`, computed as q * s - z * s in two in-place passes
    straight from the bytes (equal up to float32 rounding, and faster: W4A16 prefill pays for it).
    """
    n = packed.shape[0]
    w = torch.empty(n, packed.shape[1], 2, device=packed.device)             # (N, Kp / 2, 2): the code pairs
    w[..., 0] = packed >> 4
    w[..., 1] = packed & 0xF
    s = scale.float()[..., None]                                              # (N, G, 1)
    groups = w.view(n, -1, group_size).mul_(s).sub_(zero.float()[..., None] * s)
    return groups.view(n, -1)


def fake_quant_int4(w: torch.Tensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """(N, K) -> the (N, K) float32 weight its group-wise codes represent (for scale searches and tests)."""
    return dequantize_int4(*quantize_int4(w, group_size, bits), group_size)[:, : w.shape[1]]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, Kp) codes in [0, 15] -> (N, Kp / 2) bytes, even column in the high nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] << 4) | c[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, Kp / 2) bytes -> (N, Kp) codes, inverse of :func:`pack_int4`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).view(packed.shape[0], -1)


# ---- modules -------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Common part: sizes, ``bias``, optional ``input_scale``, shape handling and path choice."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, input_scale: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size: int | None = None
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features, device=device) if input_scale else None)

    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_scale={self.input_scale is not None}{extra}")

    def _set_float(self, linear: nn.Linear, input_scale: torch.Tensor | None) -> torch.Tensor:
        """Copy bias/input scale from a float linear; returns its weight with the pending scale applied."""
        w = linear.weight.detach().float()
        if input_scale is not None:                  # x W^T = (x / s)(W diag(s))^T: weight takes s, input 1/s
            w = w * input_scale.float()
            self.input_scale.copy_(1 / input_scale.float())
        if linear.bias is not None:
            self.bias.copy_(linear.bias.detach())
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        shape = (rows, self.out_features, self._kernel_width(), self.group_size)
        if kernels.bf16_rows_for_kernel(self.scheme, x, rows):
            xb = x.bfloat16()
            if kernels.use_kernel(self.scheme, xb, *shape):
                return self.kernel(xb).to(x.dtype)
        return self.kernel(x) if kernels.use_kernel(self.scheme, x, *shape) else self.reference(x)

    def _kernel_width(self) -> int:
        return self.in_features

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (M, K) rows with the input scale applied."""
        self._check_width(x)
        x = x.reshape(-1, self.in_features)
        return x * self.input_scale.to(x.dtype) if self.input_scale is not None else x

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"{type(self).__name__} expects inputs with {self.in_features} features, "
                              f"got shape {tuple(x.shape)}")

    def _finish(self, y: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """(M, N) -> (..., N) in the input's dtype, bias added."""
        y = y.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.view(*shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class W8A16Linear(QuantLinear):
    """int8 weight per output channel, activations stay float."""

    scheme = "w8a16"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_scale: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, input_scale, dtype, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: torch.Tensor | None = None, **_: object) -> "W8A16Linear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, input_scale is not None,
                linear.weight.dtype, linear.weight.device)
        q, scale = quantize_int8(m._set_float(linear, input_scale))
        m.weight.copy_(q)
        m.weight_scale.copy_(scale[:, 0])
        return m

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, K) weight in ``dtype``."""
        return (self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None])

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._prepare(x)
        return self._finish(rows @ self.dequantized(rows.dtype).t(), x.shape, x.dtype)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._prepare(x)
        return self._finish(kernels.int8_weight_mm(rows, self.weight, self.weight_scale), x.shape, x.dtype)


class W8A8Linear(W8A16Linear):
    """int8 weight per output channel x int8 activations (dynamic), integer accumulation.

    Activations are quantized per token, symmetric 8-bit (``reference``, ``kernel``), except where the CPU
    rule picks FBGEMM's int8 linear (AVX2 CPUs: ``fbgemm``, 7-bit codes per token, see
    :func:`nvila.model.kernels.fbgemm_int8_reference`). FBGEMM keeps the weight in its own packed form; once
    :meth:`pack_for_fbgemm` has dropped the plain copy, ``state_dict`` rebuilds it from the packed one
    (exactly), so the module still saves what it loaded.
    """

    scheme = "w8a8"
    # (input weakref, input version, codes, scales) of the last input quantized without an input scale
    _last_input: tuple[weakref.ref, int | None, torch.Tensor, torch.Tensor] | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._fbgemm: tuple[tuple, torch.Tensor] | None = None    # (weight key, packed) or (None, packed): dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fbgemm(x) if kernels.use_fbgemm(x) else super().forward(x)

    @property
    def packed_bytes(self) -> int:
        """Bytes of FBGEMM's packed weight (not a parameter or buffer), 0 while there is none."""
        return self.in_features * self.out_features if self._fbgemm is not None else 0

    def int8_weight(self) -> torch.Tensor:
        """(N, K) int8 codes, from the packed form when the plain copy was dropped."""
        return self.weight if self.weight.numel() else kernels.fbgemm_unpack(self._fbgemm[1])

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.int8_weight().to(dtype) * self.weight_scale.to(dtype)[:, None]

    def fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._prepare(x).float()
        return self._finish(kernels.fbgemm_int8_linear(rows, self._fbgemm_packed()), x.shape, x.dtype)

    def fbgemm_reference(self, x: torch.Tensor) -> torch.Tensor:
        """What :meth:`fbgemm` computes, written out."""
        rows = self._prepare(x).float()
        return self._finish(kernels.fbgemm_int8_reference(rows, self.int8_weight(), self.weight_scale), x.shape,
                            x.dtype)

    def _fbgemm_packed(self) -> torch.Tensor:
        if self._fbgemm is not None and self._fbgemm[0] is None:
            return self._fbgemm[1]
        key = tuple((b.data_ptr(), _version(b)) for b in (self.weight, self.weight_scale))
        if self._fbgemm is None or self._fbgemm[0] != key:
            self._fbgemm = (key, kernels.fbgemm_pack(self.weight, self.weight_scale))
        return self._fbgemm[1]

    def pack_for_fbgemm(self) -> None:
        """Pack the weight for FBGEMM now and drop the plain int8 copy (half the layer's memory)."""
        packed = self._fbgemm_packed()
        self._fbgemm = (None, packed)
        self.weight = torch.empty(0, dtype=torch.int8, device=self.weight.device)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.int8_weight()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        if not self.weight.numel():                           # dropped: take a plain copy again
            self.weight = torch.empty(self.out_features, self.in_features, dtype=torch.int8,
                                      device=self.weight.device)
            self._fbgemm = None
        super()._load_from_state_dict(state_dict, prefix, *args)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        qx, sx = self._quantize_input(x)                               # (M, K) int8, (M, 1)
        acc = qx.float() @ self.int8_weight().float().t()              # integer sums, exact below 2^24
        return self._dequantize(acc, sx, x)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        qx, sx = self._quantize_input(x)
        return self._dequantize(kernels.int8_int8_mm(qx, self.int8_weight()), sx, x)   # (M, N) int32 sums

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token int8 codes of x times the input scale (applied in float32 while quantizing).

        Linears without an input scale that read the same tensor (an attention block's q, k and v
        projections) share one quantization: the last one is kept, keyed by the input object (held weakly,
        so a freed input is never matched) and its version counter (inference-mode tensors have none:
        torch does not track in-place changes to them).
        """
        self._check_width(x)
        if self.input_scale is not None:
            return quantize_rows_int8(x.reshape(-1, self.in_features), scale=self.input_scale)
        version = _version(x)
        last = W8A8Linear._last_input
        if last is not None and last[0]() is x and last[1] == version:
            return last[2], last[3]
        codes, scales = quantize_rows_int8(x.reshape(-1, self.in_features))
        W8A8Linear._last_input = (weakref.ref(x), version, codes, scales)
        return codes, scales

    def _dequantize(self, acc: torch.Tensor, sx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = dequantize_rows(acc, sx, self.weight_scale, self.bias, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


GELU_TANH_C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, of float32 ``x`` (overwritten and returned) as x * sigmoid(2z).

    The same function as ``F.gelu(x, approximate="tanh")`` (0.5 (1 + tanh z) = sigmoid(2z), z =
    sqrt(2/pi) (x + 0.044715 x^3)) and as accurate (float32 rounding), but faster on CPU, where torch's
    tanh is slow.
    """
    u = x * x
    u.mul_(GELU_TANH_C * 0.044715).add_(GELU_TANH_C).mul_(x)                 # 2z
    return x.mul_(u.sigmoid_())


class W8A8MLP(nn.Module):
    """A transformer MLP, fc1 -> activation -> fc2, whose two linears are :class:`W8A8Linear`.

    When both take the fused path, fc1's dequantization, the activation and fc2's input scaling and
    quantization run together on a few rows at a time in float32, so the wide hidden activation is never
    written out in the model's dtype and read back three times (for the 1024 x 4304 hidden activation of
    a SigLIP tile those passes cost about as much as fc2's int8 GEMM). The result is the unfused
    sequence run in float32 (tanh-GELU computed by :func:`gelu_tanh_`: equal up to float32 rounding, so
    an int8 code of the hidden activation may differ by one). Otherwise (reference path, e.g. float32 rows
    on a CPU without int8 dot products) it is that sequence. Children keep their names (``fc1``, ``fc2``):
    the state dict is unchanged.
    """

    CHUNK = 64  # rows of the hidden activation in flight (64 x 4304 float32: about 1 MB)

    def __init__(self, mlp: nn.Module) -> None:
        from transformers.activations import GELUTanh

        super().__init__()
        self.fc1, self.fc2, self.activation_fn = mlp.fc1, mlp.fc2, mlp.activation_fn
        # the fused path's activation on float32 rows, in place where a faster equivalent form is known
        self._activation = gelu_tanh_ if isinstance(mlp.activation_fn, GELUTanh) else mlp.activation_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.fc1.in_features
        fused = all(kernels.use_kernel("w8a8", x, rows, m.out_features, m.in_features) for m in (self.fc1, self.fc2))
        if not fused:
            return self.fc2(self.activation_fn(self.fc1(x)))
        qx, sx = self.fc1._quantize_input(x)
        acc = kernels.int8_int8_mm(qx, self.fc1.weight)                                   # (M, H) int32
        hidden = torch.empty(acc.shape, dtype=torch.int8, device=acc.device)
        hidden_scales = torch.empty(acc.shape[0], 1, device=acc.device)
        cols = self.fc1.weight_scale.float()
        bias = self.fc1.bias.float() if self.fc1.bias is not None else None
        factor = self.fc2.input_scale.float() if self.fc2.input_scale is not None else None
        buf = torch.empty(min(self.CHUNK, acc.shape[0]), acc.shape[1], device=acc.device)
        for start in range(0, acc.shape[0], self.CHUNK):
            stop = min(start + self.CHUNK, acc.shape[0])
            h = buf[: stop - start]
            _dequantize_chunk(acc[start:stop], cols, sx[start:stop], bias, h, h)
            h = self._activation(h)
            if factor is not None:
                h.mul_(factor)
            _quantize_chunk(h, hidden[start:stop], hidden_scales[start:stop])
        return self.fc2._dequantize(kernels.int8_int8_mm(hidden, self.fc2.weight), hidden_scales, x)


class W4A16Linear(QuantLinear):
    """4-bit weight, group-wise scales and zero points; activations stay float."""

    scheme = "w4a16"
    REFERENCE_CHUNK_ELEMENTS = 1 << 20    # weight elements dequantized at a time by the reference path

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_scale: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 group_size: int = 128) -> None:
        super().__init__(in_features, out_features, bias, input_scale, dtype, device)
        check_group_size(group_size)
        self.group_size = group_size
        self.padded_in = padded_width(in_features, group_size)
        groups = self.padded_in // group_size
        self.register_buffer("weight", torch.zeros(out_features, self.padded_in // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
        self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self._packed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None   # fused-op layout cache

    @classmethod
    def from_float(cls, linear: nn.Linear, input_scale: torch.Tensor | None = None, group_size: int = 128,
                   codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> "W4A16Linear":
        """Round ``linear`` (its weight times ``input_scale``) to nearest, or take ``codes`` chosen elsewhere
        (GPTQ): (codes (N, Kp) uint8, scales (N, G), zeros (N, G) uint8) for that same scaled weight."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, input_scale is not None,
                linear.weight.dtype, linear.weight.device, group_size)
        w = m._set_float(linear, input_scale)
        if codes is None:
            codes = quantize_int4(w, group_size)
        elif codes[0].shape != (m.out_features, m.padded_in) or codes[1].shape != m.weight_scale.shape:
            raise ConfigError(f"4-bit codes of shape {tuple(codes[0].shape)} / scales {tuple(codes[1].shape)} do "
                              f"not fit a {m.in_features} -> {m.out_features} layer with group size {group_size}")
        codes, scale, zero = codes
        m.weight.copy_(pack_int4(codes))
        m.weight_scale.copy_(scale)
        m.weight_zero.copy_(zero)
        return m

    def _kernel_width(self) -> int:
        return self.padded_in

    def dequantized(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(N, K) weight in ``dtype`` (padding columns dropped); output rows ``start:stop`` only if given."""
        sl = slice(start, stop)
        w = dequantize_packed_int4(self.weight[sl], self.weight_scale[sl], self.weight_zero[sl], self.group_size)
        return w[:, : self.in_features].to(dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize and multiply, about 2^20 weights (output channels x K) at a time: the same weights as
        dequantizing all at once (results equal up to float summation order), without its large float32
        temporaries, which dominated W4A16 prefill."""
        rows = self._prepare(x)
        out = rows.new_empty(rows.shape[0], self.out_features)
        chunk = max(64, self.REFERENCE_CHUNK_ELEMENTS // self.padded_in)
        for start in range(0, self.out_features, chunk):
            stop = min(start + chunk, self.out_features)
            torch.matmul(rows, self.dequantized(rows.dtype, start, stop).t(), out=out[:, start:stop])
        return self._finish(out, x.shape, x.dtype)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._prepare(x)
        rows = F.pad(rows, (0, self.padded_in - self.in_features))    # padding columns have weight 0
        packed, scale_zero = self._fused_layout(rows)
        return self._finish(kernels.int4_weight_mm(rows.contiguous(), packed, self.group_size, scale_zero),
                            x.shape, x.dtype)

    def _fused_layout(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused op's weight and scale tables, rebuilt when the buffers, device or dtype change.

        The cache costs one more copy of the 4-bit weight; it is built on the first kernel call. Buffers
        made under ``torch.inference_mode`` (a model loaded there) have no version counter: their storage
        alone is the key.
        """
        bufs = (self.weight, self.weight_scale, self.weight_zero)
        key = tuple((b.data_ptr(), _version(b)) for b in bufs) + (rows.dtype,)
        if self._packed is None or self._packed[0] != key:
            packed = kernels.int4_pack(unpack_int4(self.weight), self.weight, rows.device, self.padded_in)
            self._packed = (key, packed, kernels.int4_scale_zero(self.weight_scale, self.weight_zero, rows.dtype))
        return self._packed[1], self._packed[2]


# scheme -> module class: the one registry of quantized linears.
QUANTIZERS: dict[str, type[QuantLinear]] = {"w8a8": W8A8Linear, "w8a16": W8A16Linear, "w4a16": W4A16Linear}


# ---- module swaps --------------------------------------------------------------------------------
def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``name`` inside ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def fuse_w8a8_mlps(root: nn.Module) -> int:
    """Wrap every MLP of ``root`` (a module with ``fc1``, ``activation_fn``, ``fc2``) whose linears are both
    :class:`W8A8Linear` in a :class:`W8A8MLP`, in place; returns the count."""
    targets = [name for name, m in root.named_modules()
               if isinstance(getattr(m, "fc1", None), W8A8Linear) and isinstance(getattr(m, "fc2", None), W8A8Linear)
               and callable(getattr(m, "activation_fn", None)) and not isinstance(m, W8A8MLP) and name]
    for name in targets:
        replace_module(root, name, W8A8MLP(root.get_submodule(name)))
    return len(targets)


def pack_int8_for_cpu(root: nn.Module) -> int:
    """Where the CPU rule runs W8A8 through FBGEMM, pack every :class:`W8A8Linear` of ``root`` for it and drop
    the plain int8 copies (:meth:`W8A8Linear.pack_for_fbgemm`); returns the count (0 elsewhere)."""
    layers = [m for m in root.modules() if isinstance(m, W8A8Linear) and m.weight.device.type == "cpu"]
    if not layers or not kernels.use_fbgemm(layers[0].weight):
        return 0
    for m in layers:
        m.pack_for_fbgemm()
    return len(layers)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())

