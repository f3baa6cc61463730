"""Random real-shape checkpoints: shapes against facts about the released files, and a loadable layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MEDIA
from transformers import Qwen2Config, SiglipVisionConfig, SiglipVisionModel

import nvila
from nvila.builders.presets import PRESETS, SIGLIP_SO400M_448, random_checkpoint
from nvila.model.projector import Projector


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "preset, projector_params",
    [("nvila-8b", 62.4e6), ("nvila-lite-8b", 61.1e6)],  # spec §1.1: from the released mm_projector sizes
)
def test_projector_sizes_match_released_files(preset: str, projector_params: float) -> None:
    spec = PRESETS[preset]
    with torch.device("meta"):
        proj = Projector(spec.projector, spec.mm_hidden_size, spec.llm["hidden_size"])
    assert abs(_params(proj) - projector_params) / projector_params < 0.005


def test_vision_tower_matches_released_size() -> None:
    # every released vision_tower/model.safetensors is 827 MB of bf16 (spec §1.1) -> ~413 M parameters
    with torch.device("meta"):
        vt = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M_448))
    assert abs(_params(vt) * 2 - 827e6) / 827e6 < 0.01


def test_llm_shapes() -> None:
    cfg = Qwen2Config(**PRESETS["nvila-8b"].llm)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (3584, 28, 4, 151648)
    assert not cfg.tie_word_embeddings


def test_random_checkpoint_loads_and_runs(tmp_path) -> None:
    out = random_checkpoint("nvila-lite-2b", tmp_path / "lite", dtype=torch.bfloat16, layers=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_aspect_ratio"] == "dynamic" and cfg["mm_hidden_size"] == 1152
    pipe = nvila.load(out, dtype="bfloat16", device="cpu")
    assert pipe.config.tokens_per_tile == 121 and pipe.config.tile_size == 448
    prompt = pipe.prepare([{"role": "user", "content": [
        {"type": "image", "image": str(MEDIA / "hopper_64x64.png")},
        {"type": "text", "text": "hi"}]}])
    assert prompt.num_media_embeddings == 122
    assert pipe.next_token_logits("hi").shape == (151648,)
    with pytest.raises(nvila.NvilaError, match="not empty"):
        random_checkpoint("nvila-lite-2b", out, layers=2)


def test_unknown_preset() -> None:
    with pytest.raises(nvila.ConfigError, match="unknown preset"):
        random_checkpoint("nvila-99b", "/tmp/never-written")
