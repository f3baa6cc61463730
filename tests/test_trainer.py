"""The recipe runner end to end on the tiny fixture model: metrics, outputs, exact resume after SIGKILL,
torchrun (DDP and FSDP over gloo) against one process with the same global batch."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHECKPOINTS

import nvila
from nvila.base.errors import ConfigError
from nvila.cli.main import main as cli_main
from nvila.train.recipe import load_recipe
from nvila.train.trainer import Trainer, iter_metrics

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "examples" / "data"
QUESTION = [{"role": "user", "content": [{"type": "image", "image": str(DATA / "images" / "red_circle_0.png")},
                                         {"type": "text", "text": "What shape is in the image?"}]}]


def write_recipe(folder: Path, **train: object) -> Path:
    """A small fp32 recipe over the bundled sample data (both datasets, LoRA + LayerNorm + projector)."""
    recipe = {
        "model": str(CHECKPOINTS / "nvila-lite"),
        "seed": 7,
        "data": {"datasets": [{"path": str(DATA / "shapes.jsonl")}, {"path": str(DATA / "motion.jsonl"), "ratio": 2.0}],
                 "max_length": 1024, "packing": True},
        "train": {"parts": {"vision": "layernorm", "projector": "full", "llm": "frozen"},
                  "lr": {"vision": 1e-4, "projector": 2e-3, "llm": 2e-3},
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "batch_size": 2, "grad_accum": 2, "max_steps": 4,
                  "warmup_ratio": 0.25, "precision": "fp32", **train},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in iter_metrics(run / "metrics.jsonl")]


def nvila_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nvila", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def test_training_run_writes_metrics_checkpoints_and_a_loadable_model(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, save_every=2, keep_last=1, max_steps=5))
    base_logits = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32").next_token_logits(QUESTION)
    out = Trainer(recipe, tmp_path / "run", progress=False).run()
    records = list(iter_metrics(out / "metrics.jsonl"))
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5]
    assert all(m["loss"] > 0 and m["supervised_tokens"] > 0 and set(m["lr"]) == {"vision", "projector", "llm"}
               for m in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["lr"]["llm"] == pytest.approx(2e-3 / 2)                    # warmup: 1 of 5 steps
    assert records[2]["lr"]["vision"] == pytest.approx(1e-4 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000005"]   # keep_last=1
    assert not list((out / "checkpoints").glob(".*"))                           # no temp folders left
    # the exported model: official layout, LoRA merged, trained projector and LayerNorms included
    pipe = nvila.load(out / "model", dtype="float32")
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "llm", "mm_projector", "vision_tower"]
    trained_logits = pipe.next_token_logits(QUESTION)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)
    # base + adapter reproduces it (adapter = LoRA + projector + ViT LayerNorms); bf16 storage of model/
    via_adapter = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32", lora=out / "adapter").next_token_logits(QUESTION)
    torch.testing.assert_close(via_adapter, trained_logits, atol=0.05, rtol=0.02)


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, max_steps=1))
    Trainer(recipe, tmp_path / "run", progress=False).run()
    with pytest.raises(ConfigError, match="pass --resume"):
        Trainer(recipe, tmp_path / "run", progress=False).run()
    # resuming a finished run trains nothing more and keeps its metrics
    Trainer(recipe, tmp_path / "run", resume=True, progress=False).run()
    assert [m["step"] for m in iter_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


class _Payload:
    """An object a pickle would rebuild by calling a function: what a hostile run folder could hold."""

    def __reduce__(self) -> tuple:
        return (os.system, ("echo this-must-never-run",))


def test_resume_loads_no_pickled_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming reads every file with safetensors, JSON or torch.load(weights_only=True): the RNG state
    needs no pickle, and a run folder whose optimizer file holds an arbitrary object is refused."""
    from nvila.base.errors import CheckpointError

    recipe = load_recipe(write_recipe(tmp_path, max_steps=2, save_every=1, keep_last=2))
    out = Trainer(recipe, tmp_path / "run", progress=False).run()
    first = losses(out)
    step1 = out / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in step1.iterdir()) == ["optimizer.pt", "rng.json", "rng.safetensors", "state.json",
                                                       "trainable.safetensors"]
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000002")           # resume from step 1: step 2 runs again
    real_load, calls = torch.load, []

    def checked_load(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    Trainer(recipe, out, resume=True, progress=False).run()
    assert calls and all(flag is True for flag in calls)
    assert losses(out) == first                                    # dropout included: the RNG state came back
    blob = real_load(step1 / "optimizer.pt", weights_only=True)
    blob["scheduler"]["payload"] = _Payload()
    torch.save(blob, step1 / "optimizer.pt")
    shutil.rmtree(out / "checkpoints" / "step-00000002")
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        Trainer(recipe, out, resume=True, progress=False).run()


def test_resume_after_sigkill_continues_the_exact_loss_curve(tmp_path: Path) -> None:
    config = write_recipe(tmp_path, max_steps=8, save_every=2, keep_last=2)
    base = nvila_cmd("train", "--config", str(config), "--no-progress", "--device", "cpu")
    subprocess.run([*base, "--output-dir", str(tmp_path / "full")], check=True, env=env(), capture_output=True)
    proc = subprocess.Popen([*base, "--output-dir", str(tmp_path / "killed")], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:   # checkpoint 4 written, step 5 logged
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 5 <= len(metrics.read_text().splitlines()) < 8
    assert (tmp_path / "killed" / "checkpoints" / "step-00000004" / "state.json").is_file()
    assert not (tmp_path / "killed" / "model").exists()
    subprocess.run([*base, "--output-dir", str(tmp_path / "killed"), "--resume"], check=True, env=env(),
                   capture_output=True)
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert [m["step"] for m in iter_metrics(tmp_path / "killed" / "metrics.jsonl")] == list(range(1, 9))
    assert resumed == full                                                      # bit-identical, dropout included
    a = nvila.load(tmp_path / "full" / "model", dtype="float32").next_token_logits(QUESTION)
    b = nvila.load(tmp_path / "killed" / "model", dtype="float32").next_token_logits(QUESTION)
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path: Path, strategy: str) -> None:
    """2 processes x batch 1 x accum 2 == 1 process x batch 1 x accum 4 (same global batch of 4)."""
    config = write_recipe(tmp_path, max_steps=3, batch_size=1, grad_accum=4, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                          distributed=strategy)
    args = ["train", "--config", str(config), "--no-progress", "--device", "cpu"]
    one = subprocess.run(nvila_cmd(*args, "--output-dir", str(tmp_path / "one")), env=env(), capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29500 + os.getpid() % 1000 + (1 if strategy == "fsdp" else 0)), "-m", "nvila"]
    two = subprocess.run([*torchrun, *args, "--output-dir", str(tmp_path / "two"), "train.grad_accum=2"], env=env(),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(first) == len(second) == 3
    assert second == pytest.approx(first, rel=1e-5)
    a = nvila.load(tmp_path / "one" / "model", dtype="float32").next_token_logits(QUESTION)
    b = nvila.load(tmp_path / "two" / "model", dtype="float32").next_token_logits(QUESTION)
    # float32 gradients summed in another order (all-reduce vs one process): measured up to 1.2e-4 apart
    torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-3)


def test_cli_train_and_bad_recipes(tmp_path: Path, capsys) -> None:
    config = write_recipe(tmp_path, max_steps=1)
    assert cli_main(["train", "--config", str(config), "--output-dir", str(tmp_path / "cli"), "--no-progress",
                     "train.batch_size=1", "train.grad_accum=1"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "metrics.jsonl").read_text())["samples"] == 1
    assert cli_main(["train", "--config", str(config), "--output-dir", str(tmp_path / "x"), "train.epochz=1"]) == 2
    assert "unknown setting(s) ['epochz']" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "nowhere.png", "conversations": [{"from": "human", "value": "<image>hi"}, '
                      '{"from": "gpt", "value": "ho"}]}\n')
    assert cli_main(["train", "--config", str(config), "--output-dir", str(tmp_path / "y"),
                     f"data.datasets=[{{path: {broken}}}]"]) == 2
    err = capsys.readouterr().err
    assert "sample 0 of dataset broken" in err and "nowhere.png" in err


def _two_steps(tmp_path: Path, name: str, **train: object) -> list[float]:
    recipe = load_recipe(write_recipe(tmp_path, max_steps=2, **train), [])
    trainer = Trainer(recipe, tmp_path / name, progress=False)
    trainer.setup()
    return [trainer.train_step()["loss"] for _ in range(2)]


def test_gradient_checkpointing_changes_memory_not_results(tmp_path: Path) -> None:
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    plain = _two_steps(tmp_path, "plain", lora=lora, parts={"vision": "full", "projector": "full", "llm": "frozen"})
    ckpt = _two_steps(tmp_path, "ckpt", lora=lora, parts={"vision": "full", "projector": "full", "llm": "frozen"},
                      gradient_checkpointing=True)
    assert ckpt == pytest.approx(plain, rel=1e-6)


def test_bf16_autocast_tracks_fp32(tmp_path: Path) -> None:
    fp32 = _two_steps(tmp_path, "fp32", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    bf16 = _two_steps(tmp_path, "bf16", lora={"r": 4, "alpha": 8, "dropout": 0.0}, precision="bf16")
    assert bf16 == pytest.approx(fp32, rel=3e-2) and bf16 != fp32


def test_bench_train_reports_both_modes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mem.json"
    assert cli_main(["bench-train", "--model", str(CHECKPOINTS / "nvila-lite"), "--steps", "1", "--device", "cpu",
                     "--precision", "fp32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    full, lora = report["results"]
    assert (full["mode"], lora["mode"]) == ("full", "lora")
    assert full["params"] > full["trainable_params"] > 0.9 * full["params"] > lora["trainable_params"] > 0   # idle ViT layer frozen
    assert all(r["peak_gib"] >= r["after_load_gib"] > 0 and r["step_s"] > 0 for r in (full, lora))
    assert "full / lora: peak memory" in capsys.readouterr().out


def _full_logits_loss(model, batch):
    """The reference: logits at every position from the LLM's own head, then PyTorch's cross-entropy."""
    from nvila.formats.plans import IGNORE_INDEX

    logits = model.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits            # (B, L, V)
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


@pytest.mark.parametrize("packing", [False, True])
def test_loss_on_supervised_positions_equals_the_full_logits_loss(packing: bool) -> None:
    from nvila.train.loss import LossModule
    from nvila.train.step import collate

    pipe = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32")
    convs = [QUESTION + [{"role": "assistant", "content": "A red circle."}],
             [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]]
    prompts = [pipe.processor(c, training=True) for c in convs]
    with torch.no_grad():
        ours, n = LossModule(pipe.model, packing, 4096)(prompts)
        full, m = _full_logits_loss(pipe.model, collate(pipe.model, prompts))
    assert n == m > 0
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-4)


def test_overlong_samples_are_refused_or_reported(tmp_path: Path) -> None:
    from nvila.base.errors import NvilaError

    config = write_recipe(tmp_path, max_steps=1)
    with pytest.raises(NvilaError, match=r"sample shape-\d+ of shapes has \d+ tokens after media expansion, above "
                                         r"data.max_length=60"):
        Trainer(load_recipe(config, ["data.max_length=60", "data.overlong=error"]), tmp_path / "a", progress=False).setup()
    with pytest.raises(NvilaError, match="has no sample within max_length=60"):
        Trainer(load_recipe(config, ["data.max_length=60"]), tmp_path / "b", progress=False).setup()


def test_frozen_weights_in_bf16_compute_like_rounded_fp32_weights(tmp_path: Path) -> None:
    from nvila.model.mixed import UpcastEmbedding, UpcastLinear
    from nvila.train.lowmem import store_frozen_in
    from nvila.train.params import set_trainable

    pipe = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32")
    rounded = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32")
    set_trainable(pipe.model, {"vision": "layernorm", "projector": "full"})
    saved = store_frozen_in(pipe.model)
    llm = pipe.model.llm
    assert isinstance(llm.model.layers[0].mlp.up_proj, UpcastLinear) and llm.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert isinstance(llm.get_input_embeddings(), UpcastEmbedding) and llm.lm_head.weight.dtype == torch.bfloat16
    assert pipe.model.projector.layers[-1].weight.dtype == torch.float32            # trainable: untouched
    converted = {id(p): p for m in pipe.model.modules() if isinstance(m, (UpcastLinear, UpcastEmbedding))
                 for p in m.parameters()}                                          # a tied head counts once
    assert saved == sum(p.numel() * 2 for p in converted.values()) > 0
    with torch.no_grad():
        for (name, p), (_, q) in zip(pipe.model.named_parameters(), rounded.model.named_parameters()):
            q.copy_(p.float())                                                       # bf16-rounded fp32 reference
    a, b = pipe.next_token_logits(QUESTION), rounded.next_token_logits(QUESTION)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    losses = _two_steps(tmp_path, "lowmem", frozen_dtype="bf16")                    # trains end to end
    assert all(math.isfinite(x) for x in losses) and losses[1] < losses[0] * 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_logits_match_a_float32_linear(dtype: torch.dtype, monkeypatch) -> None:
    from nvila.train.loss import HeadLogits

    monkeypatch.setattr(HeadLogits, "CHUNK", 7)                     # several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, generator=g, requires_grad=True)
    w = torch.randn(30, 16, generator=g).to(dtype).requires_grad_(True)
    out = HeadLogits.apply(h, w)
    h_ref, w_ref = h.detach().clone().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = h_ref @ w_ref.T
    upstream = torch.randn(5, 30, generator=g)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h.grad, h_ref.grad)
    assert w.grad.dtype == dtype
    torch.testing.assert_close(w.grad.float(), w_ref.grad, atol=0.05 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_init_adapter_continues_an_earlier_stage(tmp_path: Path) -> None:
    """A later stage starts from an earlier stage's adapter (LoRA + projector + ViT LayerNorms), trains the
    same tensors on and exports one adapter for the original base; mismatches are clear errors."""
    first = Trainer(load_recipe(write_recipe(tmp_path, max_steps=2)), tmp_path / "first", progress=False).run()
    stage1 = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32", lora=first / "adapter").next_token_logits(QUESTION)
    config = write_recipe(tmp_path, max_steps=2, init_adapter=str(first / "adapter"))
    trainer = Trainer(load_recipe(config), tmp_path / "second", progress=False)
    trainer.setup()
    trainer.ckpt.model.eval()                                                # no LoRA dropout
    start = nvila.api.Pipeline(trainer.ckpt).next_token_logits(QUESTION)
    torch.testing.assert_close(start, stage1, atol=1e-4, rtol=1e-4)        # starts where stage 1 ended
    second = Trainer(load_recipe(config), tmp_path / "second-run", progress=False).run()
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (first, second))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    stage2 = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32", lora=second / "adapter").next_token_logits(QUESTION)
    assert not torch.allclose(stage2, stage1, atol=1e-4)
    recipe = yaml.safe_load(config.read_text())
    for change, message in (({"lora": {"r": 8, "alpha": 8, "dropout": 0.1}}, "make train.lora match the adapter"),
                            ({"parts": {"vision": "frozen", "projector": "full", "llm": "frozen"},
                              "lr": {"projector": 1e-3, "llm": 1e-3}}, "parts this recipe freezes"),
                            ({"lora": None}, "set train.lora")):
        bad = {**recipe, "train": {**recipe["train"], **change}}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=message):
            Trainer(load_recipe(path), tmp_path / "bad", progress=False).setup()
