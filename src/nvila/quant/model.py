"""Quantize a loaded NVILA model: calibrate, swap the linears, measure each layer's error.

    calibration prompts --(vision tiles)--> SmoothQuant fold --> W8A8 swap of every ViT encoder linear
                        --(fused embeddings through the quantized ViT)--> AWQ fold --> W4A16/W8A16 swap of
                                                                                  every LLM decoder linear
                                                                   (or SmoothQuant fold --> W8A8 swap)

The LLM is calibrated on embeddings produced by the already quantized vision tower, as it will see them.
The projector, the embeddings, the LM head and all norms stay float. Each swapped linear is compared with
the float linear it replaces on the calibration inputs it received (relative output error, the
``report``); :func:`quantize_pipeline` also updates the checkpoint records so that ``Pipeline.save``
writes a quantized checkpoint folder (see :mod:`nvila.checkpoint.quant`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from nvila.base.errors import ConfigError
from nvila.base.files import json_bytes
from nvila.checkpoint.quant import module_entry
from nvila.formats.layout import QUANT_CONFIG, official_name
from nvila.formats.quant import QuantSpec
from nvila.model.quantized import QUANTIZERS, QuantLinear, fuse_w8a8_mlps, is_quantized, replace_module
from nvila.quant.awq import awq, llm_groups
from nvila.quant.calibrate import LinearCalib, plain, smooth, smoothquant


@dataclass
class QuantResult:
    """What :func:`quantize_model` did: the quant_config.json contents and the per-layer error report."""

    config: dict[str, Any] = field(default_factory=dict)
    report: list[dict[str, Any]] = field(default_factory=list)   # per layer: part, name, scheme, smoothing, rel_error
    modules: list[dict[str, Any]] = field(default_factory=list)  # quant_config.json "modules" entries
    folded: dict[str, set[str]] = field(default_factory=dict)    # part -> official names of ops that absorbed a scale

    def summary(self) -> dict[str, Any]:
        """Per part: layer count, mean and max relative error over the layers that saw calibration data."""
        out: dict[str, Any] = {}
        for part in ("vision_tower", "llm"):
            rows = [r for r in self.report if r["part"] == part]
            errs = [r for r in rows if r["rel_error"] is not None]
            if rows:
                worst = max(errs, key=lambda r: r["rel_error"]) if errs else None
                out[part] = {"layers": len(rows), "calibrated": len(errs),
                             "mean_rel_error": sum(r["rel_error"] for r in errs) / len(errs) if errs else None,
                             "max_rel_error": worst["rel_error"] if worst else None,
                             "worst_layer": worst["name"] if worst else None}
        return out


def quantize_model(model: nn.Module, spec: QuantSpec, calib: Sequence[Any]) -> QuantResult:
    """Quantize an :class:`~nvila.model.nvila.NvilaModel` in place as ``spec`` says.

    ``calib``: processed prompts (:class:`~nvila.formats.plans.Prompt`, e.g. from
    :func:`nvila.quant.data.calibration_prompts`); their media tiles calibrate the vision tower and their
    fused embeddings the LLM. With ``spec.bias_correction`` every weight-only LLM layer's bias takes its mean
    output error over the calibration inputs, E[x](W - W_q)^T (layers without a bias get one), so 4-bit
    rounding does not shift the layer's average output.
    """
    if is_quantized(model):
        raise ConfigError("the model is already quantized; quantize the float checkpoint instead")
    if not calib:
        raise ConfigError("quantization needs calibration prompts (none were given)")
    result = QuantResult()
    tiles = [m.pixels for p in calib for m in p.media]
    if spec.vision is not None:
        if not tiles:
            raise ConfigError("quantizing the vision tower needs calibration prompts with images or videos")
        calibs = smoothquant(model.vision, tiles, spec.alpha, model.vision_batch_size, spec.rows_per_call)
        _swap_part(model.vision.model, "vision_tower", calibs, spec.vision, spec.group_size, result)
        fuse_w8a8_mlps(model.vision.model)
    if spec.llm is not None:
        with torch.no_grad():
            embeds = [model.embed_prompt(p.input_ids, p.media) for p in calib]            # (L_fused, D) each
        run = lambda: [model.llm(inputs_embeds=e[None], logits_to_keep=1) for e in embeds]   # noqa: E731
        if spec.llm == "w8a8":
            calibs = smooth(model.llm, llm_groups(model.llm), run, spec.llm_alpha, spec.rows_per_call)
        elif spec.llm == "w4a16":
            calibs = awq(model.llm, embeds, 4, spec.group_size, spec.n_grid, spec.rows_per_call, clip=spec.clip,
                         rounding=spec.rounding, sequential=spec.sequential)
        else:
            calibs = plain(model.llm, llm_groups(model.llm), run, spec.rows_per_call)
        _swap_part(model.llm, "llm", calibs, spec.llm, spec.group_size, result,
                   spec.bias_correction and spec.llm != "w8a8")
    result.config = spec.to_config(len(calib), sum(t.shape[0] for t in tiles), result.modules)
    return result


def _swap_part(root: nn.Module, part: str, calibs: dict[str, LinearCalib], scheme: str, group_size: int,
               result: QuantResult, bias_correction: bool = False) -> None:
    """Replace every calibrated linear of ``root`` by its quantized module and record its error."""
    for name, c in calibs.items():
        linear = root.get_submodule(name)
        extra = {"codes": c.codes} if c.codes is not None else {}
        new = QUANTIZERS[scheme].from_float(linear, input_scale=c.pending, group_size=group_size, **extra)
        x = c.inputs()
        x = x.to(linear.weight.dtype) if x is not None else None
        if bias_correction and x is not None:
            correct_bias(new, linear, x, c.reference)
        err = relative_error(new, linear, x, c.reference) if x is not None else None
        replace_module(root, name, new)
        official = official_name(root, part, name)
        smoothing = "folded" if c.folded is not None else "input_scale" if c.pending is not None else "none"
        result.report.append({"part": part, "name": official, "scheme": scheme, "smoothing": smoothing,
                              "rel_error": err})
        result.modules.append(module_entry(part, official, new))
        if c.folded_into is not None:
            result.folded.setdefault(part, set()).add(official_name(root, part, c.folded_into))


@torch.no_grad()
def correct_bias(quantized: QuantLinear, linear: nn.Module, x: torch.Tensor,
                 reference: torch.Tensor | None = None) -> None:
    """Add mean_rows(f(x) - q(x)) to the quantized layer's bias (created if the float layer had none)."""
    ref = linear(x).float() if reference is None else reference.float()
    delta = (ref - quantized(x).float()).mean(dim=0)
    if quantized.bias is None:
        quantized.bias = delta.to(linear.weight.dtype)      # a registered buffer slot: saved and loaded
    else:
        quantized.bias.add_(delta.to(quantized.bias.dtype))


@torch.no_grad()
def relative_error(quantized: nn.Module, linear: nn.Module, x: torch.Tensor,
                   reference: torch.Tensor | None = None) -> float:
    """||q(x) - f(x)|| / ||f(x)|| over the rows of ``x`` (bias included on both sides).

    ``reference``: f(x) computed before calibration changed the float weight (AWQ clipping), if it did.
    """
    ref = linear(x).float() if reference is None else reference.float()
    return ((quantized(x).float() - ref).norm() / ref.norm().clamp(min=1e-12)).item()


def quantize_pipeline(pipe: Any, spec: QuantSpec, calib: Sequence[Any]) -> QuantResult:
    """:func:`quantize_model` on a Pipeline's model, then prepare its checkpoint records for ``pipe.save``.

    Tensors the quantizer wrote (quantized layers, norms and linears that absorbed a scale) are saved
    as computed instead of being cast back to the dtype the float checkpoint stored them in.
    """
    result = quantize_model(pipe.model, spec, calib)
    records = pipe.checkpoint.records
    written: dict[str, set[str]] = {}
    for r in result.report:
        written.setdefault(r["part"], set()).add(r["name"])
    for part, names in result.folded.items():
        written.setdefault(part, set()).update(names)
    for part, names in written.items():
        dtypes = records[part].dtypes
        for key in [k for k in dtypes if k.rpartition(".")[0] in names]:
            del dtypes[key]
    records[""].files[QUANT_CONFIG] = json_bytes(result.config)
    pipe.media_cache.clear()     # encodings made by the float vision tower
    return result
