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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nvila.checkpoint import atomic_dir, commit_dir, resolve
from nvila.errors import CheckpointError, ConfigError
from nvila.train.recipe import AssembleConfig

S2_SCALES = (448, 896, 1344)


def assemble(spec: AssembleConfig, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write an NVILA checkpoint built from ``spec``'s parts to ``out`` (atomically); returns ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    from nvila.model.projector import PROJECTORS, Projector
    from nvila.presets import official_config, write_part
    from nvila.processing.chat import CHAT_TEMPLATES

    if spec.projector not in PROJECTORS:
        raise ConfigError(f"assemble.projector {spec.projector!r} is not one of {sorted(PROJECTORS)}")
    if spec.image_mode not in ("dynamic_s2", "dynamic", "resize"):
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
    llm_cfg = llm.config.to_dict()
    vis_cfg = vision.config.to_dict()
    scales = len(S2_SCALES) if spec.image_mode == "dynamic_s2" else 1
    top: dict[str, Any] = {"image_aspect_ratio": spec.image_mode, "dynamic_s2": spec.image_mode == "dynamic_s2",
                           "mm_hidden_size": vision.config.hidden_size * scales, "num_video_frames": 8}
    if spec.image_mode == "dynamic_s2":
        top.update({"s2_scales": ",".join(map(str, S2_SCALES)),
                    "s2_max_split_size": S2_SCALES[0], "s2_resize_output_to_scale_idx": -1})
    config = official_config(top, llm_cfg, vis_cfg, spec.projector)
    config["chat_template"] = spec.chat_template
    torch.manual_seed(seed)
    projector = Projector(spec.projector, top["mm_hidden_size"], llm.config.hidden_size).to(dtype)

    out = Path(out)
    tmp = atomic_dir(out)
    try:
        write_part(llm, "llm", tmp, {"config.json": llm_cfg, **tokenizer_files(tokenizer)})
        write_part(vision, "vision_tower", tmp, {"config.json": vis_cfg, "preprocessor_config.json": pre_cfg})
        write_part(projector, "mm_projector", tmp, {"config.json": config["mm_projector_cfg"]})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _preprocessor(folder: Path, size: int) -> dict[str, Any]:
    path = folder / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
        cfg["size"] = {"height": size, "width": size}
        return cfg
    return {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "rescale_factor": 1 / 255, "size": {"height": size, "width": size}}


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for a tokenizer, as bytes."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
