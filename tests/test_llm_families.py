"""Our LLM wiring against transformers' own models on tiny random configs (Qwen2 and Llama families).

A checkpoint in the official layout is assembled from a fixture's vision tower/projector and a freshly
initialised transformers LLM saved with ``save_pretrained``; nvila's text-only logits must equal the
transformers model's own forward on the same ids (plus the three mean rows appended for media tokens).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import nvila


def _assemble(tmp_path: Path, llm_model: torch.nn.Module) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / "nvila-video", root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    tok_files = {p.name: p.read_bytes() for p in (root / "llm").iterdir() if "token" in p.name or p.suffix in (".txt",)
                 or p.name == "vocab.json"}
    shutil.rmtree(root / "llm")
    llm_model.save_pretrained(root / "llm")
    for name, data in tok_files.items():
        (root / "llm" / name).write_bytes(data)
    return root


FAMILIES = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                                            tie_word_embeddings=False)),
    "llama": (LlamaForCausalLM, LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                                            tie_word_embeddings=True, rope_theta=10000.0)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_text_logits_equal_transformers(tmp_path, family: str) -> None:
    cls, cfg = FAMILIES[family]
    torch.manual_seed(0)
    ref = cls(cfg).eval()
    root = _assemble(tmp_path, ref)
    pipe = nvila.load(root, dtype="float32", device="cpu")
    messages = "Name three colors of the rainbow."
    prompt = pipe.prepare(messages)
    ours = pipe.next_token_logits(messages)
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1]
    assert ours.shape[0] == cfg.vocab_size + 3
    torch.testing.assert_close(ours[: cfg.vocab_size], theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[cfg.vocab_size :], theirs.mean().expand(3), atol=1e-5, rtol=1e-5)
    assert json.loads((root / "llm" / "config.json").read_text())["model_type"] == family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_prompt_runs_and_greedy_matches_transformers(tmp_path, family: str) -> None:
    """With media, greedy decoding through our cache equals transformers' generate on the same embeddings."""
    cls, cfg = FAMILIES[family]
    torch.manual_seed(1)
    ref = cls(cfg).eval()
    pipe = nvila.load(_assemble(tmp_path, ref), dtype="float32", device="cpu")
    from conftest import MEDIA

    messages = [{"role": "user", "content": [{"type": "image", "image": str(MEDIA / "hopper_64x64.png")},
                                             {"type": "text", "text": "What is shown?"}]}]
    ours = pipe.generate(messages, max_new_tokens=8)
    x = pipe.embed(pipe.prepare(messages))[None]
    ref.resize_token_embeddings(cfg.vocab_size + 3)   # same appended rows as the pipeline's model
    ref.load_state_dict(pipe.model.llm.state_dict())
    with torch.no_grad():
        out = ref.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                           max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.output_token_ids == out[0, -8:].tolist()
