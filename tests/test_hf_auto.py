"""NVILA in transformers' Auto classes and ``pipeline``: the greedy tokens and logits of the reference.

The converted fixture folders are loaded with ``AutoConfig`` / ``AutoProcessor`` / ``AutoModelForImageTextToText``
(after ``import nvila.hf``, and through the folder's ``auto_map`` with ``trust_remote_code``), and
``model.generate(**processor.apply_chat_template(...))`` must give the 16 greedy tokens the reference recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHECKPOINTS, OUTPUTS, case_messages, fixture_cases, fixture_pipeline

from nvila.checkpoint.convert import convert

CASES = fixture_cases()
# Every kind of input per variant: an S2 / tiled image, two images, a video (TSP on nvila-video), text only.
AUTO_CASES = sorted(f"{v}/{c}" for v in ("nvila", "nvila-lite", "nvila-video")
                    for c in ("img_china_1000x250", "img_flower_300x900", "two_images", "video_avi", "text_only"))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_auto")
    return {v: convert(CHECKPOINTS / v, root / v, "hf") for v in ("nvila", "nvila-lite", "nvila-video")}


_LOADED: dict[str, tuple] = {}


def auto(folder: Path):
    import nvila.hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    key = str(folder)
    if key not in _LOADED:
        _LOADED[key] = (AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder))
    return _LOADED[key]


def test_auto_classes_resolve_to_nvila(hf_folders: dict[str, Path]) -> None:
    import nvila.hf as hf
    from transformers import AutoConfig

    for variant, folder in hf_folders.items():
        lite = variant == "nvila-lite"
        config = AutoConfig.from_pretrained(folder)
        assert type(config) is (hf.NVILALiteConfig if lite else hf.NVILAConfig)
        model, processor = auto(folder)
        assert type(model) is (hf.NVILALiteForConditionalGeneration if lite else hf.NVILAForConditionalGeneration)
        assert type(processor).__name__ == ("NVILALiteProcessor" if lite else "NVILAProcessor")
        names = {n.split(".")[0] for n, _ in model.named_parameters()}
        assert names == {"llm", "vision_tower", "mm_projector"}       # the "-hf" key layout


@pytest.mark.parametrize("case", AUTO_CASES)
def test_generate_gives_the_reference_tokens(case: str, hf_folders: dict[str, Path]) -> None:
    variant = case.split("/")[0]
    ref = json.loads((OUTPUTS / f"{case}.json").read_text())
    model, processor = auto(hf_folders[variant])
    inputs = processor.apply_chat_template(case_messages(CASES[case]), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert inputs["input_ids"].shape[1] == ref["prefill"]["seq_len"]
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    want = np.load(OUTPUTS / f"{case}.npz")["last_logits"]
    assert float(np.abs(logits.numpy() - want).max()) < 1e-4
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == ref["generation"]["output_ids"]


def test_pipeline_image_text_to_text(hf_folders: dict[str, Path]) -> None:
    from transformers import pipeline

    import nvila.hf  # noqa: F401

    case = "nvila-lite/img_china_800x600"
    pipe = pipeline("image-text-to-text", model=str(hf_folders["nvila-lite"]))
    out = pipe(text=case_messages(CASES[case]), max_new_tokens=8, do_sample=False, return_full_text=False)
    nv = fixture_pipeline("nvila-lite")
    want = nv.generate(case_messages(CASES[case]), max_new_tokens=8)
    assert out[0]["generated_text"] == nv.tokenizer.decode(want.output_token_ids, skip_special_tokens=True)
    assert out[0]["generated_text"].strip() == want.text.strip()


def test_batched_generate_matches_one_at_a_time(hf_folders: dict[str, Path]) -> None:
    model, processor = auto(hf_folders["nvila"])
    convs = [case_messages(CASES[c]) for c in ("nvila/img_hopper_64x64", "nvila/text_only")]
    processor.tokenizer.padding_side = "left"
    batch = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt", padding=True)
    got = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)[:, batch["input_ids"].shape[1]:]
    for row, conv in zip(got.tolist(), convs):
        single = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert row == alone[0, single["input_ids"].shape[1]:].tolist()


def test_trust_remote_code_without_importing_nvila(hf_folders: dict[str, Path]) -> None:
    """The folder's auto_map: configuration classes self-contained, the model from the installed nvila."""
    folder = hf_folders["nvila-lite"]
    code = (
        "import sys\n"
        "from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor\n"
        f"f = {str(folder)!r}\n"
        "c = AutoConfig.from_pretrained(f, trust_remote_code=True)\n"
        "m = AutoModelForImageTextToText.from_pretrained(f, trust_remote_code=True)\n"
        "p = AutoProcessor.from_pretrained(f, trust_remote_code=True)\n"
        "print(type(c).__name__, type(m).__name__, type(p).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["NVILALiteConfig", "NVILALiteForConditionalGeneration", "NVILALiteProcessor"]
