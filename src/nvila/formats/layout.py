"""Names of the official checkpoint layout and of nvila's adapter and quantized folders.

    ROOT/config.json                 LLaVA-style top-level config (nvila.formats.config)
    ROOT/llm/                        transformers causal LM + tokenizer files
    ROOT/vision_tower/               SiglipVisionModel (or Dinov2Model) + preprocessor_config.json
    ROOT/mm_projector/               projector weights, keys layers.{i}.*
    ROOT/quant_config.json           only in quantized folders (nvila.formats.quant)

    ADAPTER/adapter_config.json                peft LoraConfig            } standard peft format
    ADAPTER/adapter_model.safetensors          LLM LoRA tensors           }
    ADAPTER/non_lora_trainables.safetensors    projector, ViT LayerNorms, ... (NvilaModel parameter names)
    ADAPTER/nvila_adapter.json                 format version, base model, LoRA settings, trained parts
"""

from __future__ import annotations

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
PARTS = ("llm", "vision_tower", "mm_projector")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")
SHARD_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
QUANT_CONFIG = "quant_config.json"

# Official key prefix of each part's tensors -> prefix inside our module.
KEY_PREFIX = {"vision_tower": ("vision_model.", ""), "mm_projector": ("", ""), "llm": ("", "")}
# Vision classes whose official tensor names have no "vision_model." prefix (they are the whole model).
UNPREFIXED_VISION = ("Dinov2Model",)

# LoRA adapter folders
ADAPTER_CONFIG, ADAPTER_LORA = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_OTHER, ADAPTER_META = "non_lora_trainables.safetensors", "nvila_adapter.json"
ADAPTER_FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."        # what PeftModel puts before the LLM's own keys on disk
LORA_MARK = "lora_"                      # peft's prefix of every LoRA parameter name


def key_prefix(module: object, part: str) -> tuple[str, str]:
    """(official key prefix, module key prefix) of a part's tensors; ``module`` is the part's model."""
    if part == "vision_tower" and type(module).__name__ in UNPREFIXED_VISION:
        return "", ""
    return KEY_PREFIX[part]


def official_name(module: object, part: str, name: str) -> str:
    """A name inside our part module -> the same name in the official safetensors."""
    src, dst = key_prefix(module, part)
    return src + name[len(dst):]
