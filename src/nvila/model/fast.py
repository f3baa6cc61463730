"""CPU fast path for bf16 models: module swaps and an attention backend, chosen by measurement.

Applied by :func:`nvila.load` for bf16 on CPU: the vision tower's attention runs as bf16 GEMMs
(:func:`shifted_bf16_attention`), and where :func:`nvila.base.hardware.decode_kernel_wins` (AMX CPUs) the
LLM's linears take a matrix-vector kernel for single-row (decode) products (:class:`DecodeLinear`).
Parameter names and values are unchanged. Measurements: ``nvila bench-kernels``, docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nvila.base.hardware import cpu_has_native_bf16


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
    a strided view of the hidden states; CPU GEMMs on such a view of a batch are pathologically slow.
    """
    head = llm.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


# ---- vision attention ------------------------------------------------------------------------------
VISION_ATTENTION = "nvila_cpu_bf16"   # the name it is registered under in transformers' AttentionInterface
SHIFTED_MIN_TOKENS = 512              # shorter sequences: SDPA (measured faster for 257 tokens, slower for 1024)
SCORE_BYTES = 4 << 20                 # score block per GEMM call: 2 heads of a 1024-token tile (the fastest measured)


def shifted_bf16_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """Attention backend of the CPU fast path: :func:`shifted_attention` where it pays, SDPA elsewhere.

    The shifted GEMMs run for unmasked, non-causal, gradient-free bf16 attention on CPUs with native bf16
    and at least :data:`SHIFTED_MIN_TOKENS` queries (torch's CPU flash kernel computes a ViT's attention at
    float32 speed, a bf16 GEMM several times faster); anything else goes to transformers' SDPA function
    (for short sequences such as a DINOv2-S tile the per-head calls cost more than they save).
    """
    plain = (attention_mask is not None or is_causal or (dropout > 0.0 and module.training)
             or query.device.type != "cpu" or query.dtype != torch.bfloat16 or not cpu_has_native_bf16()
             or (torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)))
             or key.shape[1] != query.shape[1] or query.shape[2] < SHIFTED_MIN_TOKENS)
    if plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return shifted_attention(query, key, value, scaling), None


def shifted_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scaling: float | None = None) -> torch.Tensor:
    """Unmasked attention of (B, H, T, D) tensors as GEMMs in their dtype, a few heads at a time; (B, T, H, D) out.

    A bf16 GEMM rounds its output to bf16: scores of size ~20 would carry errors of ~0.05 and the softmax
    weights 5 % errors. So each head takes two GEMMs on inputs widened by one column: the first gives the
    row maxima m, the second computes s - m inside the GEMM (query column -m, key column 1) before the
    output is rounded, which keeps the largest weights accurate to bf16 precision. The probabilities are
    in the input dtype in the second product, as in GPU flash attention. Runs on any CPU and dtype (only
    its speed depends on the hardware).
    """
    b, h, t, d = query.shape
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
    return out


def use_fast_vision_attention(vision_model: nn.Module) -> None:
    """Run the attention of a transformers vision model (SigLIP, DINOv2) through :func:`shifted_bf16_attention`.

    Registered with transformers' ``AttentionInterface`` and selected on the model's config, the way any
    attention backend is chosen; the weights are untouched.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VISION_ATTENTION, shifted_bf16_attention)
    vision_model.set_attn_implementation(VISION_ATTENTION)
