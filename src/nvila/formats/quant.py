"""Quantization settings (:class:`QuantSpec`) and the ``quant_config.json`` of a quantized checkpoint.

A quantized checkpoint is the official layout plus ``ROOT/quant_config.json``::

    {"format_version": 1,
     "vision": {"scheme": "w8a8", "method": "smoothquant", "alpha": 0.3, ...} | null,
     "llm": {"scheme": "w4a16", "method": "awq", "w_bit": 4, "group_size": 128, ...} | null,
     "group_size": 128,
     "calibration": {"prompts": 64, "tiles": 64},
     "modules": [{"part": "llm", "name": "model.layers.0.self_attn.q_proj", "scheme": "w4a16",
                  "in_features": 1536, "out_features": 1536, "bias": true, "input_scale": false,
                  "group_size": 128}, ...]}

``modules`` is what loading reads: ``name`` is the official tensor-name prefix inside the part's
safetensors, so the layer's tensors are ``{name}.weight``, ``{name}.weight_scale``, ``{name}.weight_zero``
(W4A16), ``{name}.bias`` and ``{name}.input_scale`` (when ``input_scale`` is true), with the shapes and
dtypes of :mod:`nvila.model.quantized`. Everything else in the folder is an ordinary float checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nvila.base.errors import ConfigError

FORMAT_VERSION = 1
ENTRY_FIELDS = ("part", "name", "scheme", "in_features", "out_features", "bias", "input_scale")
VISION_SCHEMES = ("w8a8",)
LLM_SCHEMES = ("w4a16", "w8a16", "w8a8")
METHODS = {"w8a8": "smoothquant", "w4a16": "awq", "w8a16": "round-to-nearest"}
ROUNDINGS = ("nearest", "gptq")
GROUP_SIZES = (32, 64, 128, 256)          # what the fused 4-bit kernels accept


# W8A8 activations are quantized at run time by the kernel the machine runs (nvila.model.kernels)
ACTIVATIONS = "int8, dynamic: per token (oneDNN/CUDA/reference) or per call, 7-bit (FBGEMM on AVX2)"


def default_clip(rounding: str) -> bool:
    """AWQ's clipping search by default only with nearest rounding: GPTQ works on the clipped weight and
    cannot compensate the clamp itself (measured: higher per-layer error and next-token KL with it)."""
    return rounding == "nearest"


def check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ConfigError(f"group size {group_size!r} is not supported; use one of {list(GROUP_SIZES)}")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a model; validated when made, so a bad setting fails before any slow work.

    ``vision``/``llm``: scheme or None (left float). ``group_size``: W4A16 input channels per scale.
    ``alpha``: SmoothQuant migration strength (vision tower); ``llm_alpha``: the same for a W8A8 LLM.
    ``n_grid``: AWQ grid points. ``rows_per_call``: calibration
    rows kept per forward call and linear input. ``bias_correction``: add every weight-only LLM layer's mean
    output error over the calibration inputs to its bias. ``rounding`` (W4A16): ``gptq`` or ``nearest``.
    ``sequential``: calibrate each decoder layer behind the already quantized ones. ``clip``: AWQ's
    clipping search; None means on only with nearest rounding (GPTQ cannot compensate the clamp).
    """

    vision: str | None = "w8a8"
    llm: str | None = "w4a16"
    group_size: int = 128
    alpha: float = 0.3
    llm_alpha: float = 0.5
    n_grid: int = 20
    rows_per_call: int = 64
    bias_correction: bool = False
    rounding: str = "gptq"
    sequential: bool = True
    clip: bool | None = None

    def __post_init__(self) -> None:
        if self.vision is not None and self.vision not in VISION_SCHEMES:
            raise ConfigError(f"vision scheme {self.vision!r} is not supported; choose from {list(VISION_SCHEMES)} "
                              "or none")
        if self.llm is not None and self.llm not in LLM_SCHEMES:
            raise ConfigError(f"LLM scheme {self.llm!r} is not supported; choose from {list(LLM_SCHEMES)} or none")
        if self.vision is None and self.llm is None:
            raise ConfigError("nothing to quantize: both the vision scheme and the LLM scheme are none")
        if self.llm == "w4a16":
            check_group_size(self.group_size)
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"unknown rounding {self.rounding!r}; choose from {list(ROUNDINGS)}")
        for name in ("alpha", "llm_alpha"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"SmoothQuant {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("n_grid", "rows_per_call"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.clip is None:
            object.__setattr__(self, "clip", default_clip(self.rounding))

    def to_config(self, prompts: int, tiles: int, modules: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``quant_config.json`` contents for a model quantized with these settings."""
        llm_entry = None
        if self.llm is not None:
            llm_entry = {"scheme": self.llm, "method": METHODS[self.llm], "bias_correction": self.bias_correction}
            if self.llm == "w8a8":
                llm_entry.update(alpha=self.llm_alpha, activations=ACTIVATIONS)
            elif self.llm == "w4a16":
                llm_entry.update(w_bit=4, group_size=self.group_size, zero_point=True, rounding=self.rounding,
                                 sequential=self.sequential, clip=self.clip)
        vision_entry = None
        if self.vision is not None:
            vision_entry = {"scheme": self.vision, "method": METHODS[self.vision], "alpha": self.alpha,
                            "activations": ACTIVATIONS}
        return {"format_version": FORMAT_VERSION, "vision": vision_entry, "llm": llm_entry,
                "group_size": self.group_size, "calibration": {"prompts": prompts, "tiles": tiles},
                "modules": modules}
