"""Calibration: SmoothQuant (vision tower, W8A8) as an output-preserving rescaling, and the machinery it
shares with AWQ (:mod:`nvila.quant.awq`): linear groups, activation statistics, folds.

Both methods move a per-input-channel scale s (K,) between a linear's input and its weight, which leaves
the float output unchanged::

    y = x W^T = (x / s) (W diag(s))^T

SmoothQuant picks s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) from the activation maxima, which moves
the outliers of a few activation channels into the weights so that per-token int8 activations lose less.

Linears that read the same input form a :class:`Group` and share one scale. The division by s goes
into the op that produced the input when that op is linear in its output channels: a LayerNorm/RMSNorm
(weight and bias), or a Linear's rows (``v_proj`` -> ``out_proj``/``o_proj`` where the widths match,
``up_proj`` -> ``down_proj``). Such a fold is applied to the float model at once. Otherwise the scale
stays *pending* in the returned :class:`LinearCalib`: the swap to a quantized linear multiplies it into
the weight and keeps 1/s as the layer's ``input_scale`` buffer. Which op feeds which linear is
architecture knowledge, kept in one table, :data:`BLOCK_GROUPS`; linears it does not cover get their
own group with a pending scale.

Activations are collected with forward pre-hooks: per input channel the maximum and the mean of |x| over
every calibration token, a sample of rows (evenly spaced tokens of each call) for the searches and the
error report, and for GPTQ the second moments sum x^T x. The vision tower is collected in one float pass
(rescaling preserves float outputs, so the statistics stay valid for every group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from nvila.base.errors import ConfigError

# Transformer block class -> (op producing the input, linears reading it), names relative to the block.
_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_DECODER = [("input_layernorm", _ATTN_QKV), ("self_attn.v_proj", ("self_attn.o_proj",)),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), ("mlp.up_proj", ("mlp.down_proj",))]
BLOCK_GROUPS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "SiglipEncoderLayer": [("layer_norm1", _ATTN_QKV), ("self_attn.v_proj", ("self_attn.out_proj",)),
                           ("layer_norm2", ("mlp.fc1",))],
    "Dinov2Layer": [("norm1", ("attention.attention.query", "attention.attention.key", "attention.attention.value")),
                    ("attention.attention.value", ("attention.output.dense",)), ("norm2", ("mlp.fc1",))],
    "Qwen2DecoderLayer": _DECODER,
    "LlamaDecoderLayer": _DECODER,
}
# Norms whose output is normalized(x) * weight (+ bias): dividing weight and bias by s divides the output.
FOLDABLE_NORMS = ("LayerNorm", "Qwen2RMSNorm", "LlamaRMSNorm")


@dataclass(frozen=True)
class Group:
    """Linears reading the same input, and the op the shared scale folds into (None: pending)."""

    prev: str | None
    linears: tuple[str, ...]


@dataclass
class InputStats:
    """Statistics of one group's input over the calibration pass."""

    absmax: torch.Tensor            # (K,) max |x| per channel, float32
    abssum: torch.Tensor            # (K,) sum |x| per channel, float32
    tokens: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)   # sampled (r, K) float32 blocks
    gram: torch.Tensor | None = None  # (K, K) sum of x^T x over every token (GPTQ), when collected

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)                               # (R, K)


@dataclass
class LinearCalib:
    """What calibration decided for one linear (names relative to the calibrated module)."""

    rows: torch.Tensor | None       # (R, K) sampled inputs seen in the float pass; None: never ran
    folded: torch.Tensor | None     # (K,) scale already divided into the producing op (inputs now x / s)
    pending: torch.Tensor | None    # (K,) scale still to move at the swap (weight * s, input_scale 1 / s)
    folded_into: str | None = None  # name of the op that absorbed ``folded``
    reference: torch.Tensor | None = None  # (R, N) float outputs on ``inputs()`` before clipping changed the weight
    codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # GPTQ's (codes, scale, zero), see gptq()

    def inputs(self) -> torch.Tensor | None:
        """The sampled inputs as the linear now receives them (after any fold)."""
        if self.rows is None:
            return None
        return self.rows / self.folded if self.folded is not None else self.rows


# ---- groups and statistics ------------------------------------------------------------------------
def find_groups(blocks: Sequence[nn.Module], prefix: str) -> list[Group]:
    """Groups of every block (``{prefix}{i}.`` names); blocks or linears the table misses get singletons."""
    return [g for i, block in enumerate(blocks) for g in block_groups(block, f"{prefix}{i}.")]


def block_groups(block: nn.Module, base: str) -> list[Group]:
    """Groups of one block whose names inside the calibrated module start with ``base``."""
    groups: list[Group] = []
    covered: set[str] = set()
    for prev, names in BLOCK_GROUPS.get(type(block).__name__, []):
        mods = [_get(block, n) for n in names]
        if any(not isinstance(m, nn.Linear) for m in mods) or len({m.in_features for m in mods}) != 1:
            continue
        fold = prev if _foldable(_get(block, prev), mods[0].in_features) else None
        groups.append(Group(base + fold if fold else None, tuple(base + n for n in names)))
        covered.update(names)
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) and name not in covered:
            groups.append(Group(None, (base + name,)))
    return groups


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _foldable(op: nn.Module | None, width: int) -> bool:
    """True when dividing ``op``'s output channels by a scale is exact: a plain norm or a Linear of that width."""
    if isinstance(op, nn.Linear):
        return op.out_features == width
    weight = getattr(op, "weight", None)
    return type(op).__name__ in FOLDABLE_NORMS and weight is not None and tuple(weight.shape) == (width,)


def collect(root: nn.Module, groups: Sequence[Group], run: Callable[[], None],
            rows_per_call: int = 64, gram: bool = False) -> dict[Group, InputStats]:
    """Run ``run()`` (float forward passes through ``root``) and gather each group's input statistics.

    ``gram``: also sum x^T x over every token (K x K per group, for GPTQ). Groups whose linears never ran
    (e.g. vision layers after the selected one) are absent from the result.
    """
    stats: dict[Group, InputStats] = {}

    def hook(group: Group) -> Callable[[nn.Module, tuple], None]:
        def record(_: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()                 # (T, K)
            s = stats.setdefault(group, InputStats(torch.zeros(x.shape[1], device=x.device),
                                                   torch.zeros(x.shape[1], device=x.device)))
            s.absmax = torch.maximum(s.absmax, x.abs().amax(0))
            s.abssum += x.abs().sum(0)
            s.tokens += x.shape[0]
            if gram:
                s.gram = x.t() @ x if s.gram is None else s.gram.addmm_(x.t(), x)
            pick = torch.linspace(0, x.shape[0] - 1, min(rows_per_call, x.shape[0]), device=x.device).long()
            s.rows.append(x[pick].clone())
        return record

    handles = [root.get_submodule(g.linears[0]).register_forward_pre_hook(hook(g)) for g in groups]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return stats


def fold(root: nn.Module, group: Group, s: torch.Tensor) -> None:
    """Divide the producing op's output channels by s and multiply the group's weight columns by s."""
    with torch.no_grad():
        prev = root.get_submodule(group.prev)
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
        for name in group.linears:
            w = root.get_submodule(name).weight
            w.mul_(s.to(w.dtype))


def apply_scales(root: nn.Module, groups: Sequence[Group], stats: dict[Group, InputStats],
                 scales: dict[Group, torch.Tensor]) -> dict[str, LinearCalib]:
    """Fold every foldable scale now; return each linear's calibration record (pending scales included)."""
    out: dict[str, LinearCalib] = {}
    for g in groups:
        s = scales.get(g)
        if s is not None and g.prev is not None:
            fold(root, g, s)
        rows = stats[g].sample() if g in stats else None
        folded = s is not None and g.prev is not None
        for name in g.linears:
            out[name] = LinearCalib(rows, s if folded else None, s if not folded else None,
                                    g.prev if folded else None)
    return out


# ---- SmoothQuant ---------------------------------------------------------------------------------
def vision_groups(vision_model: nn.Module) -> list[Group]:
    """Groups of a transformers vision model (SigLIP ``encoder.layers``, DINOv2 ``encoder.layer``)."""
    from nvila.model.vision import encoder_layers

    layers = encoder_layers(vision_model)
    name = "encoder.layers." if getattr(vision_model.encoder, "layers", None) is not None else "encoder.layer."
    return find_groups(layers, name)


def smooth_scale(stats: InputStats, weights: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = max|x|^alpha / max|W|^(1 - alpha) per input channel (maxima over every weight of the group)."""
    wmax = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    s = stats.absmax.clamp(min=1e-5).pow(alpha) / wmax.to(stats.absmax.device).pow(1 - alpha)
    return s.clamp(min=1e-5)


def smoothquant(vision: nn.Module, tiles: torch.Tensor | Sequence[torch.Tensor], alpha: float = 0.3,
                batch: int = 32, rows_per_call: int = 64) -> dict[str, LinearCalib]:
    """Smooth every encoder linear of a :class:`~nvila.model.vision.VisionTower` on calibration tiles.

    ``tiles``: (N, 3, S, S) pixels (or a list of such), run ``batch`` at a time. Folds in place (the float
    output is unchanged) and returns per-linear records keyed by name inside ``vision.model``. Layers the
    tower never runs get no scale.
    """
    pixels = torch.cat(list(tiles)) if not isinstance(tiles, torch.Tensor) else tiles
    if pixels.numel() == 0:
        raise ConfigError("SmoothQuant needs at least one calibration image tile")
    model = vision.model
    return smooth(model, vision_groups(model), lambda: [vision(chunk) for chunk in pixels.split(batch)], alpha,
                  rows_per_call)


def smooth(root: nn.Module, groups: Sequence[Group], run: Callable[[], None], alpha: float,
           rows_per_call: int = 64) -> dict[str, LinearCalib]:
    """SmoothQuant over ``groups`` of ``root``, with activation maxima from one float pass (``run``): the
    vision tower on its tiles, or a decoder on calibration embeddings (W8A8 LLM)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    stats = collect(root, groups, run, rows_per_call)
    scales = {g: smooth_scale(stats[g], [root.get_submodule(n).weight for n in g.linears], alpha)
              for g in groups if g in stats}
    return apply_scales(root, groups, stats, scales)


def plain(root: nn.Module, groups: Sequence[Group], run: Callable[[], None],
          rows_per_call: int = 64) -> dict[str, LinearCalib]:
    """No rescaling (round-to-nearest weights): only the sampled inputs, for the error report."""
    return apply_scales(root, groups, collect(root, groups, run, rows_per_call), {})
