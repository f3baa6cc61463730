"""Configuration classes of NVILA's "-hf" folders (``model_type`` ``nvila`` / ``nvila_lite``).

Self-contained (transformers only): ``nvila convert --to hf`` copies this file into the folder, where
``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` finds it through ``auto_map``, and the nvila
package registers the same classes with transformers' Auto classes.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


def _sub_config(value: Any, default_type: str) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    d = dict(value or {})
    return AutoConfig.for_model(d.pop("model_type", default_type), **d)


class NVILAConfig(PretrainedConfig):
    """NVILA (Dynamic-S2, 2x2 projector): the LLM's config as ``text_config``, the vision tower's as
    ``vision_config``, the media token ids; converted folders also keep ``llava_config`` and
    ``mm_projector_config`` (the llava layout's own configs)."""

    model_type = "nvila"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(self, text_config: Any = None, vision_config: Any = None, image_token_id: int | None = None,
                 video_token_id: int | None = None, **kwargs: Any) -> None:
        self.text_config = _sub_config(text_config, "qwen2")
        self.vision_config = _sub_config(vision_config, "siglip_vision_model")
        self.image_token_id = -1 if image_token_id is None else image_token_id
        self.video_token_id = -1 if video_token_id is None else video_token_id
        super().__init__(**kwargs)


class NVILALiteConfig(NVILAConfig):
    """NVILA-Lite (dynamic tiling, 3x3 projector)."""

    model_type = "nvila_lite"

    # Spelled out: transformers 5 rewrites an inherited config __init__ and drops the sub-config parsing.
    def __init__(self, text_config: Any = None, vision_config: Any = None, image_token_id: int | None = None,
                 video_token_id: int | None = None, **kwargs: Any) -> None:
        super().__init__(text_config=text_config, vision_config=vision_config, image_token_id=image_token_id,
                         video_token_id=video_token_id, **kwargs)
