"""Recipes (every shipped YAML parses), overrides, validation errors and the data mixture."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nvila.base.errors import ConfigError
from nvila.train.data import Sample
from nvila.train.mixture import Mixture
from nvila.train.recipe import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
EXAMPLE = ROOT / "recipes" / "examples" / "tiny-lora.yaml"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_parses(path: Path) -> None:
    recipe = load_recipe(path)
    t = recipe.train
    trained = {part for part, mode in t.parts.items() if mode != "frozen"} | ({"llm"} if t.lora else set())
    assert trained and trained <= set(t.lr), f"{path.name}: every trained part needs a learning rate"
    if "vision" in trained and "llm" in trained:
        ratio = t.lr["llm"] / t.lr["vision"]
        assert 5 <= ratio <= 50, f"{path.name}: the ViT learning rate must be 5-50x below the LLM's"
    assert Path(recipe.data.datasets[0].path).is_absolute()


def test_the_five_stages_train_the_documented_parts() -> None:
    stages = {p.stem: load_recipe(p).train.parts for p in sorted((ROOT / "recipes" / "nvila-8b").glob("*.yaml"))}
    assert stages == {
        "1-align": {"vision": "frozen", "projector": "full", "llm": "frozen"},
        "2-vision-pretrain": {"vision": "full", "projector": "full", "llm": "frozen"},
        "3-llm-pretrain": {"vision": "frozen", "projector": "full", "llm": "full"},
        "4-image-sft": {"vision": "full", "projector": "full", "llm": "full"},
        "5-video-sft": {"vision": "full", "projector": "full", "llm": "full"},
    }


def test_paths_resolve_against_the_recipe_and_overrides_against_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(EXAMPLE, ["train.max_steps=3", "data.datasets.1.ratio=0.5", "output_dir=out",
                                   "data.datasets.0.path=mine.jsonl", "train.lr.llm=1e-3"])
    assert recipe.train.max_steps == 3 and recipe.data.datasets[1].ratio == 0.5
    assert recipe.output_dir == str(tmp_path / "out")
    assert recipe.data.datasets[0].path == str(tmp_path / "mine.jsonl")
    assert recipe.data.datasets[1].path == str(EXAMPLE.parent / "data" / "motion.jsonl")
    assert Path(recipe.model).is_dir() and recipe.train.lr["llm"] == 1e-3
    assert recipe.train.lora is not None and recipe.train.lora.r == 8


def test_hub_ids_stay_hub_ids() -> None:
    recipe = load_recipe(ROOT / "recipes" / "nvila-lite-2b" / "finetune-lora.yaml")
    assert recipe.model == "Efficient-Large-Model/NVILA-Lite-2B"


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown setting(s) ['max_step']"),
    ("data.packin=true", "unknown setting(s) ['packin']"),
    ("train.batch_size=0", "train.batch_size must be a positive integer"),
    ("train.lr.vision=-1", "train.lr.vision must be a positive number"),
    ("train.precision=fp4", "train.precision must be one of ['auto', 'bf16', 'fp32', 'fp8', 'fp8-emulated']"),
    ("train.fp8_recipe=rowwise", "train.fp8_recipe is for precision fp8 or fp8-emulated"),
    ("train.fp8_recipe=blockwise", "train.fp8_recipe must be one of ['tensorwise', 'rowwise']"),
    ("train.optimizer=sgd", "train.optimizer must be one of ['adamw', 'adamw-fp8']"),
    ("train.lora.r=0", "lora r must be a positive integer"),
    ("train.parts.llm=full", "set train.parts.llm to 'frozen'"),
    ("data.image_mode=tiles", "data.image_mode 'tiles' is not one of"),
    ("data.datasets.5.path=x", "has no item '5'"),
    ("train.max_steps", "must look like key.sub=value"),
])
def test_bad_settings_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_recipe(EXAMPLE, [override])
    assert message in str(e.value)


def test_a_recipe_needs_a_model_or_parts() -> None:
    with pytest.raises(ConfigError, match="exactly one of 'model'"):
        recipe_from_dict({"data": {"datasets": [{"path": "x.jsonl"}]}})
    with pytest.raises(ConfigError, match="data.datasets must be a non-empty list"):
        recipe_from_dict({"model": "m", "data": {"datasets": []}})


def test_broken_recipe_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def _samples(name: str, n: int) -> list[Sample]:
    return [Sample(f"{name}{i}", name, []) for i in range(n)]


def test_mixture_ratios_set_each_datasets_share_per_epoch() -> None:
    mix = Mixture([_samples("a", 10), _samples("b", 4), _samples("c", 6)], [1.0, 2.0, 0.5], seed=3)
    assert mix.epoch_size == 10 + 8 + 3
    for epoch in range(3):
        ids = [mix[epoch * mix.epoch_size + i].id for i in range(mix.epoch_size)]
        counts = Counter(ids)
        assert sorted(k for k in counts if k.startswith("a")) == [f"a{i}" for i in sorted(range(10), key=str)]
        assert all(counts[f"b{i}"] == 2 for i in range(4))                 # ratio 2: every sample twice
        assert sum(1 for k in counts if k.startswith("c")) == 3 and max(counts[k] for k in counts if k[0] == "c") == 1


def test_mixture_order_is_a_function_of_seed_and_position() -> None:
    data = [_samples("a", 7), _samples("b", 5)]
    one, two = Mixture(data, [1, 1], seed=0), Mixture(data, [1, 1], seed=0)
    positions = [25, 3, 14, 0, 13]                                       # random access, any order
    assert [one[p].id for p in positions] == [two[p].id for p in range(36)][25:26] + [
        two[p].id for p in (3, 14, 0, 13)]
    assert [one[p].id for p in range(36)] == [two[p].id for p in range(36)]
    assert [one[p].id for p in range(12)] != [one[p].id for p in range(12, 24)]   # epochs reshuffle
    assert [one[p].id for p in range(12)] != [Mixture(data, [1, 1], seed=1)[p].id for p in range(12)]
    with pytest.raises(ConfigError, match="contribute no samples"):
        Mixture([_samples("a", 3)], [0.1])
