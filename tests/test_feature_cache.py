"""Cached vision-tower tokens (train.feature_cache): a cached run trains exactly like an uncached one, keys
follow the pixels, the tower and autocast, torn files are recomputed, and a trainable tower is refused.

The reference is the same training without the cache (and ``NvilaModel.encode_media``)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CHECKPOINTS, fixture_pipeline
from test_trainer import DATA, losses

import nvila
from nvila.base.errors import ConfigError, NvilaError
from nvila.train.data import load_dataset, training_prompt
from nvila.train.features import FeatureCache, tower_fingerprint
from nvila.train.recipe import load_recipe
from nvila.train.step import collate
from nvila.train.trainer import Trainer


def recipe(folder: Path, name: str, data: dict | None = None, **train: object) -> Path:
    """Images and clips, frozen tower, projector + LoRA, fp32: 3 steps."""
    spec = {
        "model": str(CHECKPOINTS / "nvila-lite"), "seed": 3,
        "data": {"datasets": [{"path": str(DATA / "shapes.jsonl")}, {"path": str(DATA / "motion.jsonl")}],
                 "max_length": 1024, **(data or {})},
        "train": {"parts": {"vision": "frozen", "projector": "full", "llm": "frozen"},
                  "lr": {"projector": 2e-3, "llm": 2e-3}, "lora": {"r": 4, "alpha": 8}, "batch_size": 4,
                  "max_steps": 3, "precision": "fp32", **train},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cached_run_trains_exactly_like_an_uncached_one(tmp_path: Path) -> None:
    video = {"num_video_frames": 4, "video_frame_size": 112, "video_pool": [[2, 1, 1]]}
    plain = Trainer(load_recipe(recipe(tmp_path, "plain", video)), tmp_path / "plain", progress=False).run()
    cache = tmp_path / "cache"
    cached = Trainer(load_recipe(recipe(tmp_path, "cached", video, feature_cache=str(cache))), tmp_path / "cached",
                     progress=False).run()
    assert losses(cached) == losses(plain)
    assert 4 <= len(list(cache.rglob("*.safetensors"))) <= 16                # each media item seen, once
    again = Trainer(load_recipe(recipe(tmp_path, "again", video, feature_cache=str(cache))), tmp_path / "again",
                    progress=False)
    again.run()
    assert losses(tmp_path / "again") == losses(plain)
    assert again.wrapped.features.misses == 0 and again.wrapped.features.hits > 0
    # the adapter records the frame settings it was trained with; the exported model has them too
    meta = json.loads((cached / "adapter" / "nvila_adapter.json").read_text())
    assert meta["config"] == video
    cfg = json.loads((cached / "model" / "config.json").read_text())
    assert (cfg["num_video_frames"], cfg["video_frame_size"]) == (4, 112)
    pipe = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32", lora=cached / "adapter")
    assert (pipe.config.num_video_frames, pipe.config.frame_size, pipe.config.video_encoder.pool_sizes) == \
        (4, 112, ((2, 1, 1),))


def test_keys_follow_pixels_tower_and_autocast(tmp_path: Path) -> None:
    pipe = fixture_pipeline("nvila-lite")
    prompt = pipe.prepare([{"role": "user", "content": [{"type": "image", "image": str(DATA / "images" / "red_circle_0.png")},
                                                        {"type": "text", "text": "Shape?"}]}])
    model = copy.deepcopy(pipe.model)
    for p in model.parameters():
        p.requires_grad_(False)
    cache = FeatureCache(tmp_path, model.vision)
    (item,) = prompt.media
    first = cache.features(model, [item])
    torch.testing.assert_close(first[0], model.encode_media([item])[0], rtol=0, atol=0)
    assert (cache.hits, cache.misses) == (0, 1)
    assert torch.equal(cache.features(model, [item])[0], first[0]) and cache.hits == 1
    assert cache.key(item) != cache.key(dataclasses.replace(item, pixels=item.pixels + 0.01))
    plain_key = cache.key(item)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache.key(item) != plain_key
    # another tower (one LayerNorm changed) -> another fingerprint, so no stale hit
    before = tower_fingerprint(model.vision)
    with torch.no_grad():
        model.vision.model.encoder.layers[0].layer_norm1.weight.mul_(2)
    assert tower_fingerprint(model.vision) != before
    # a torn file is recomputed and rewritten
    (path,) = list(tmp_path.rglob("*.safetensors"))
    path.write_bytes(b"not safetensors")
    with torch.no_grad():
        model.vision.model.encoder.layers[0].layer_norm1.weight.div_(2)           # the first tower again
    fresh = FeatureCache(tmp_path, model.vision)
    assert fresh.tower == cache.tower
    torch.testing.assert_close(fresh.features(model, [item])[0], first[0], rtol=0, atol=0)
    assert fresh.misses == 1 and path.stat().st_size > 100


def test_cache_feeds_collate_and_refuses_a_trainable_tower(tmp_path: Path) -> None:
    pipe = fixture_pipeline("nvila-lite")
    model = copy.deepcopy(pipe.model)
    for p in model.parameters():
        p.requires_grad_(False)
    samples = load_dataset(DATA / "motion.jsonl")[:2]
    prompts = [training_prompt(pipe.processor, s) for s in samples]
    cache = FeatureCache(tmp_path, model.vision)
    want, got = collate(model, prompts), collate(model, prompts, cache)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    model.vision.model.encoder.layers[0].layer_norm1.weight.requires_grad_(True)
    with pytest.raises(NvilaError, match="frozen vision tower"):
        FeatureCache(tmp_path, model.vision)
    with pytest.raises(ConfigError, match="feature_cache"):
        load_recipe(recipe(tmp_path, "bad", None, feature_cache=str(tmp_path / "c"),
                           parts={"vision": "layernorm", "projector": "full", "llm": "frozen"},
                           lr={"vision": 1e-4, "projector": 1e-3, "llm": 1e-3}))
