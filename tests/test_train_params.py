"""Trainable parts, LayerNorm-only ViT tuning and per-part learning rates."""

from __future__ import annotations

import pytest
import torch
from conftest import CHECKPOINTS
from torch import nn

import nvila
from nvila.base.errors import ConfigError
from nvila.train.params import param_groups, set_trainable


@pytest.fixture()
def model():
    return nvila.load(CHECKPOINTS / "nvila", dtype="float32", device="cpu").model


def _count(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def test_align_stage_trains_projector_only(model) -> None:
    counts = set_trainable(model, {"projector": "full"})
    assert counts == {"vision": 0, "projector": sum(p.numel() for p in model.projector.parameters()), "llm": 0}
    assert _count(model.llm) == 0 and _count(model.vision) == 0


def test_layernorm_tuning_selects_exactly_the_vit_layernorms(model) -> None:
    set_trainable(model, {"vision": "layernorm", "projector": "full", "llm": "full"})
    trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    run = model.vision.layers_to_run            # layers after the selected feature layer never run
    expected = {f"model.encoder.layers.{i}.{ln}.{w}" for i in range(run) for ln in ("layer_norm1", "layer_norm2")
                for w in ("weight", "bias")}
    assert trainable == expected and trainable
    assert all(isinstance(dict(model.vision.named_modules())[n.rsplit(".", 1)[0]], nn.LayerNorm) for n in trainable)
    idle = {n for n, p in model.vision.named_parameters() if n.startswith(("model.post_layernorm",
                                                                           f"model.encoder.layers.{run}."))}
    assert idle and not idle & trainable


def test_idle_vit_layers_stay_frozen_even_in_full_mode(model) -> None:
    set_trainable(model, {"vision": "full"})
    pixels = torch.randn(1, 3, model.cfg.tile_size, model.cfg.tile_size)
    model.vision(pixels).sum().backward()
    no_grad = {n for n, p in model.vision.named_parameters() if p.requires_grad and p.grad is None}
    assert not no_grad                              # every trainable ViT parameter receives a gradient
    assert not model.vision.model.post_layernorm.weight.requires_grad


def test_param_groups_carry_per_part_learning_rates(model) -> None:
    set_trainable(model, {"vision": "layernorm", "projector": "full", "llm": "full"})
    groups = param_groups(model, {"vision": 2e-6, "projector": 1e-4, "llm": 2e-5})
    assert [(g["name"], g["lr"]) for g in groups] == [("vision", 2e-6), ("projector", 1e-4), ("llm", 2e-5)]
    opt = torch.optim.AdamW(groups)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_errors(model) -> None:
    with pytest.raises(ConfigError, match="unknown model parts"):
        set_trainable(model, {"decoder": "full"})
    with pytest.raises(ConfigError, match="applies to the vision tower"):
        set_trainable(model, {"llm": "layernorm"})
    set_trainable(model, {"llm": "full"})
    with pytest.raises(ConfigError, match="no learning rate"):
        param_groups(model, {"projector": 1e-3})
    set_trainable(model, {})
    with pytest.raises(ConfigError, match="nothing to train"):
        param_groups(model, {"llm": 1e-5})
