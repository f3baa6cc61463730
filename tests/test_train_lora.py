"""LoRA adapters: apply (no-op at init), save/load round trip, merge, peft interop, nvila.load/CLI, errors.

References are computed independently of the code under test: logits of the in-memory model before
saving, the LoRA update written out by hand (W + alpha/r * B @ A), and plain transformers + peft.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CHECKPOINTS, MEDIA, fixture_pipeline
from safetensors.torch import load_file, save_file
from torch import nn

import nvila
from nvila.api import Pipeline
from nvila.base.errors import CheckpointError, ConfigError
from nvila.checkpoint.lora import apply_lora, has_lora, load_adapter, merge_lora, save_adapter
from nvila.checkpoint.save import save_checkpoint
from nvila.cli.main import main
from nvila.formats.lora import LoraSettings
from nvila.train.params import param_groups, set_trainable

BASE = CHECKPOINTS / "nvila"
SMALL = LoraSettings(r=4, alpha=8)          # scale alpha/r = 2, so a wrong scale shows
SCALE = SMALL.alpha / SMALL.r
Q0 = "model.layers.0.self_attn.q_proj"      # one LoRA-wrapped linear, checked by hand
LN = "vision.model.encoder.layers.0.layer_norm1.weight"
QUESTION = "What is in the picture?"


def messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(MEDIA / "hopper_64x64.png")},
                                         {"type": "text", "text": QUESTION}]}]


@torch.no_grad()
def logits(model: nn.Module, prompt) -> torch.Tensor:
    """(L, V) logits through vision tower, projector and LLM (no media cache, so edited ViTs count)."""
    x = model.fuse(prompt.input_ids, model.embed_media(prompt.media))
    return model.llm(inputs_embeds=x[None]).logits[0]


@pytest.fixture(scope="module")
def base() -> Pipeline:
    return fixture_pipeline("nvila")


@pytest.fixture(scope="module")
def prompt(base: Pipeline):
    return base.prepare(messages())


@pytest.fixture(scope="module")
def base_logits(base: Pipeline, prompt) -> torch.Tensor:
    return logits(base.model, prompt)


@pytest.fixture(scope="module")
def trained(base: Pipeline, prompt, tmp_path_factory) -> SimpleNamespace:
    """A 'fine-tuned' model (random LoRA, an edited ViT LayerNorm and projector) and its saved adapter."""
    model = copy.deepcopy(base.model)
    set_trainable(model, {"llm": "frozen", "vision": "layernorm", "projector": "full"})
    apply_lora(model, SMALL)
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        params["projector.layers.4.weight"].add_(torch.randn(64, 64, generator=g) * 0.1)
        params[LN].mul_(1.5)
    out = tmp_path_factory.mktemp("lora") / "adapter"
    save_adapter(model, out, SMALL, base=str(BASE))
    return SimpleNamespace(model=model, dir=out, logits=logits(model, prompt))


def by_hand(model: nn.Module, name: str = Q0) -> torch.Tensor:
    """W + alpha/r * B @ A of one LoRA-wrapped linear."""
    layer = model.llm.get_submodule(name)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return (layer.base_layer.weight + SCALE * b @ a).detach().clone()


def test_zero_init_lora_changes_nothing_and_trains_only_lora(base, prompt, base_logits) -> None:
    model = copy.deepcopy(base.model)
    set_trainable(model, {"llm": "frozen", "vision": "layernorm", "projector": "full"})
    vision_before = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    n = apply_lora(model, SMALL)
    assert torch.equal(logits(model, prompt), base_logits)
    targets = [m for name, m in base.model.llm.named_modules() if name.rsplit(".", 1)[-1] in SMALL.target_modules]
    assert len(targets) == 7 * base.model.llm.config.num_hidden_layers
    assert n == sum(SMALL.r * (m.in_features + m.out_features) for m in targets)
    llm_trainable = {name for name, p in model.llm.named_parameters() if p.requires_grad}
    assert llm_trainable and all(".lora_A." in x or ".lora_B." in x for x in llm_trainable)
    assert {n for n, p in model.vision.named_parameters() if p.requires_grad} == vision_before
    assert all(p.requires_grad for p in model.projector.parameters())
    groups = {g["name"]: g for g in param_groups(model, {"vision": 1e-6, "projector": 1e-4, "llm": 1e-4})}
    assert sum(p.numel() for p in groups["llm"]["params"]) == n


def test_trained_lora_changes_logits(base_logits, trained) -> None:
    assert (trained.logits - base_logits).abs().max() > 1e-2


def test_adapter_folder_round_trip(base, prompt, trained) -> None:
    files = sorted(p.name for p in trained.dir.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                     "nvila_adapter.json"]
    meta = json.loads((trained.dir / "nvila_adapter.json").read_text())
    assert meta["base"] == str(BASE) and meta["lora"]["r"] == 4 and meta["parts"] == ["llm", "vision", "projector"]
    other = load_file(str(trained.dir / "non_lora_trainables.safetensors"))
    expected = {n for n, p in trained.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert set(other) == expected and LN in other and "projector.layers.4.weight" in other

    model = copy.deepcopy(base.model)
    load_adapter(model, trained.dir)
    assert torch.equal(logits(model, prompt), trained.logits)
    params, edited, original = dict(model.named_parameters()), dict(trained.model.named_parameters()), \
        dict(base.model.named_parameters())
    for name in (LN, "projector.layers.4.weight"):
        assert torch.equal(params[name], edited[name]) and not torch.equal(params[name], original[name])


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 logits of one model computed two ways: the fixture's own fp32-vs-fp64 noise is ~3e-5."""
    torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_merge_folds_lora_into_plain_linears(base, prompt, trained) -> None:
    model = copy.deepcopy(trained.model)
    expected = by_hand(model)
    merge_lora(model)
    assert not has_lora(model) and type(model.llm.get_submodule(Q0)) is nn.Linear
    assert list(model.llm.state_dict()) == list(base.model.llm.state_dict())
    torch.testing.assert_close(model.llm.get_submodule(Q0).weight, expected, atol=1e-6, rtol=1e-6)
    close(logits(model, prompt), trained.logits)
    # in float64 the merged and the unmerged LLM agree to rounding
    llm64 = copy.deepcopy(trained.model.llm).double()
    ids = torch.tensor([base.tokenizer(QUESTION)["input_ids"]])
    with torch.no_grad():
        ref64 = llm64(input_ids=ids).logits
        merge_lora(SimpleNamespace(llm=llm64))
        torch.testing.assert_close(llm64(input_ids=ids).logits, ref64, atol=1e-10, rtol=0)


def test_merged_checkpoint_reloads(base, prompt, base_logits, trained, tmp_path) -> None:
    model = copy.deepcopy(trained.model)
    merge_lora(model)
    save_checkpoint(dataclasses.replace(base.checkpoint, model=model), tmp_path / "merged")
    loaded = nvila.load(tmp_path / "merged", dtype="float32", device="cpu")
    # Reference: the merged weights rounded to the dtype the base stores (bf16). Embeddings/LM head were
    # not trained and keep their in-memory rows (their grown media rows are recomputed at load).
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name not in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
                p.copy_(p.to(torch.bfloat16).float())
    got = logits(loaded.model, prompt)
    torch.testing.assert_close(got, logits(ref, prompt), atol=1e-6, rtol=1e-6)
    assert (got - base_logits).abs().max() > 1e-2


def test_nvila_load_with_lora(prompt, trained) -> None:
    pipe = nvila.load(BASE, dtype="float32", device="cpu", lora=trained.dir)
    assert not has_lora(pipe.model)
    close(logits(pipe.model, prompt), trained.logits)


def test_llm_adapter_is_standard_peft(base, trained) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(BASE / "llm", dtype=torch.float32)
    vocab = llm.config.vocab_size
    ids = torch.tensor([base.tokenizer(QUESTION)["input_ids"]])
    with torch.no_grad():
        plain = llm(input_ids=ids).logits
        peft_llm = PeftModel.from_pretrained(llm, trained.dir).eval()
        got = peft_llm(input_ids=ids).logits
        ref = trained.model.llm(input_ids=ids).logits[..., :vocab]
    assert (plain - ref).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- errors ------------------------------------------------------------------------------------
def _tampered(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    state = load_file(str(dst / "adapter_model.safetensors"))
    edit(state)
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


def test_bad_adapter_folders(base, prompt, base_logits, trained, tmp_path) -> None:
    model = copy.deepcopy(base.model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter(model, tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        nvila.load(BASE, dtype="float32", device="cpu", lora=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder: missing adapter_config.json"):
        load_adapter(model, tmp_path / "empty")

    key = f"base_model.model.{Q0}.lora_A.weight"
    wrong_r = _tampered(trained.dir, tmp_path / "r8", lambda s: s.update({key: torch.zeros(8, 64)}))
    shape = rf"different base model(.|\n)*{key}: adapter \(8, 64\) vs model \(4, 64\)"
    with pytest.raises(CheckpointError, match=shape):
        load_adapter(model, wrong_r)
    dropped = _tampered(trained.dir, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing tensors: {key}"):
        load_adapter(model, dropped)
    extra = _tampered(trained.dir, tmp_path / "extra", lambda s: s.update({"base_model.model.x.lora_A.weight":
                                                                           torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected tensors: base_model.model.x.lora_A.weight"):
        load_adapter(model, extra)
    targets = tmp_path / "targets"
    shutil.copytree(trained.dir, targets)
    config = json.loads((targets / "adapter_config.json").read_text())
    (targets / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    with pytest.raises(CheckpointError, match="does not fit this base model"):
        load_adapter(model, targets)
    # a failed load leaves the base model untouched
    assert not has_lora(model) and torch.equal(logits(model, prompt), base_logits)

    other = copy.deepcopy(fixture_pipeline("nvila-video").model)   # same LLM, narrower projector
    with pytest.raises(CheckpointError, match=r"different base model(.|\n)*projector\.layers\.1\.weight: adapter"):
        load_adapter(other, trained.dir)
    assert not has_lora(other)


def test_missing_peft_is_a_config_error(trained, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r"pip install 'nvila\[train\]'"):
        nvila.load(BASE, dtype="float32", device="cpu", lora=trained.dir)


def test_settings_and_misuse_errors(base, trained, tmp_path) -> None:
    for bad, match in [({"r": 0}, "positive integer"), ({"alpha": -1}, "positive number"),
                       ({"dropout": 1.0}, r"\[0, 1\)"), ({"target_modules": []}, "non-empty"),
                       ({"target_modules": "q_proj"}, "list of module names")]:
        with pytest.raises(ConfigError, match=match):
            LoraSettings(**bad)
    with pytest.raises(ConfigError, match="unknown lora settings"):
        LoraSettings.from_dict({"rank": 8})
    assert LoraSettings.from_dict({"target_modules": ["q_proj"]}).target_modules == ("q_proj",)
    assert (LoraSettings().r, LoraSettings().alpha, LoraSettings().dropout) == (64, 16, 0.05)

    model = copy.deepcopy(base.model)
    with pytest.raises(ConfigError, match="no LoRA layers to merge"):
        merge_lora(model)
    with pytest.raises(ConfigError, match="call apply_lora"):
        save_adapter(model, tmp_path / "a", SMALL)
    with pytest.raises(ConfigError, match="cannot put LoRA on the LLM"):
        apply_lora(model, LoraSettings(target_modules=("no_such_proj",)))
    apply_lora(model, SMALL)
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, SMALL)
    with pytest.raises(ConfigError, match="already has LoRA"):
        load_adapter(model, trained.dir)
    with pytest.raises(ConfigError, match="differ from the applied LoRA"):
        save_adapter(model, tmp_path / "b", LoraSettings(r=8))
    assert not (tmp_path / "b").exists()


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_merge_and_infer_with_lora(base, trained, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(BASE), "--lora", str(trained.dir), "--out", str(out)]) == 0
    stored = load_file(str(out / "llm" / "model.safetensors"))
    assert stored[f"{Q0}.weight"].dtype == torch.bfloat16
    assert torch.equal(stored[f"{Q0}.weight"], by_hand(trained.model).to(torch.bfloat16))
    projector = load_file(str(out / "mm_projector" / "model.safetensors"))["layers.4.weight"]
    assert torch.equal(projector, trained.model.projector.layers[4].weight.detach().to(torch.bfloat16))

    options = {"max_new_tokens": 6}
    lora_pipe = Pipeline(dataclasses.replace(base.checkpoint, model=trained.model))   # unmerged, in memory
    ref = lora_pipe.generate(messages(), **options).output_token_ids
    assert ref != base.generate(messages(), **options).output_token_ids
    capsys.readouterr()
    rc = main(["infer", "--model", str(BASE), "--lora", str(trained.dir), "--dtype", "float32", "--device", "cpu",
               "--media", str(MEDIA / "hopper_64x64.png"), "--text", QUESTION, "--max-new-tokens", "6", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["output_token_ids"] == ref

    assert main(["infer", "--model", str(BASE), "--lora", str(tmp_path / "nope"), "--text", "hi"]) == 2
    assert "LoRA adapter folder" in capsys.readouterr().err
