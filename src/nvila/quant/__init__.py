"""Deployment quantization: W8A8 vision tower (SmoothQuant) + W4A16 or W8A16 LLM (AWQ/GPTQ, round-to-nearest).

Layout of the package, in the order the data flows (the quantized modules themselves and their kernels are
part of the model layer, :mod:`nvila.model.quantized`; loading quantized folders is
:mod:`nvila.checkpoint.quant`; the settings and file format are :mod:`nvila.formats.quant`)::

    data.py       calibration data (image folder or training file) -> processed prompts
    calibrate.py  linear groups, activation statistics, folds; SmoothQuant
    awq.py        AWQ scale and clipping searches, GPTQ rounding, layer-by-layer LLM calibration
    model.py      quantize_model / quantize_pipeline: calibrate, swap, per-layer error report

Typical use (what ``nvila quantize`` does)::

    pipe = nvila.load(path, dtype="float32", device="cpu", fast=False)
    result = quantize_pipeline(pipe, QuantSpec(vision="w8a8", llm="w4a16"), calibration_prompts(pipe.processor))
    pipe.save(out)                  # official layout + quant_config.json; nvila.load(out) reads it back
"""

from nvila.formats.quant import QuantSpec
from nvila.quant.data import calibration_prompts
from nvila.quant.model import QuantResult, quantize_model, quantize_pipeline

__all__ = ["QuantSpec", "QuantResult", "calibration_prompts", "quantize_model", "quantize_pipeline"]
