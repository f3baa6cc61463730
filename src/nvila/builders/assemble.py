"""The starting point of stage 1 (alignment): a pretrained LLM + a pretrained vision tower + a new projector,
written as an NVILA checkpoint in the official layout.

    assemble(AssembleConfig(llm="Qwen/Qwen2.5-1.5B-Instruct", vision="google/siglip-so400m-patch14-384"
                            ..., projector="mlp_downsample_3x3_fix", image_mode="dynamic"), "runs/init")

Both parts are read with transformers (local folders, or Hub ids downloaded with huggingface_hub). The
projector is randomly initialised (seeded); its input width is the ViT's hidden size, times the number of
scales for Dynamic-S2, whose scale features are concatenated on channels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nvila.base.errors import CheckpointError, ConfigError
from nvila.checkpoint.load import resolve
from nvila.checkpoint.save import tokenizer_files, write_checkpoint
from nvila.formats.config import IMAGE_MODES, NvilaConfig
from nvila.model.projector import PROJECTORS, Projector
from nvila.processing.chat import CHAT_TEMPLATES

S2_SCALES = (448, 896, 1344)


@dataclass(frozen=True)
class AssembleConfig:
    """Build the starting checkpoint from a pretrained LLM and vision tower (the align stage)."""

    llm: str
    vision: str
    projector: str = "mlp_downsample_3x3_fix"
    image_mode: str = "dynamic"
    chat_template: str | None = None


def assemble(spec: AssembleConfig, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an NVILA checkpoint built from ``spec``'s parts to ``out`` (atomically); returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    if spec.projector not in PROJECTORS:
        raise ConfigError(f"assemble.projector {spec.projector!r} is not one of {sorted(PROJECTORS)}")
    if spec.image_mode not in IMAGE_MODES:
        raise ConfigError(f"assemble.image_mode {spec.image_mode!r} is not dynamic_s2, dynamic or resize")
    if spec.chat_template is not None and spec.chat_template not in CHAT_TEMPLATES:
        raise ConfigError(f"assemble.chat_template {spec.chat_template!r} is not one of {sorted(CHAT_TEMPLATES)}")
    llm_dir, vision_dir = resolve(spec.llm), resolve(spec.vision)
    try:
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir)
        vision = SiglipVisionModel.from_pretrained(vision_dir, dtype=dtype)
        pre_cfg = _preprocessor(vision_dir, vision.config.image_size)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read the parts to assemble ({spec.llm}, {spec.vision}): {e}") from e
    if spec.chat_template is None and not tokenizer.chat_template:
        raise ConfigError(f"{spec.llm}'s tokenizer has no chat template: set assemble.chat_template")
    llm_cfg, vis_cfg = llm.config.to_dict(), vision.config.to_dict()
    scales = S2_SCALES if spec.image_mode == "dynamic_s2" else ()
    cfg = NvilaConfig.for_parts(llm_cfg, vis_cfg, spec.projector, spec.image_mode, s2_scales=scales,
                                chat_template=spec.chat_template)
    torch.manual_seed(seed)
    projector = Projector(spec.projector, cfg.mm_hidden_size, llm.config.hidden_size).to(dtype)
    parts = {"llm": (llm, {"config.json": llm_cfg, **tokenizer_files(tokenizer)}),
             "vision_tower": (vision, {"config.json": vis_cfg, "preprocessor_config.json": pre_cfg}),
             "mm_projector": (projector, {"config.json": cfg.raw["mm_projector_cfg"]})}
    return write_checkpoint(out, cfg, parts)


def _preprocessor(folder: Path, size: int) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        cfg["size"] = {"height": size, "width": size}
        return cfg
    return {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "rescale_factor": 1 / 255, "size": {"height": size, "width": size}}
