"""Architecture presets of the released NVILA models, and random checkpoints with their exact shapes.

``nvila random-checkpoint --preset nvila-lite-2b --out DIR`` writes a randomly initialised checkpoint in
the official layout, so speed and memory can be measured at real sizes without downloading anything.
The tokenizer is a stand-in (the first 8187 Qwen2 BPE ranks + the release's special tokens, shipped in
``nvila/assets/standin_tokenizer``); the embedding matrices keep the real 151648-row vocabulary.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from nvila.checkpoint import PartRecord, atomic_dir, commit_dir, part_state, save_part
from nvila.errors import ConfigError

SIGLIP_SO400M_448 = {
    "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model", "hidden_size": 1152,
    "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14,
    "image_size": 448, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3,
    "attention_dropout": 0.0, "vision_use_head": False,
}


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, tied: bool, max_len: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "vocab_size": 151648, "tie_word_embeddings": tied,
        "bos_token_id": 151643, "eos_token_id": 151645, "use_sliding_window": False, "sliding_window": None,
        "model_max_length": max_len, "tokenizer_model_max_length": max_len,
    }


QWEN25_1_5B = _qwen2(1536, 8960, 28, 12, 2, True, 4096)
QWEN25_7B = _qwen2(3584, 18944, 28, 28, 4, False, 8192)
QWEN25_14B = _qwen2(5120, 13824, 48, 40, 8, False, 8192)

S2 = {"image_aspect_ratio": "dynamic_s2", "dynamic_s2": True, "s2_scales": "448,896,1344", "s2_max_split_size": 448,
      "s2_resize_output_to_scale_idx": -1}
LITE = {"image_aspect_ratio": "dynamic", "dynamic_s2": False}
TSP = '{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}'

# name -> (top-level config entries, LLM config, projector type)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "nvila-8b": ({**S2, "mm_hidden_size": 3456, "num_video_frames": 8}, QWEN25_7B, "mlp_downsample"),
    "nvila-15b": ({**S2, "mm_hidden_size": 3456, "num_video_frames": 8}, QWEN25_14B, "mlp_downsample"),
    "nvila-lite-2b": ({**LITE, "mm_hidden_size": 1152, "num_video_frames": 8}, QWEN25_1_5B, "mlp_downsample_3x3_fix"),
    "nvila-lite-8b": ({**LITE, "mm_hidden_size": 1152, "num_video_frames": 8},
                      {**QWEN25_7B, "model_max_length": 4096, "tokenizer_model_max_length": 4096},
                      "mlp_downsample_3x3_fix"),
    "nvila-8b-video": ({"image_aspect_ratio": "resize", "dynamic_s2": False, "mm_hidden_size": 1152,
                        "num_video_frames": 256, "video_encoder": TSP},
                       {**QWEN25_7B, "model_max_length": 16384, "tokenizer_model_max_length": 16384},
                       "mlp_downsample_2x2_fix"),
}


def official_config(top: dict[str, Any], llm: dict[str, Any], vision: dict[str, Any], projector_type: str) -> dict[str, Any]:
    """A top-level config.json (``top``: tiling/video entries) with the sub-configs embedded like the release's."""
    return {
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": llm["hidden_size"],
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "chat_template": None,
        "fps": 0.0, "model_dtype": "torch.bfloat16", "num_time_tokens": 0,
        **top,
        "llm_cfg": llm, "vision_tower_cfg": vision,
        "mm_projector_cfg": {"mm_projector_type": projector_type, "model_type": "v2l_projector",
                             "architectures": ["MultimodalProjector"]},
    }


def random_checkpoint(
    preset: str, out: str | Path, dtype: torch.dtype = torch.bfloat16, layers: int | None = None, seed: int = 0
) -> Path:
    """Write a random checkpoint with ``preset``'s shapes (``layers`` truncates LLM and ViT depth)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, SiglipVisionConfig, SiglipVisionModel

    from nvila.model.projector import Projector

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    _, llm_cfg, proj_type = PRESETS[preset]
    llm_cfg, vis_cfg = dict(llm_cfg), dict(SIGLIP_SO400M_448)
    if layers is not None:
        if layers < 2:
            raise ConfigError("--layers must be >= 2 (the vision feature is the second-to-last layer)")
        llm_cfg["num_hidden_layers"] = min(layers, llm_cfg["num_hidden_layers"])
        vis_cfg["num_hidden_layers"] = min(layers, vis_cfg["num_hidden_layers"])
    config = official_config(PRESETS[preset][0], llm_cfg, vis_cfg, proj_type)
    torch.manual_seed(seed)
    out = Path(out)
    tmp = atomic_dir(out)
    try:
        llm = AutoModelForCausalLM.from_config(Qwen2Config(**llm_cfg), dtype=dtype)
        write_part(llm, "llm", tmp, {"config.json": llm_cfg, **_tokenizer_files(llm_cfg["model_max_length"])})
        del llm
        vision = SiglipVisionModel(SiglipVisionConfig(**vis_cfg)).to(dtype)
        pre = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
               "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
               "rescale_factor": 1 / 255, "size": {"height": 448, "width": 448}}
        write_part(vision, "vision_tower", tmp, {"config.json": vis_cfg, "preprocessor_config.json": pre})
        projector = Projector(proj_type, config["mm_hidden_size"], llm_cfg["hidden_size"]).to(dtype)
        write_part(projector, "mm_projector", tmp, {"config.json": config["mm_projector_cfg"]})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(_README.format(preset=preset, layers=layers or "all"))
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_part(module: torch.nn.Module, part: str, root: Path, files: dict[str, Any]) -> None:
    """Save one sub-folder of the official layout: the module's tensors + config/tokenizer files."""
    blobs = {k: v if isinstance(v, bytes) else (json.dumps(v, indent=2) + "\n").encode() for k, v in files.items()}
    save_part(part_state(module, part, PartRecord()), root / part, blobs)


def _tokenizer_files(max_len: int) -> dict[str, bytes]:
    folder = resources.files("nvila") / "assets" / "standin_tokenizer"
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith((".json", ".txt"))}
    cfg = json.loads(files["tokenizer_config.json"])
    cfg["model_max_length"] = max_len
    files["tokenizer_config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
    return files


_README = """# Random {preset} checkpoint (layers: {layers})

Randomly initialised weights with the released model's exact tensor shapes, in the official layout.
For speed and memory measurements only: the answers are meaningless. The tokenizer is a STAND-IN
(8192 tokens: the first 8187 Qwen2 BPE ranks + the release's special tokens); the embedding matrices
keep the real vocabulary size. Written by `nvila random-checkpoint`.
"""
