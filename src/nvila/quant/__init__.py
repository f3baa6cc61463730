"""Deployment quantization: W8A8 vision tower (SmoothQuant) + W4A16 or W8A16 LLM (AWQ / round-to-nearest).

Layout of the package, in the order the data flows::

    data.py       calibration data (image folder or training file) -> processed prompts
    calibrate.py  activation statistics with forward hooks; SmoothQuant and AWQ scales, folded into the
                  preceding norm/linear where the structure allows (output-preserving in float)
    linear.py     W8A8Linear, W8A16Linear, W4A16Linear: module swaps for nn.Linear (QUANTIZERS registry)
    kernels.py    torch's fused integer ops and the measured rule for when to use them
    model.py      quantize_model / quantize_pipeline: calibrate, swap, per-layer error report
    config.py     quant_config.json; rebuilding quantized modules when a checkpoint folder is loaded

Typical use (what ``nvila quantize`` does)::

    pipe = nvila.load(path, dtype="float32", device="cpu", fast=False)
    result = quantize_pipeline(pipe, vision="w8a8", llm="w4a16", calib=calibration_prompts(pipe.processor))
    pipe.save(out)                  # official layout + quant_config.json; nvila.load(out) reads it back
"""

from __future__ import annotations

from nvila.quant.calibrate import awq, smoothquant
from nvila.quant.data import calibration_prompts
from nvila.quant.linear import QUANTIZERS, QuantLinear, W4A16Linear, W8A8Linear, W8A16Linear
from nvila.quant.model import LLM_SCHEMES, VISION_SCHEMES, QuantResult, quantize_model, quantize_pipeline

__all__ = ["awq", "smoothquant", "calibration_prompts", "QUANTIZERS", "QuantLinear", "W4A16Linear", "W8A8Linear",
           "W8A16Linear", "LLM_SCHEMES", "VISION_SCHEMES", "QuantResult", "quantize_model", "quantize_pipeline"]
