"""16-bit weights, float32 math: module swaps for checkpoints stored in bf16 (the released ones are).

Float32 arithmetic on bf16 weights loses nothing against the float32 reference, while the weights take half
the memory and half the bytes per decoded token. Three swaps, applied by :func:`fp32_math_on_16bit_weights`:

    PackedFp16Linear   FBGEMM's fp16 GEMM (``quantized.linear_dynamic_fp16``): the weight packed as fp16,
                       float32 activations and accumulation. bf16 -> fp16 is exact for |w| >= 2^-17; the
                       few smaller weights (fp16 subnormals) are kept aside in bf16 so that ``state_dict``
                       gives back the exact stored weight (the product uses their fp16 value: < 2^-25 off)
    UpcastLinear       a 16-bit weight upcast per call (where fp16 cannot hold it: |w| > 65504, or no FBGEMM)
    UpcastEmbedding    a 16-bit table whose looked-up rows come back in float32
    MappedEmbedding    the same with the table left in the checkpoint file, memory-mapped; a tied LM head
                       is then packed from the file block by block
                       (:func:`nvila.checkpoint.load.map_input_embeddings`)

Parameter names are unchanged: a swapped model saves the same tensors it loaded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from nvila.base.hardware import release_freed_memory

FP16_MAX = 65504.0
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Smaller weights are upcast per call: FBGEMM splits even a tiny GEMM over its threads, and waking them costs
# more than the product (milliseconds on a busy machine) while the upcast of so few weights is cheap.
PACKED_MIN_WEIGHTS = 1 << 18


class UpcastLinear(nn.Linear):
    """A linear stored in low precision, computed in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class UpcastEmbedding(nn.Embedding):
    """An embedding stored in low precision; looked-up rows come back in ``compute_dtype``."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


class MappedEmbedding(nn.Module):
    """An embedding whose 16-bit table stays in the checkpoint file, memory-mapped: a lookup reads only the
    pages of the rows it gathers, so the table costs no resident memory beyond them (the LM head, tied to it
    in the checkpoint, has its own packed copy). Rows appended at load (media tokens) are kept in ``tail``.
    Looked-up rows come back in ``compute_dtype``. ``state_dict`` writes the whole table under ``weight``,
    read from the file; the file must not change while the model is loaded (as for any mapped weights).
    """

    def __init__(self, table: torch.Tensor, tail: torch.Tensor, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape[0] + tail.shape[0], table.shape[1]
        self.compute_dtype = compute_dtype
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("tail", tail, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The mapped rows (their dtype is the table's; the appended rows are in ``tail``)."""
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.shape[0]
        if not self.tail.shape[0] or not bool((ids >= rows).any()):
            return F.embedding(ids, self.table).to(self.compute_dtype)
        out = F.embedding(ids.clamp(max=rows - 1), self.table).to(self.compute_dtype)
        extra = ids >= rows
        out[extra] = self.tail[ids[extra] - rows].to(self.compute_dtype)
        return out

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = torch.cat([self.table, self.tail.to(self.table.dtype)])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        w = state_dict[prefix + "weight"].to(self.table.dtype)
        self.table, self.tail = w[: self.table.shape[0]].clone(), w[self.table.shape[0]:].clone()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mapped rows={self.table.shape[0]}"


def packable(weight: torch.Tensor) -> bool:
    """Whether a 16-bit linear weight takes :class:`PackedFp16Linear`: FBGEMM is there, the weight is large
    enough to gain (:data:`PACKED_MIN_WEIGHTS`) and fp16 holds its range."""
    w = weight.detach()
    return (fbgemm_fp16_available() and w.numel() >= PACKED_MIN_WEIGHTS
            and max(float(w.max()), -float(w.min())) <= FP16_MAX)


def fbgemm_fp16_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ops.quantized, "linear_prepack_fp16") and "fbgemm" in engines


class PackedFp16Linear(nn.Module):
    """``nn.Linear`` whose 16-bit weight lives packed for FBGEMM's fp16 GEMM; float32 in and out.

    Up to ``max_rows`` input rows the fp16 GEMM runs; above, the weight is unpacked to float32 for one
    ``F.linear`` (a per-CPU rule, :func:`nvila.base.hardware.cpu_rules`).
    """

    BLOCK_WEIGHTS = 1 << 24   # weights packed per FBGEMM matrix: bounds the float32 copy packing needs

    def __init__(self, linear: nn.Linear, max_rows: int,
                 read_rows: Callable[[int, int], torch.Tensor] | None = None) -> None:
        """``read_rows(start, stop)``: where the stored rows come from when not from ``linear.weight`` (a
        checkpoint file read block by block, so packing never holds the whole 16-bit weight)."""
        super().__init__()
        self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows
        self.stored_dtype = linear.weight.dtype
        # output rows known exactly only in float32 (an LM head's rows appended at load): kept apart
        tail = getattr(linear, "float_tail", None)
        self.register_buffer("float_tail", None if tail is None else tail.float(), persistent=False)
        rows = self.out_features - (0 if tail is None else tail.shape[0])
        if read_rows is None:
            w = linear.weight.detach()
            read_rows = lambda start, stop: w[start:stop]             # noqa: E731
        # a large weight (an LM head) is packed in row blocks, so packing never holds a float32 copy of it
        step = max(1, self.BLOCK_WEIGHTS // self.in_features)
        self._packed, inexact, exact_values = [], [], []
        for start in range(0, rows, step):
            stored = read_rows(start, min(start + step, rows))
            block = stored.float()
            self._packed.append(torch.ops.quantized.linear_prepack_fp16(block, None))
            lost = (block.half().float() != block).flatten().nonzero().flatten()        # fp16 subnormals
            inexact.append(lost + start * self.in_features)
            exact_values.append(stored.flatten()[lost].clone())
            del block, stored
            release_freed_memory()
        self.register_buffer("_exact_index", torch.cat(inexact), persistent=False)
        self.register_buffer("_exact_value", torch.cat(exact_values).to(self.stored_dtype), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)

    @property
    def packed_bytes(self) -> int:
        """Bytes the packed weight takes (it is not a parameter or buffer)."""
        return self.in_features * self.out_features * 2

    def weight_float(self) -> torch.Tensor:
        """(N, K) float32 weight as the fp16 GEMM multiplies it (the float tail excluded)."""
        return torch.cat([torch.ops.quantized.linear_unpack_fp16(p)[0] for p in self._packed])

    def stored_weight(self) -> torch.Tensor:
        """(N, K) weight in the dtype it was loaded in, exactly (the float tail rounded to it)."""
        w = self.weight_float().to(self.stored_dtype)
        w.view(-1)[self._exact_index] = self._exact_value
        return w if self.float_tail is None else torch.cat([w, self.float_tail.to(self.stored_dtype)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float()
        if rows.shape[0] <= self.max_rows:
            rows = rows.contiguous()
            parts = [torch.ops.quantized.linear_dynamic_fp16(rows, p) for p in self._packed]
        else:
            parts = [F.linear(rows, self.weight_float())]
        if self.float_tail is not None:
            parts.append(F.linear(rows, self.float_tail))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.stored_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias.to(self.stored_dtype)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(state_dict[prefix + "weight"].to(self.stored_dtype), requires_grad=False)
        if self.float_tail is not None:
            linear.float_tail = self.float_tail
        if self.bias is not None:
            linear.bias = nn.Parameter(state_dict[prefix + "bias"].float(), requires_grad=False)
        self.__init__(linear, self.max_rows)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"stored={self.stored_dtype}, max_rows={self.max_rows}")


def fp32_math_on_16bit_weights(root: nn.Module, packed_max_rows: int) -> dict[str, int]:
    """Swap every 16-bit ``nn.Linear`` / ``nn.Embedding`` under ``root`` for its float32-math form, in place,
    and upcast every other 16-bit parameter and buffer (norms, convolutions, position tables: small).

    Linears take :class:`PackedFp16Linear` where FBGEMM is available, the weight fits fp16 and has at least
    :data:`PACKED_MIN_WEIGHTS` elements, else :class:`UpcastLinear`. A tied LM head gets its own packed copy
    (the embedding keeps the table).
    Returns how many modules took each form.
    """
    counts = {"packed_fp16": 0, "upcast_linear": 0, "upcast_embedding": 0}
    # names only: holding the modules would keep every replaced 16-bit weight alive until the end
    for name in [n for n, m in root.named_modules() if type(m) in (nn.Linear, nn.Embedding)]:
        module = root.get_submodule(name)
        if module.weight.dtype not in LOW_PRECISION:
            continue
        if isinstance(module, nn.Embedding):
            module.__class__ = UpcastEmbedding
            module.compute_dtype = torch.float32
            counts["upcast_embedding"] += 1
            continue
        if packable(module.weight):
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, child, PackedFp16Linear(module, packed_max_rows))
            counts["packed_fp16"] += 1
        else:
            module.__class__ = UpcastLinear
            counts["upcast_linear"] += 1
        del module
        release_freed_memory()          # the replaced weight's memory, before the next layer is packed
    for module in root.modules():
        if isinstance(module, (UpcastLinear, UpcastEmbedding, MappedEmbedding)):
            continue
        for p in module.parameters(recurse=False):
            if p.dtype in LOW_PRECISION:
                p.data = p.data.float()
        for key, b in module._buffers.items():
            if b is not None and b.dtype in LOW_PRECISION and not key.startswith("_exact") and key != "float_tail":
                module._buffers[key] = b.float()
    return counts
