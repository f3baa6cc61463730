"""The "-hf" layout: conversion both ways (bit-identical tensors), loading it with the reference's numbers, errors.

Every fixture case is run on the converted "-hf" folder against the reference's recorded outputs (the same
bar as tests/test_parity.py) and against the llava folder it came from (logits within 1e-5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHECKPOINTS, MEDIA, OUTPUTS, VARIANTS, case_messages, fixture_cases, fixture_pipeline
from safetensors import safe_open

import nvila
from nvila.checkpoint.convert import convert
from nvila.checkpoint.load import folder_config, read_folder
from nvila.formats.hf import HF_PREFIX

CASES = fixture_cases()
_HF: dict[str, Path] = {}
_PIPES: dict[str, object] = {}


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf")


def hf_folder(root: Path, variant: str) -> Path:
    if variant not in _HF:
        _HF[variant] = convert(CHECKPOINTS / variant, root / variant, "hf")
    return _HF[variant]


def hf_pipeline(root: Path, variant: str):
    if variant not in _PIPES:
        _PIPES[variant] = nvila.load(hf_folder(root, variant), dtype="float32", device="cpu")
    return _PIPES[variant]


def tensors(folder: Path, prefix: str = "") -> dict[str, tuple[str, bytes, tuple[int, ...]]]:
    """key -> (dtype, raw bytes, shape) of every tensor under ``prefix`` in a folder's safetensors files."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    t = f.get_tensor(key)
                    out[key[len(prefix):]] = (str(t.dtype), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                                              tuple(t.shape))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_identical(variant: str, hf_root: Path, tmp_path: Path) -> None:
    hf = hf_folder(hf_root, variant)
    back = convert(hf, tmp_path / "back", "llava")
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == ("nvila_lite" if variant == "nvila-lite" else "nvila")
    for part, prefix in HF_PREFIX.items():
        original = tensors(CHECKPOINTS / variant / part)
        assert original, part
        assert tensors(hf, prefix) == original                       # llava -> hf: same bytes, new keys
        assert tensors(back / part) == original                      # hf -> llava: the original keys again
        for name in ("config.json", "preprocessor_config.json", "generation_config.json"):
            src = CHECKPOINTS / variant / part / name
            if src.is_file():
                assert json.loads((back / part / name).read_text()) == json.loads(src.read_text()), (part, name)
    assert json.loads((back / "config.json").read_text()) == json.loads((CHECKPOINTS / variant / "config.json").read_text())
    a, b = read_folder(CHECKPOINTS / variant), read_folder(back)
    assert folder_config(a) == folder_config(b)
    assert a.configs == b.configs


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_layout_reproduces_the_reference(case: str, hf_root: Path) -> None:
    variant = case.split("/")[0]
    ref = json.loads((OUTPUTS / f"{case}.json").read_text())
    want = np.load(OUTPUTS / f"{case}.npz")["last_logits"]
    pipe, llava = hf_pipeline(hf_root, variant), fixture_pipeline(variant)
    messages = case_messages(CASES[case])
    prompt = pipe.prepare(messages)
    assert prompt.input_ids == ref["prompt"]["input_ids"] == llava.prepare(messages).input_ids
    assert prompt.num_media_embeddings == ref["num_visual_tokens"]
    logits = pipe.next_token_logits(messages)
    assert float((logits - llava.next_token_logits(messages)).abs().max()) <= 1e-5
    assert float(np.abs(logits.numpy() - want).max()) < 1e-4
    assert pipe.generate(messages, max_new_tokens=16).output_token_ids == ref["generation"]["output_ids"]


def test_hub_style_folder_without_nvila_extras_gets_the_release_defaults(hf_root: Path, tmp_path: Path) -> None:
    """NVIDIA's own "-hf" folders have no llava_config / mm_projector_config: the model type's defaults apply."""
    for variant in ("nvila", "nvila-lite"):
        folder = tmp_path / variant
        shutil.copytree(hf_folder(hf_root, variant), folder)
        config = json.loads((folder / "config.json").read_text())
        del config["llava_config"], config["mm_projector_config"]
        (folder / "config.json").write_text(json.dumps(config))
        got, want = folder_config(read_folder(folder)), folder_config(read_folder(CHECKPOINTS / variant))
        for field in ("image_mode", "tile_size", "s2_scales", "projector_type", "mm_hidden_size", "min_tiles",
                      "max_tiles", "select_layer", "image_mean", "image_std", "num_video_frames"):
            assert getattr(got, field) == getattr(want, field), (variant, field)


def test_a_folder_of_neither_layout_says_what_each_needs(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(nvila.CheckpointError) as e:
        nvila.load(tmp_path)
    text = str(e.value)
    assert "llm/, vision_tower/, mm_projector/" in text and "'-hf' layout" in text and "nvila_lite" in text
    assert "weights.safetensors" in text                              # says what was found


def test_hf_folder_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nvila_lite", "text_config": {},
                                                      "vision_config": {}}))
    with pytest.raises(nvila.CheckpointError, match="model\\*.safetensors at the folder root"):
        nvila.load(tmp_path)


def test_conversion_refuses_what_it_cannot_convert(hf_root: Path, tmp_path: Path) -> None:
    with pytest.raises(nvila.CheckpointError, match="already in the hf layout"):
        convert(hf_folder(hf_root, "nvila-lite"), tmp_path / "x", "hf")
    with pytest.raises(nvila.CheckpointError, match="already in the llava layout"):
        convert(CHECKPOINTS / "nvila-lite", tmp_path / "y", "llava")
    quantized = tmp_path / "q"
    shutil.copytree(CHECKPOINTS / "nvila-lite", quantized)
    (quantized / "quant_config.json").write_text("{}")
    with pytest.raises(nvila.CheckpointError, match="quantized checkpoint.*no '-hf' consumer"):
        convert(quantized, tmp_path / "z", "hf")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(nvila.CheckpointError, match="LoRA adapter.*nvila merge"):
        convert(adapter, tmp_path / "w", "hf")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()   # nothing half-written


def test_a_saved_model_converts(tmp_path: Path) -> None:
    """What `nvila merge` / `nvila train` write (save_checkpoint) converts, and loads back the same."""
    pipe = fixture_pipeline("nvila-video")
    saved = pipe.save(tmp_path / "saved")
    hf = convert(saved, tmp_path / "hf", "hf")
    messages = case_messages(CASES["nvila-video/video_avi"])
    got = nvila.load(hf, dtype="float32").next_token_logits(messages)
    assert torch.equal(got, pipe.next_token_logits(messages))


def test_cli_convert(tmp_path: Path, capsys) -> None:
    from nvila.cli.main import main

    assert main(["convert", str(CHECKPOINTS / "nvila-lite"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "llava"]) == 0
    capsys.readouterr()
    assert main(["infer", "--model", str(tmp_path / "hf"), "--media", str(MEDIA / "hopper_64x64.png"), "--text",
                 "Hi", "--max-new-tokens", "4", "--dtype", "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == fixture_pipeline("nvila-lite").generate(
        [{"role": "user", "content": [{"type": "image", "image": str(MEDIA / "hopper_64x64.png")},
                                      {"type": "text", "text": "Hi"}]}], max_new_tokens=4).text
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "o"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err
