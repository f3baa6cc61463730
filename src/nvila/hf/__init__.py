"""NVILA in transformers' Auto classes: importing this package registers ``model_type`` ``nvila`` and
``nvila_lite`` with ``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText`` and ``AutoProcessor``
(transformers' documented way for out-of-tree models)::

    import nvila.hf  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("NVILA-Lite-2B-hf")
    processor = AutoProcessor.from_pretrained("NVILA-Lite-2B-hf")
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from nvila.hf.modeling import NVILAForConditionalGeneration, NVILALiteForConditionalGeneration
from nvila.hf_remote.configuration_nvila import NVILAConfig, NVILALiteConfig
from nvila.hf_remote.processing_nvila import NVILALiteProcessor, NVILAProcessor

__all__ = ["NVILAConfig", "NVILALiteConfig", "NVILAForConditionalGeneration", "NVILALiteForConditionalGeneration",
           "NVILAProcessor", "NVILALiteProcessor", "register"]


def register() -> None:
    """Register the classes (idempotent; done on import)."""
    for config, model, processor in ((NVILAConfig, NVILAForConditionalGeneration, NVILAProcessor),
                                     (NVILALiteConfig, NVILALiteForConditionalGeneration, NVILALiteProcessor)):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoModelForImageTextToText.register(config, model, exist_ok=True)
        AutoProcessor.register(config, processor, exist_ok=True)


register()
