"""The "-hf" checkpoint format (``model_type`` ``nvila`` / ``nvila_lite``) and its mapping to the llava layout.

An "-hf" folder keeps everything at its root::

    ROOT/config.json               model_type, text_config (the LLM's config), vision_config, token ids
    ROOT/model*.safetensors        every tensor, under a per-part prefix (HF_PREFIX); nothing renamed
    ROOT/tokenizer files, chat_template.jinja, processor_config.json, processing_nvila*.py, configuration_nvila.py

The mapping is pure data: :func:`hf_config` builds the "-hf" ``config.json`` from the llava folder's configs,
:func:`llava_configs` goes back. Folders written by ``nvila convert`` also keep the llava top-level
configuration (``llava_config``) and the projector's (``mm_projector_config``), so converting back restores
them; NVIDIA's own "-hf" folders lack both and get the defaults of their model type, read from the facts
of the released checkpoints (NVILA: Dynamic-S2 at 1x/2x/3x the tile, 2x2 projector; Lite: dynamic tiling,
3x3 projector).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvila.base.errors import CheckpointError
from nvila.base.files import read_json
from nvila.formats.config import NvilaConfig, downsample_factor
from nvila.formats.layout import CONFIG, PARTS

# Key prefix of each part's tensors in the shared "-hf" safetensors (before the llava key).
HF_PREFIX = {"llm": "llm.", "vision_tower": "vision_tower.", "mm_projector": "mm_projector."}
LLAVA_MODEL_TYPE = "llava_llama"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"
PROCESSOR_CONFIG = "processor_config.json"
CONFIGURATION_FILE = "configuration_nvila.py"    # self-contained config classes (nvila.hf_remote)
MODELING_FILE = "modeling_nvila.py"              # imports the model from the installed nvila
# Root files that belong to the "-hf" form only; the other non-weight root files are the LLM's (tokenizer,
# chat template, generation config) except preprocessor_config.json, the vision tower's.
HF_ONLY_FILES = (CONFIG, PROCESSOR_CONFIG, "README.md", ".gitattributes")


@dataclass(frozen=True)
class HfType:
    """One "-hf" model type: its names and the release defaults for folders without ``llava_config``."""

    model_type: str
    architecture: str
    config_class: str
    processor_module: str
    processor_class: str
    projector_type: str              # default projector (NVILA-8B: mlp_downsample; Lite: mlp_downsample_3x3_fix)
    image_mode: str


HF_TYPES = {
    "nvila": HfType("nvila", "NVILAForConditionalGeneration", "NVILAConfig", "processing_nvila", "NVILAProcessor",
                    "mlp_downsample", "dynamic_s2"),
    "nvila_lite": HfType("nvila_lite", "NVILALiteForConditionalGeneration", "NVILALiteConfig",
                         "processing_nvila_lite", "NVILALiteProcessor", "mlp_downsample_3x3_fix", "dynamic"),
}


def hf_type_for(projector_type: str) -> HfType:
    """The "-hf" type of a model: by its projector's block side, as the "-hf" consumers build their projector
    from the model type (2x2 -> ``nvila``, 3x3 -> ``nvila_lite``)."""
    return HF_TYPES["nvila_lite" if downsample_factor(projector_type) == 3 else "nvila"]


def folder_layout(root: Path) -> str | None:
    """``"hf"`` for a folder whose config.json has an "-hf" model type, ``"llava"`` for one with the llava
    sub-folders, None for anything else (the loader then says what each layout needs)."""
    if (root / CONFIG).is_file():
        try:
            model_type = read_json(root / CONFIG).get("model_type")
        except (CheckpointError, ValueError, AttributeError):
            model_type = None
        if model_type in HF_TYPES:
            return "hf"
    if all((root / part).is_dir() for part in PARTS):
        return "llava"
    return None


def hf_config(top: dict[str, Any], llm: dict[str, Any], vision: dict[str, Any], projector: dict[str, Any],
              image_token_id: int, video_token_id: int) -> dict[str, Any]:
    """The "-hf" ``config.json`` of a llava-layout model (top-level, llm/, vision_tower/, mm_projector/ configs)."""
    kind = hf_type_for(str(projector.get("mm_projector_type")))
    return {
        "architectures": [kind.architecture],
        "model_type": kind.model_type,
        "auto_map": {"AutoConfig": f"{CONFIGURATION_FILE[:-3]}.{kind.config_class}",
                     "AutoModel": f"{MODELING_FILE[:-3]}.{kind.architecture}",
                     "AutoModelForImageTextToText": f"{MODELING_FILE[:-3]}.{kind.architecture}"},
        "text_config": llm,
        "vision_config": vision,
        "image_token_id": int(image_token_id),
        "video_token_id": int(video_token_id),
        "torch_dtype": llm.get("torch_dtype", llm.get("dtype", "bfloat16")),
        "mm_projector_config": projector,
        "llava_config": top,
    }


def llava_configs(hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"": top-level, "llm": ..., "vision_tower": ..., "mm_projector": ...}`` configs of an "-hf" config."""
    kind = HF_TYPES.get(hf.get("model_type"))   # type: ignore[arg-type]
    if kind is None:
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}; an '-hf' folder has "
                              f"{' or '.join(sorted(HF_TYPES))}")
    missing = [k for k in ("text_config", "vision_config") if not isinstance(hf.get(k), dict)]
    if missing:
        raise CheckpointError(f"the '-hf' config.json has no {' or '.join(missing)} (dicts of the LLM's and the "
                              "vision tower's transformers configs)")
    llm, vision = dict(hf["text_config"]), dict(hf["vision_config"])
    projector = hf.get("mm_projector_config") or {"architectures": ["MultimodalProjector"],
                                                  "mm_projector_type": kind.projector_type,
                                                  "model_type": "v2l_projector"}
    top = hf.get("llava_config")
    if top is None:
        tile = int(vision.get("image_size", 448))
        scales = (tile, 2 * tile, 3 * tile) if kind.image_mode == "dynamic_s2" else ()
        cfg = NvilaConfig.for_parts(llm, vision, projector["mm_projector_type"], kind.image_mode,  # type: ignore[arg-type]
                                    s2_scales=scales)
        top = cfg.to_official()
    return {"": dict(top), "llm": llm, "vision_tower": vision, "mm_projector": dict(projector)}


# The model entry the "-hf" folder's auto_map names: the model is nvila's own, so it needs nvila installed.
MODELING_SOURCE = '''"""NVILA for transformers' Auto classes. The model code is the nvila package's (``pip install nvila``)."""

try:
    from nvila.hf.modeling import NVILAForConditionalGeneration, NVILALiteForConditionalGeneration  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("this NVILA checkpoint's model class is provided by the nvila package: pip install nvila") from e
'''
