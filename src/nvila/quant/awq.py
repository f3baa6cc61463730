"""AWQ and GPTQ for the LLM's weight-only schemes, one decoder layer at a time.

AWQ picks s = mean|x|^r per input channel with r in a grid over [0, 1] (r = 0 is plain round-to-nearest),
the r whose 4-bit quantized weight gives the smallest output error on calibration activations: the
salient input channels get finer weight steps (groups and folds: :mod:`nvila.quant.calibrate`). An
optional clipping search shrinks each group's range. Rounding is either to nearest (at the swap) or GPTQ
(:func:`gptq`): the grid of each group is fixed as for plain rounding (after clipping), then columns are
rounded one at a time and each rounding error is compensated by the columns still to come, weighted by
the inputs' second moments.

The LLM is calibrated layer by layer (:func:`awq`): the first layer's inputs are captured once, each layer
is calibrated on its inputs and then run with its weights as they will be quantized to produce the next
layer's inputs, so later layers are calibrated on what they will see behind quantized layers, and only one
layer's statistics are held at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nvila.base.errors import ConfigError
from nvila.formats.quant import ROUNDINGS, default_clip
from nvila.model.quantized import dequantize_int4, fake_quant_int4, padded_width, quantize_int4
from nvila.quant.calibrate import Group, InputStats, LinearCalib, apply_scales, block_groups, collect, find_groups


# ---- AWQ -----------------------------------------------------------------------------------------
def llm_groups(llm: nn.Module) -> list[Group]:
    """Groups of a transformers causal LM's decoder layers (``model.layers``); the LM head is left float."""
    return find_groups(llm_layers(llm), "model.layers.")


def awq_scale(stats: InputStats, weights: Sequence[torch.Tensor], group_size: int, bits: int = 4,
              n_grid: int = 20, max_rows: int = 2048) -> tuple[torch.Tensor, list[float]]:
    """The AWQ scale (K,) of one group and the output MSE of every grid point (index 0: plain RTN).

    When the statistics hold the second moments G = mean x^T x and K does not exceed the number of sampled
    rows, the MSE is over every calibration token at once, mean ||x E^T||^2 = tr(E G E^T) for the weight
    error E = q(W diag(s)) diag(s)^-1 - W (N K^2 per grid point); otherwise over the sampled rows, at most
    ``max_rows`` of them (R K N per grid point: wide inputs such as a 8960-channel down_proj).
    """
    x = stats.sample()                                                        # (R, K)
    mean = (stats.abssum / max(stats.tokens, 1)).clamp(min=1e-8)
    ws = [w.detach().float().to(x.device) for w in weights]
    width = sum(w.shape[0] for w in ws)
    gram = stats.gram / max(stats.tokens, 1) if stats.gram is not None and x.shape[1] <= x.shape[0] else None
    if gram is None and x.shape[0] > max_rows:                                # evenly spaced rows: bounded cost
        x = x[torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).long()]
    ref = torch.cat([x @ w.t() for w in ws], dim=1) if gram is None else None  # (R, sum N)
    best, errors = torch.ones_like(mean), []
    for i in range(n_grid):
        s = mean.pow(i / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()                                    # centre the scales around 1
        if gram is None:
            out = torch.cat([(x / s) @ fake_quant_int4(w * s, group_size, bits).t() for w in ws], dim=1)
            errors.append((out - ref).pow(2).mean().item())
        else:
            e = torch.cat([fake_quant_int4(w * s, group_size, bits) / s - w for w in ws])    # (sum N, K)
            errors.append(((e @ gram) * e).sum().item() / width)
        if errors[-1] < min(errors[:-1], default=float("inf")):              # ties keep the smaller ratio
            best = s
    return best, errors


@torch.no_grad()
def awq_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, bits: int = 4, n_grid: int = 20,
             max_shrink: float = 0.5, chunk: int = 1024) -> torch.Tensor:
    """AWQ's clipping search: the (N, G) range ratio per output channel and group of ``weight`` (N, K).

    Every group's range [lo, hi] is shrunk to [r lo, r hi] for r on a grid from 1 down to ``1 - max_shrink``;
    the r kept is the one whose quantized group gives the smallest error on that group's part of the
    output, ``mean_rows (x_g . (w_g - q(clip(w_g))))^2`` over the calibration rows ``x`` (R, K) as the linear
    receives them. That error is ``d^T H_g d`` with ``d = w_g - q(...)`` and ``H_g = mean x_g x_g^T`` the
    group's (g, g) second-moment matrix, computed once, so the search costs N K g per grid point whatever
    the number of rows. Clipping trades a few large weights' error for finer steps on all the others;
    r = 1 is always a candidate, so the kept error never exceeds plain min/max quantization.
    """
    n, k = weight.shape
    kp = padded_width(k, group_size)
    groups = kp // group_size
    xg = F.pad(x.float(), (0, kp - k)).view(x.shape[0], groups, group_size).transpose(0, 1)  # (G, R, g)
    gram = xg.transpose(1, 2) @ xg / max(x.shape[0], 1)                                    # (G, g, g)
    ratios = torch.ones(n, groups, device=weight.device)
    for start in range(0, n, chunk):
        w = F.pad(weight[start:start + chunk].float(), (0, kp - k)).view(-1, groups, group_size)   # (n, G, g)
        lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
        best = torch.full(w.shape[:2], float("inf"), device=w.device)
        for i in range(n_grid):
            r = 1 - max_shrink * i / n_grid
            wc = torch.maximum(torch.minimum(w, hi * r), lo * r)
            d = (w - fake_quant_int4(wc.reshape(w.shape[0], -1), group_size, bits).view_as(w)).transpose(0, 1)
            err = ((d @ gram) * d).sum(-1).transpose(0, 1)                                # (n, G)
            better = err < best
            best = torch.where(better, err, best)
            ratios[start:start + chunk][better] = r
    return ratios


def clip_weight(weight: torch.Tensor, ratios: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight`` (N, K) with every group clamped to its shrunk range (ratios (N, G) from :func:`awq_clip`)."""
    n, k = weight.shape
    kp = padded_width(k, group_size)
    w = F.pad(weight.float(), (0, kp - k)).view(n, -1, group_size)
    r = ratios[..., None].to(w)
    lo, hi = w.amin(-1, keepdim=True).clamp(max=0) * r, w.amax(-1, keepdim=True).clamp(min=0) * r
    return torch.maximum(torch.minimum(w, hi), lo).view(n, kp)[:, :k].to(weight.dtype)


def apply_clipping(root: nn.Module, calibs: dict[str, LinearCalib], group_size: int, bits: int = 4,
                   n_grid: int = 20) -> None:
    """Search and apply AWQ clipping for every calibrated linear of ``root`` (in place, float weights).

    The search sees each weight as it will be quantized (with any pending scale multiplied in) and its
    inputs as the quantized layer receives them; the clamp is written back to the float weight, so the
    swap needs nothing more. Query and key projections are left unclipped (their error is amplified by
    the attention softmax, where a per-output error measure is a poor guide).
    """
    for name, c in calibs.items():
        inputs = c.inputs()
        if inputs is None or name.rsplit(".", 1)[-1] in ("q_proj", "k_proj"):
            continue
        linear = root.get_submodule(name)
        w = linear.weight.detach().float()
        x = inputs.float().to(w.device)
        s = c.pending.float().to(w.device) if c.pending is not None else None
        scaled, x = (w * s, x / s) if s is not None else (w, x)
        clipped = clip_weight(scaled, awq_clip(scaled, x, group_size, bits, n_grid), group_size)
        with torch.no_grad():
            c.reference = linear(inputs.to(linear.weight.dtype)).float()
            linear.weight.copy_((clipped / s if s is not None else clipped).to(linear.weight.dtype))


@torch.no_grad()
def gptq(weight: torch.Tensor, gram: torch.Tensor, group_size: int, bits: int = 4, damp: float = 0.01,
         block: int = 128, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ rounding of ``weight`` (N, K) for inputs with second moments ``gram`` (K, K) ~ sum x^T x.

    Returns (codes (N, Kp) uint8, scales (N, G), zeros (N, G) uint8) in :func:`quantize_int4`'s format. The
    grid of every group is fixed first, from the weight's own range (after any clipping), as plain
    rounding would choose it; then the columns are rounded one at a time and each column's rounding error
    is spread over the columns not yet rounded, in proportion to how the inputs correlate (the optimal
    update for ``||x W^T - x Q^T||^2`` when column j is fixed, via the upper Cholesky factor U of H^-1:
    ``W[:, j:] -= (w_j - q_j) / U_jj * U_j,j:``), a block of ``block`` columns at a time. ``act_order``
    rounds the columns with the largest input energy first (the grid stays that of each column's own
    group). ``damp``: fraction of the mean diagonal added to H so that it is invertible; channels that
    never saw a non-zero input are set to 0.
    """
    n, k = weight.shape
    top = 2**bits - 1
    _, scale, zero = quantize_int4(weight, group_size, bits)
    w = weight.float().clone()
    h = gram.float().to(w.device).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    u = _inverse_cholesky(h, damp)
    group = perm // group_size
    s, z = scale[:, group], zero.float()[:, group]                           # (N, K) grid of every column
    codes = torch.empty(n, k, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col, sj, zj = w1[:, j], s[:, i1 + j], z[:, i1 + j]
            q = torch.round(col / sj + zj).clamp_(0, top)
            codes[:, i1 + j] = q
            e = (col - (q - zj) * sj) / u1[j, j]
            w1[:, j:].sub_(e[:, None] * u1[j, j:][None, :])
            err[:, j] = e
        w[:, i2:].sub_(err @ u[i1:i2, i2:])
    codes = codes[:, torch.argsort(perm)]
    out = zero.repeat_interleave(group_size, dim=1).clone()                 # padding columns: code = zero point
    out[:, :k] = codes.to(torch.uint8)
    return out, scale, zero


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, raising the damping tenfold until H is positive definite."""
    mean = h.diagonal().mean().clamp(min=1e-12)
    for attempt in range(5):
        damped = h + torch.eye(h.shape[0], device=h.device) * (damp * 10**attempt * mean)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise ConfigError("GPTQ: the calibration inputs' second-moment matrix is not positive definite even with "
                      "damping; use more or more varied calibration data")


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at the first decoder layer."""


def block_inputs(llm: nn.Module, calib_inputs: Sequence[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first decoder layer receives for every calibration input (one pass each,
    stopped there): hidden states, attention mask, rotary embeddings as the model computes them."""
    layers = llm_layers(llm)
    captured: list[tuple[tuple, dict]] = []

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for e in calib_inputs:
                try:
                    llm(inputs_embeds=e.reshape(1, -1, e.shape[-1]), use_cache=False, logits_to_keep=1)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def _run_block(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    outs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def quantized_weight(linear: nn.Linear, calib: LinearCalib, group_size: int, bits: int = 4) -> torch.Tensor:
    """The float (N, K) weight a W4A16 swap of ``linear`` will multiply with, input scale included."""
    w = linear.weight.detach().float()
    s = calib.pending.float().to(w.device) if calib.pending is not None else None
    if calib.codes is not None:
        q = dequantize_int4(*calib.codes, group_size)[:, : w.shape[1]]
    else:
        q = fake_quant_int4(w * s if s is not None else w, group_size, bits)
    return q / s if s is not None else q


def llm_layers(llm: nn.Module) -> Sequence[nn.Module]:
    layers = getattr(getattr(llm, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(llm).__name__} has no model.layers: cannot find the LLM's decoder layers")
    return layers


@torch.no_grad()
def awq(llm: nn.Module, calib_inputs: Sequence[torch.Tensor], w_bit: int = 4, group_size: int = 128,
        n_grid: int = 20, rows_per_call: int = 64, clip: bool | None = None, rounding: str = "gptq",
        sequential: bool = True) -> dict[str, LinearCalib]:
    """Activation-aware calibration of every decoder linear of ``llm`` (a transformers causal LM), in place.

    ``calib_inputs``: input embeddings, each (T, D) or (1, T, D). The decoder layers are calibrated one
    after the other on the inputs they receive (captured at the first layer, then each layer's outputs):
    AWQ scale search and fold, clipping search (``clip``; None: only with nearest rounding), then the
    4-bit codes: ``rounding="gptq"`` chooses them with :func:`gptq` on the second moments of the layer's
    inputs (kept in the records' ``codes``), ``"nearest"`` leaves them to the swap. Clipping is off with
    GPTQ by default (:func:`nvila.formats.quant.default_clip`). ``sequential``: the next layer's inputs come from
    this layer with its weights as they will be quantized, so every layer is calibrated on what it will see
    behind the quantized layers before it (False: from the float layer, before clipping: every layer sees
    what the float model gives it).

    The float model is left with its folds and clipping applied (its output unchanged by the folds) and
    float weights; the returned per-linear records are keyed by name inside ``llm``.
    """
    if w_bit not in (2, 3, 4):
        raise ConfigError(f"AWQ here searches 2-4 bit weights, got w_bit={w_bit}")
    if rounding not in ROUNDINGS:
        raise ConfigError(f"unknown rounding {rounding!r}; choose from {list(ROUNDINGS)}")
    if not calib_inputs:
        raise ConfigError("AWQ needs at least one calibration input")
    clip = default_clip(rounding) if clip is None else clip
    calibs: dict[str, LinearCalib] = {}
    inputs = block_inputs(llm, calib_inputs)
    layers = llm_layers(llm)
    for i, layer in enumerate(layers):
        groups = block_groups(layer, f"model.layers.{i}.")
        stats = collect(llm, groups, lambda: _run_block(layer, inputs), rows_per_call, gram=True)
        scales = {g: awq_scale(stats[g], [llm.get_submodule(n).weight for n in g.linears], group_size, w_bit,
                               n_grid)[0] for g in groups if g in stats}
        block = apply_scales(llm, groups, stats, scales)
        last = i + 1 == len(layers)
        outputs = None if sequential or last else _run_block(layer, inputs)     # float (folds keep it so)
        if clip:
            apply_clipping(llm, block, group_size, w_bit, n_grid)
        if rounding == "gptq":
            for g in [g for g in groups if g in stats]:
                s = scales.get(g)                                  # the linears receive x / s
                gram = stats[g].gram / stats[g].tokens
                gram = gram / (s[:, None] * s[None, :]) if s is not None else gram
                for name in g.linears:
                    c, w = block[name], llm.get_submodule(name).weight.detach().float()
                    c.codes = gptq(w * c.pending if c.pending is not None else w, gram, group_size, w_bit)
        calibs.update(block)
        if not last:
            if sequential:
                outputs = _run_quantized(llm, layer, block, inputs, group_size, w_bit)
            inputs = [_with_hidden(call, h) for call, h in zip(inputs, outputs)]
    return calibs


def _run_quantized(llm: nn.Module, layer: nn.Module, block: dict[str, LinearCalib],
                   inputs: list[tuple[tuple, dict]], group_size: int, bits: int) -> list[torch.Tensor]:
    """The layer's outputs with its linears' weights as they will be quantized (float weights restored)."""
    saved = {}
    try:
        for name, c in block.items():
            linear = llm.get_submodule(name)
            saved[name] = linear.weight.detach().clone()
            linear.weight.data.copy_(quantized_weight(linear, c, group_size, bits).to(linear.weight.dtype))
        return _run_block(layer, inputs)
    finally:
        for name, w in saved.items():
            llm.get_submodule(name).weight.data.copy_(w)
