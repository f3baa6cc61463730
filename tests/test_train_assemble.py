"""Stage-1 starting points: a transformers LLM + a SigLIP vision tower + a new projector, assembled into the
official layout, loaded by nvila.load and trained by an `assemble:` recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS, MEDIA
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

import nvila
from nvila.base.errors import CheckpointError, ConfigError
from nvila.builders.assemble import assemble
from nvila.train.recipe import AssembleConfig, recipe_from_dict
from nvila.train.trainer import Trainer, iter_metrics

DATA = Path(__file__).resolve().parents[1] / "recipes" / "examples" / "data"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pretrained-style LLM folder (with the fixture's tokenizer) and a tiny SigLIP folder."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    llm.save_pretrained(root / "llm")
    for f in (CHECKPOINTS / "nvila-lite" / "llm").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
            shutil.copy(f, root / "llm" / f.name)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                                  num_attention_heads=2, image_size=112, patch_size=14))
    vision.save_pretrained(root / "vision")
    return root / "llm", root / "vision"


def test_assembled_checkpoint_holds_the_parts_and_runs(parts, tmp_path: Path) -> None:
    llm_dir, vision_dir = parts
    out = assemble(AssembleConfig(llm=str(llm_dir), vision=str(vision_dir), projector="mlp_downsample_2x2_fix",
                                  image_mode="dynamic", chat_template="qwen2"), tmp_path / "init", dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "llm", "mm_projector", "vision_tower"]
    source = load_file(str(llm_dir / "model.safetensors"))
    written = load_file(str(out / "llm" / "model.safetensors"))
    assert torch.equal(written["model.layers.1.mlp.down_proj.weight"], source["model.layers.1.mlp.down_proj.weight"])
    vis_src, vis_out = load_file(str(vision_dir / "model.safetensors")), load_file(str(out / "vision_tower" / "model.safetensors"))
    vis_src = {("" if k.startswith("vision_model.") else "vision_model.") + k: v for k, v in vis_src.items()}
    assert vis_src.keys() == vis_out.keys() and all(torch.equal(vis_src[k], vis_out[k]) for k in vis_src)
    pipe = nvila.load(out, dtype="float32")
    assert pipe.config.image_mode == "dynamic" and pipe.config.tile_size == 112
    assert pipe.config.tokens_per_tile == 16                                 # 8x8 patches, 2x2 folding
    reply = pipe.generate([{"role": "user", "content": [{"type": "image", "image": str(MEDIA / "hopper_64x64.png")},
                                                        {"type": "text", "text": "Describe."}]}], max_new_tokens=3)
    assert len(reply.output_token_ids) >= 1


def test_assemble_recipe_trains_the_projector_only(parts, tmp_path: Path) -> None:
    llm_dir, vision_dir = parts
    recipe = recipe_from_dict({
        "assemble": {"llm": str(llm_dir), "vision": str(vision_dir), "projector": "mlp_downsample_2x2_fix",
                     "image_mode": "dynamic", "chat_template": "qwen2"},
        "data": {"datasets": [{"path": str(DATA / "shapes.jsonl")}]},
        "train": {"parts": {"projector": "full"}, "lr": {"projector": 1e-3}, "max_steps": 2, "batch_size": 2,
                  "precision": "fp32"},
    })
    out = Trainer(recipe, tmp_path / "run", progress=False).run()
    assert [m["step"] for m in iter_metrics(out / "metrics.jsonl")] == [1, 2]
    init = load_file(str(out / "init" / "llm" / "model.safetensors"))
    trained = load_file(str(out / "model" / "llm" / "model.safetensors"))
    assert all(torch.equal(init[k], trained[k]) for k in init)               # the LLM stayed frozen
    p0 = load_file(str(out / "init" / "mm_projector" / "model.safetensors"))
    p1 = load_file(str(out / "model" / "mm_projector" / "model.safetensors"))
    assert any(not torch.equal(p0[k], p1[k]) for k in p0)


def test_assemble_errors(parts, tmp_path: Path) -> None:
    llm_dir, vision_dir = parts
    with pytest.raises(ConfigError, match="is not one of"):
        assemble(AssembleConfig(llm=str(llm_dir), vision=str(vision_dir), projector="linear3"), tmp_path / "a")
    with pytest.raises(CheckpointError, match="does not exist"):
        assemble(AssembleConfig(llm=str(tmp_path / "nope"), vision=str(vision_dir)), tmp_path / "b")
