"""FP8 training (nvila.train.fp8: torchao Float8Linear in the LLM and ViT) on CPU, emulated: per-layer accuracy
against the high-precision layer with torchao's thresholds, which linears are converted, the loss curve against
fp32, bit-identical resume, plain exported checkpoints, the refusal without FP8 hardware, FSDP2 and adamw-fp8."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS
from safetensors import safe_open
from safetensors.torch import load_file
from test_trainer import QUESTION, env, losses, nvila_cmd, write_recipe

import nvila
from nvila.base.errors import ConfigError
from nvila.train.recipe import load_recipe
from nvila.train.trainer import Trainer

pytest.importorskip("torchao", reason="FP8 training needs torchao: pip install 'nvila[train]'")
from torchao.float8 import Float8LinearConfig  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.float8.float8_utils import compute_error  # noqa: E402  (torchao's SQNR in dB)

from nvila.train.fp8 import (  # noqa: E402
    check_fp8_device,
    convert_to_fp8,
    fp8_layers,
    fp8_targets,
    require_torchao,
    restore_linears,
)

SQNR_OUT, SQNR_GRAD = 18.0, 17.0      # torchao's own test thresholds (test/float8/test_base.py)
NO_DROPOUT = {"r": 4, "alpha": 8, "dropout": 0.0}
CURVE_STEPS = 6
# Largest per-step relative loss deviation from fp32 allowed over the CURVE_STEPS steps of the test recipe (LoRA,
# lr 2e-3 on a random 2-layer model, so small differences grow fast). Measured (torch 2.13, torchao 0.18):
# tensorwise 0.042, rowwise 0.059, bf16 autocast alone 0.020; the first step (same weights, forward only):
# tensorwise 0.007, rowwise 0.017. The bounds are 2x the largest measurement.
CURVE_RTOL, FIRST_STEP_RTOL = 0.12, 0.035


@pytest.fixture(scope="module")
def lite() -> nvila.api.Pipeline:
    return nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32")


@pytest.fixture(scope="module")
def layer_inputs(lite) -> dict[str, torch.Tensor]:
    """The real input of every FP8 target linear on one image question (ViT, then LLM)."""
    from nvila.train.loss import LossModule

    model = lite.model
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in fp8_targets(model)]
    prompts = [lite.processor(QUESTION + [{"role": "assistant", "content": "A red circle."}], training=True)]
    with torch.no_grad():
        LossModule(model, False, 4096)(prompts)
    for h in hooks:
        h.remove()
    return inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_every_fp8_layer_tracks_its_high_precision_layer(lite, layer_inputs, recipe: str, dtype: torch.dtype) -> None:
    """Each converted linear, on its real input, against the same linear in ``dtype``: output SQNR >= 18 dB,
    weight- and input-gradient SQNR >= 17 dB. Measured minima over the 20 layers (fp32 / bf16 alike):
    tensorwise 27.3 / 23.5 / 24.3 dB, rowwise 27.8 / 27.3 / 28.2 dB (output / weight grad / input grad)."""
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    g = torch.Generator().manual_seed(0)
    assert sorted(layer_inputs) == sorted(fp8_targets(lite.model)) and len(layer_inputs) == 20
    for name, x in layer_inputs.items():
        ref = copy.deepcopy(lite.model.get_submodule(name)).to(dtype).requires_grad_(True)
        fp8 = Float8Linear.from_float(copy.deepcopy(ref), config=config)
        x_ref, x_fp8 = (x.to(dtype).clone().requires_grad_(True) for _ in range(2))
        y_ref, y_fp8 = ref(x_ref), fp8(x_fp8)
        upstream = torch.randn(y_ref.shape, generator=g).to(dtype)
        y_ref.backward(upstream)
        y_fp8.backward(upstream)
        sqnr = {"output": compute_error(y_ref.float(), y_fp8.float()),
                "weight grad": compute_error(ref.weight.grad.float(), fp8.weight.grad.float()),
                "input grad": compute_error(x_ref.grad.float(), x_fp8.grad.float())}
        for what, value in sqnr.items():
            assert value >= (SQNR_OUT if what == "output" else SQNR_GRAD), f"{name} {what}: {value:.1f} dB"


def test_which_linears_are_converted(lite) -> None:
    """LLM and running-ViT linears with 16-aligned dimensions, LoRA base layers included; never the LM head,
    the projector, LoRA's own matrices, idle ViT layers or a linear with a dimension that is not a multiple of 16."""
    from nvila.checkpoint.lora import apply_lora
    from nvila.formats.lora import LoraSettings
    from nvila.train.loss import LossModule
    from nvila.train.params import set_trainable

    model = copy.deepcopy(lite.model)
    mlp = model.llm.model.layers[0].mlp               # a 168-wide MLP (168 = 10.5 x 16) in LLM layer 0
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = torch.nn.Linear(64, 168), torch.nn.Linear(64, 168), torch.nn.Linear(168, 64)
    set_trainable(model, {"vision": "layernorm", "projector": "full", "llm": "frozen"})
    apply_lora(model, LoraSettings(r=16, alpha=16, dropout=0.0))   # r=16: LoRA's matrices are 16-aligned too
    converted = convert_to_fp8(model, "tensorwise", emulate=True)
    attn = [f"llm.model.layers.{i}.self_attn.{p}.base_layer" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    ffn = [f"llm.model.layers.1.mlp.{p}.base_layer" for p in ("gate_proj", "up_proj", "down_proj")]
    vit = [f"vision.model.encoder.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    assert converted == sorted(attn + ffn + vit) == sorted(fp8_layers(model))
    assert model.vision.layers_to_run == 1 and len(model.vision.layers) == 2           # layer 1 never runs
    assert type(model.llm.lm_head) is torch.nn.Linear and type(model.projector.layers[2]) is torch.nn.Linear
    prompts = [lite.processor(QUESTION + [{"role": "assistant", "content": "A red circle."}], training=True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, n = LossModule(model, False, 4096)(prompts)
    ce.backward()                                                                       # mixed FP8 / plain layers
    lora_b = model.llm.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.isfinite(ce) and n > 0 and lora_b.grad is not None and lora_b.grad.abs().sum() > 0
    assert model.llm.model.layers[0].self_attn.q_proj.base_layer.weight.grad is None    # frozen base stays frozen
    assert restore_linears(model) == len(converted) and fp8_layers(model) == []


def test_fp8_needs_fp8_hardware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(write_recipe(tmp_path, precision="fp8"))
    with pytest.raises(ConfigError, match=r"fp8 needs an NVIDIA GPU with FP8 tensor cores \(compute capability 8\.9\+"
                                          r": Ada, Hopper, Blackwell\); this run's device is cpu\. Use precision "
                                          r"fp8-emulated .* or precision bf16"):
        Trainer(recipe, tmp_path / "run", device="cpu", progress=False).setup()
    assert not (tmp_path / "run").exists()                                   # refused before anything was written
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"device is cuda:0 \(NVIDIA A100-SXM4-80GB, compute capability 8\.0\)"):
        check_fp8_device("fp8", torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    check_fp8_device("fp8", torch.device("cuda:0"))                         # Ada and newer: accepted
    check_fp8_device("fp8-emulated", torch.device("cpu"))                   # emulation runs anywhere


def test_torchao_is_imported_only_for_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("import sys, nvila.train.trainer, nvila.cli.main; "
            "assert 'torchao' not in sys.modules, 'torchao imported without an fp8 setting'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env(), capture_output=True)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)                # as if torchao were not installed
    with pytest.raises(ConfigError, match=r"need PyTorch's torchao package: pip install 'nvila\[train\]'"):
        require_torchao()


@pytest.fixture(scope="module")
def fp32_curve(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return _curve(tmp_path_factory.mktemp("fp32"))[0]


def _curve(folder: Path, steps: int = CURVE_STEPS, **train: object) -> tuple[list[float], Trainer]:
    folder.mkdir(exist_ok=True)
    recipe = load_recipe(write_recipe(folder, max_steps=steps, **{"lora": NO_DROPOUT, **train}))
    trainer = Trainer(recipe, folder / "run", progress=False)
    trainer.setup()
    return [trainer.train_step()["loss"] for _ in range(steps)], trainer


@pytest.mark.parametrize("recipe", ["tensorwise", pytest.param("rowwise", marks=pytest.mark.slow)])
def test_fp8_emulated_loss_curve_tracks_fp32(tmp_path: Path, fp32_curve: list[float], recipe: str) -> None:
    fp8 = _curve(tmp_path, precision="fp8-emulated", fp8_recipe=recipe)[0]
    deviation = [abs(a - b) / b for a, b in zip(fp8, fp32_curve)]
    assert deviation[0] <= FIRST_STEP_RTOL and max(deviation) <= CURVE_RTOL, (fp8, fp32_curve)
    assert fp8 != fp32_curve                                                 # the FP8 casts really ran


def test_fp8_composes_with_checkpointing_and_bf16_frozen_weights(tmp_path: Path) -> None:
    parts = {"vision": "full", "projector": "full", "llm": "frozen"}
    plain, _ = _curve(tmp_path / "plain", 2, precision="fp8-emulated", parts=parts)
    ckpt, _ = _curve(tmp_path / "ckpt", 2, precision="fp8-emulated", parts=parts, gradient_checkpointing=True)
    assert ckpt == pytest.approx(plain, rel=1e-6)                            # the recomputed FP8 casts are the same
    lowmem, trainer = _curve(tmp_path / "lowmem", 2, precision="fp8-emulated", parts=parts, frozen_dtype="bf16")
    base = trainer.ckpt.model.llm.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, Float8Linear) and base.weight.dtype == torch.bfloat16      # frozen FP8 weight in bf16
    assert lowmem == pytest.approx(plain, rel=0.02)                          # frozen weights rounded to bf16 first


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted 4-step fp8-emulated LoRA run (dropout on), checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("fp8run")
    config = write_recipe(folder, max_steps=4, save_every=2, keep_last=2, precision="fp8-emulated")
    return config, Trainer(load_recipe(config), folder / "full", progress=False).run()


def test_fp8_resume_is_bit_identical(fp8_run: tuple[Path, Path], tmp_path: Path) -> None:
    config, full = fp8_run
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for gone in ("checkpoints/step-00000004", "model", "adapter"):
        shutil.rmtree(resumed / gone)                                        # as if stopped after step 2's checkpoint
    Trainer(load_recipe(config), resumed, resume=True, progress=False).run()
    assert losses(resumed) == losses(full) and len(losses(full)) == 4
    for part in ("llm", "mm_projector", "vision_tower"):
        a, b = _tensors(full / "model" / part), _tensors(resumed / "model" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_export_is_an_ordinary_checkpoint(fp8_run: tuple[Path, Path]) -> None:
    _, full = fp8_run
    base = CHECKPOINTS / "nvila-lite"
    for part in ("llm", "mm_projector", "vision_tower"):
        ours, theirs = _dtypes(full / "model" / part), _dtypes(base / part)
        assert ours == theirs                                                # same keys, same dtypes as the base
        assert not any(d.startswith("F8") for d in ours.values())            # no FP8 tensors saved
    assert not any(d.startswith("F8") for d in _dtypes(full / "adapter").values())
    pipe = nvila.load(full / "model", dtype="float32")
    assert fp8_layers(pipe.model) == [] and torch.isfinite(pipe.next_token_logits(QUESTION)).all()
    via_adapter = nvila.load(base, dtype="float32", lora=full / "adapter").next_token_logits(QUESTION)
    # model/ stores the merged weights in bf16 (the base's dtype): measured up to 0.059 apart on logits of about +-3
    torch.testing.assert_close(via_adapter, pipe.next_token_logits(QUESTION), atol=0.1, rtol=0.02)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _dtypes(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            out.update({k: handle.get_slice(k).get_dtype() for k in handle.keys()})
    return out


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process_under_fp8(tmp_path: Path) -> None:
    """FSDP2 (gloo, 2 CPU processes) with fp8-emulated: each layer's weights are all-gathered, then cast to FP8
    (torchao's Float8Linear sees plain unsharded tensors), so the losses equal one process's with the same
    global batch."""
    config = write_recipe(tmp_path, max_steps=3, batch_size=1, grad_accum=4, lora=NO_DROPOUT, distributed="fsdp",
                          precision="fp8-emulated")
    args = ["train", "--config", str(config), "--no-progress", "--device", "cpu"]
    one = subprocess.run(nvila_cmd(*args, "--output-dir", str(tmp_path / "one")), env=env(), capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(28500 + os.getpid() % 1000), "-m", "nvila"]
    two = subprocess.run([*torchrun, *args, "--output-dir", str(tmp_path / "two"), "train.grad_accum=2"], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)      # measured: equal
    # The gradients are summed in another order (all-reduce vs one process). Measured after 3 steps: trained
    # weights up to 4.3e-5 apart (projector; fp32 runs: 6e-7), next-token logits 1.1e-3 (fp32: 1.5e-4).
    one, two = (load_file(str(next((tmp_path / run / "checkpoints").iterdir()) / "trainable.safetensors"))
                for run in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-4, rtol=0) for k in one)
    a = nvila.load(tmp_path / "one" / "model", dtype="float32").next_token_logits(QUESTION)
    b = nvila.load(tmp_path / "two" / "model", dtype="float32").next_token_logits(QUESTION)
    torch.testing.assert_close(a, b, atol=2.5e-3, rtol=1e-3)


@pytest.mark.slow
def test_adamw_fp8_states_are_smaller_and_resume_exactly(tmp_path: Path) -> None:
    """torchao's AdamWFp8 on CPU (torch.compile-d update): moments of parameters with >= 4096 elements in FP8.
    Measured on this recipe's 138,432 trainable parameters: 349,568 state bytes vs AdamW's 1,107,456 (3.2x);
    the 4096-element-and-larger tensors take 2.03 bytes per parameter instead of 8."""
    from torchao.optim.subclass_fp8 import OptimStateFp8

    config = write_recipe(tmp_path, max_steps=3, save_every=1, keep_last=3, optimizer="adamw-fp8")
    trainer = Trainer(load_recipe(config), tmp_path / "full", progress=False)
    trainer.run()
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    fp8_bytes = plain_bytes = 0
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            s = trainer.optimizer.state[p][key]
            if isinstance(s, OptimStateFp8):
                fp8_bytes += s.codes.numel() * s.codes.element_size() + s.scale.numel() * s.scale.element_size()
            else:
                plain_bytes += s.numel() * s.element_size()
    n = sum(p.numel() for p in params)
    assert fp8_bytes > 0 and fp8_bytes + plain_bytes < 0.35 * 8 * n, (fp8_bytes, plain_bytes, n)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed)
    for gone in ("checkpoints/step-00000003", "model", "adapter"):
        shutil.rmtree(resumed / gone)
    Trainer(load_recipe(config), resumed, resume=True, progress=False).run()
    assert losses(resumed) == losses(tmp_path / "full") and len(losses(resumed)) == 3
    a, b = _tensors(tmp_path / "full" / "model" / "llm"), _tensors(resumed / "model" / "llm")
    assert all(torch.equal(a[k], b[k]) for k in a)
