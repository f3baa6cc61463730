"""nvila: NVILA vision-language models — inference, serving, fine-tuning and deployment.

    import nvila
    pipe = nvila.load("path/to/NVILA-Lite-2B")
    print(pipe.chat([{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                                  {"type": "text", "text": "Describe it."}]}]))
"""

from __future__ import annotations

import logging
from typing import Any

from nvila.base.errors import CheckpointError, ConfigError, MediaError, NvilaError, PromptError

# torchao (FP8 training) is imported by transformers whenever it is installed. nvila uses only its float8
# training (pure PyTorch over torch._scaled_mm); its compiled extensions fail to load on CPU-only and mismatched
# builds with a warning each, and its enums trip a pytree deprecation warning of torch 2.13: both silenced.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "Generation", "SamplingParams", "NvilaError", "MediaError", "CheckpointError",
           "ConfigError", "PromptError", "__version__"]

_LAZY = {"load": "nvila.api", "Pipeline": "nvila.api", "Generation": "nvila.api", "SamplingParams": "nvila.generate"}


def __getattr__(name: str) -> Any:
    # torch/transformers load only when the model API is first used, so `nvila --help` stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nvila' has no attribute {name!r}")
