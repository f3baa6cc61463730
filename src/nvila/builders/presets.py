"""Architecture presets of the released NVILA models, and random checkpoints with their exact shapes.

``nvila random-checkpoint --preset nvila-lite-2b --out DIR`` writes a randomly initialised checkpoint in
the official layout, so speed and memory can be measured at real sizes without downloading anything.
The tokenizer is a stand-in (the first 8187 Qwen2 BPE ranks + the release's special tokens, shipped in
``nvila/assets/standin_tokenizer``); the embedding matrices keep the real 151648-row vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from nvila.base.errors import ConfigError
from nvila.checkpoint.save import write_checkpoint
from nvila.formats.config import ImageMode, NvilaConfig, VideoEncoderConfig
from nvila.model.projector import Projector

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



@dataclass(frozen=True)
class Preset:
    """The architecture of a released model: LLM config, projector, and the NvilaConfig settings."""

    llm: dict[str, Any]
    projector: str
    image_mode: ImageMode
    mm_hidden_size: int
    s2_scales: tuple[int, ...] = ()
    num_video_frames: int = 8
    video_encoder: VideoEncoderConfig = VideoEncoderConfig()


S2_SCALES = (448, 896, 1344)
TSP = VideoEncoderConfig("tsp", ((8, 1, 1),))
PRESETS: dict[str, Preset] = {
    "nvila-8b": Preset(QWEN25_7B, "mlp_downsample", "dynamic_s2", 3456, S2_SCALES),
    "nvila-15b": Preset(QWEN25_14B, "mlp_downsample", "dynamic_s2", 3456, S2_SCALES),
    "nvila-lite-2b": Preset(QWEN25_1_5B, "mlp_downsample_3x3_fix", "dynamic", 1152),
    "nvila-lite-8b": Preset({**QWEN25_7B, "model_max_length": 4096, "tokenizer_model_max_length": 4096},
                            "mlp_downsample_3x3_fix", "dynamic", 1152),
    "nvila-8b-video": Preset({**QWEN25_7B, "model_max_length": 16384, "tokenizer_model_max_length": 16384},
                             "mlp_downsample_2x2_fix", "resize", 1152, num_video_frames=256, video_encoder=TSP),
}


def random_checkpoint(
    preset: str, out: str | Path, dtype: torch.dtype = torch.bfloat16, layers: int | None = None, seed: int = 0
) -> Path:
    """Write a random checkpoint with ``preset``'s shapes (``layers`` truncates LLM and ViT depth)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, SiglipVisionConfig, SiglipVisionModel

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    llm_cfg, vis_cfg, proj_type = dict(spec.llm), dict(SIGLIP_SO400M_448), spec.projector
    if layers is not None:
        if layers < 2:
            raise ConfigError("--layers must be >= 2 (the vision feature is the second-to-last layer)")
        llm_cfg["num_hidden_layers"] = min(layers, llm_cfg["num_hidden_layers"])
        vis_cfg["num_hidden_layers"] = min(layers, vis_cfg["num_hidden_layers"])
    cfg = NvilaConfig.for_parts(llm_cfg, vis_cfg, proj_type, spec.image_mode, spec.mm_hidden_size, spec.s2_scales,
                                num_video_frames=spec.num_video_frames, video_encoder=spec.video_encoder)
    torch.manual_seed(seed)
    llm = AutoModelForCausalLM.from_config(Qwen2Config(**llm_cfg), dtype=dtype)
    vision = SiglipVisionModel(SiglipVisionConfig(**vis_cfg)).to(dtype)
    projector = Projector(proj_type, cfg.mm_hidden_size, llm_cfg["hidden_size"]).to(dtype)
    pre = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "do_rescale": True,
           "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
           "rescale_factor": 1 / 255, "size": {"height": 448, "width": 448}}
    parts = {"llm": (llm, {"config.json": llm_cfg, **_tokenizer_files(llm_cfg["model_max_length"])}),
             "vision_tower": (vision, {"config.json": vis_cfg, "preprocessor_config.json": pre}),
             "mm_projector": (projector, {"config.json": cfg.raw["mm_projector_cfg"]})}
    return write_checkpoint(out, cfg, parts, {"README.md": _README.format(preset=preset, layers=layers or "all")})


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
