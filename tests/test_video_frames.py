"""Video frames smaller than image tiles (``video_frame_size``), media settings a recipe changes and an adapter
records, and the -hf export's refusal of the setting.

References: transformers' own SigLIP (``interpolate_pos_encoding=True``) for the tower at another size, the
unchanged model for ``video_frame_size == tile_size``, and TSP written out by hand (a mean over frames).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from conftest import CHECKPOINTS, MEDIA, fixture_pipeline

import nvila
from nvila.api import Pipeline
from nvila.base.errors import CheckpointError, ConfigError
from nvila.checkpoint.convert import convert
from nvila.checkpoint.lora import apply_lora, load_adapter, save_adapter
from nvila.formats.config import (NvilaConfig, VideoEncoderConfig, media_settings_of, video_pool,
                                  with_media_settings)
from nvila.formats.lora import LoraSettings
from nvila.processing.tiling import plan_video
from nvila.train.params import set_trainable

CLIP = MEDIA / "clip_24f_12fps_176x144.avi"


def video_messages(question: str = "What happens?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": str(CLIP)}, {"type": "text", "text": question}]}]


def with_settings(pipe: Pipeline, **settings) -> Pipeline:
    """A copy of ``pipe`` whose model config has ``settings`` (shares the weights)."""
    ckpt = copy.copy(pipe.checkpoint)
    ckpt.model = copy.copy(pipe.model)
    ckpt.model.cfg = with_media_settings(pipe.config, settings)
    return Pipeline(ckpt)


# ---- config ---------------------------------------------------------------------------------------------


def test_config_parses_validates_and_round_trips_video_frame_size() -> None:
    cfg = fixture_pipeline("nvila-lite").config
    assert cfg.video_frame_size is None and cfg.frame_size == cfg.tile_size
    raw = {**cfg.to_official(), "video_frame_size": 112}
    parts = [json.loads((CHECKPOINTS / "nvila-lite" / p / "config.json").read_text())
             for p in ("vision_tower", "mm_projector", "llm")]
    parsed = NvilaConfig.from_official(raw, *parts)
    assert parsed.frame_size == 112 and parsed.frame_token_side == 3           # 8x8 patches, 3x3 fold (padded)
    assert parsed.to_official()["video_frame_size"] == 112
    assert "video_frame_size" not in cfg.to_official()                        # absent stays absent
    for bad in (100, 0, 7):
        with pytest.raises(ConfigError, match="video_frame_size"):
            dataclasses.replace(cfg, video_frame_size=bad).validate()


@pytest.mark.parametrize(("variant", "frames", "size", "expected"), [
    ("nvila-lite", 8, 112, 8 * (9 + 1)),          # 3x3 fold of 8x8 patches -> 3x3 tokens + end
    ("nvila-video", 16, 112, 2 * (16 + 1)),       # 2x2 fold -> 4x4 tokens, TSP 8x1x1 -> 2 pooled frames
    ("nvila-video", 16, 196, 2 * (49 + 1)),       # the tile size: what the config had before
])
def test_plan_video_counts_tokens_at_the_frame_size(variant, frames, size, expected) -> None:
    cfg = dataclasses.replace(fixture_pipeline(variant).config, video_frame_size=size)
    plan = plan_video(frames, cfg)
    assert plan.num_embeddings == expected
    assert plan.frame_plan.tiles[0].resize == (size, size)


def test_media_settings_apply_record_and_refuse() -> None:
    cfg = fixture_pipeline("nvila-lite").config
    new = with_media_settings(cfg, {"num_video_frames": 32, "video_frame_size": 112, "video_pool": [[4, 1, 1]]})
    assert (new.num_video_frames, new.frame_size) == (32, 112)
    assert new.video_encoder == VideoEncoderConfig("tsp", ((4, 1, 1),))
    assert media_settings_of(new, cfg) == {"num_video_frames": 32, "video_frame_size": 112, "video_pool": [[4, 1, 1]]}
    assert media_settings_of(cfg, cfg) == {}
    assert with_media_settings(new, {"video_pool": []}).video_encoder == VideoEncoderConfig()
    with pytest.raises(ConfigError, match="unknown media setting"):
        with_media_settings(cfg, {"frames": 3})
    with pytest.raises(ConfigError, match="video_pool"):
        video_pool([[4, 1]])
    with pytest.raises(ConfigError, match="dynamic_s2"):
        with_media_settings(cfg, {"image_mode": "dynamic_s2"})
    with pytest.raises(ConfigError, match="video_frame_size"):
        with_media_settings(cfg, {"video_frame_size": 100})


# ---- model ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_tower_at_another_size_matches_transformers_interpolation() -> None:
    pipe = fixture_pipeline("nvila")
    px = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    want = pipe.model.vision.model(px, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
    index = pipe.config.select_layer
    got = pipe.model.vision(px)
    ref = want[index]
    ref = ref[:, 1:] if pipe.model.vision.drop_first_token else ref
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_frame_size_equal_to_tile_size_changes_nothing() -> None:
    pipe = fixture_pipeline("nvila-video")
    same = with_settings(pipe, video_frame_size=pipe.config.tile_size)
    a, b = pipe.prepare(video_messages()), same.prepare(video_messages())
    assert a.input_ids == b.input_ids
    torch.testing.assert_close(pipe.model.embed_prompt(a.input_ids, a.media),
                               same.model.embed_prompt(b.input_ids, b.media), rtol=0, atol=0)


@torch.no_grad()
def test_small_frames_embed_as_tsp_over_the_interpolated_tower() -> None:
    pipe = with_settings(fixture_pipeline("nvila-video"), video_frame_size=112)
    prompt = pipe.prepare(video_messages())
    (item,) = prompt.media
    assert item.pixels.shape == (16, 3, 112, 112)
    (block,) = pipe.model.embed_media(prompt.media)
    # by hand: transformers' tower with interpolation, the projector, then the mean over each 8 frames
    hidden = pipe.model.vision.model(item.pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    tokens = pipe.model.projector(hidden.hidden_states[pipe.config.select_layer])          # (16, 16, D)
    pooled = tokens.view(2, 8, 16, -1).mean(1)
    end = pipe.model.end_embeds()
    want = torch.cat([torch.cat([p, end]) for p in pooled])
    torch.testing.assert_close(block, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_image_and_small_frames_in_one_prompt() -> None:
    pipe = with_settings(fixture_pipeline("nvila-lite"), video_frame_size=112)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(MEDIA / "hopper_64x64.png")},
                                         {"type": "video", "video": str(CLIP)}, {"type": "text", "text": "Same?"}]}]
    prompt = pipe.prepare(msgs)
    feats = pipe.model.encode_media(prompt.media)
    assert [f.shape[1] for f in feats] == [196 // 14 * (196 // 14), 64]
    separate = [pipe.model.encode_tiles(m.pixels) for m in prompt.media]
    for f, s in zip(feats, separate):
        torch.testing.assert_close(f, s, rtol=0, atol=1e-5)
    x = pipe.model.embed_prompt(prompt.input_ids, prompt.media)
    assert x.shape[0] == len(prompt.input_ids) - 2 + sum(m.num_embeddings for m in prompt.media)
    assert pipe.generate(msgs, max_new_tokens=2).text is not None


# ---- adapters carry their media settings -------------------------------------------------------------------


def test_adapter_records_and_restores_media_settings(tmp_path) -> None:
    base = fixture_pipeline("nvila-video")
    model = copy.deepcopy(base.model)
    set_trainable(model, {"llm": "frozen", "vision": "frozen", "projector": "full"})
    apply_lora(model, LoraSettings(r=4, alpha=8))
    settings = {"num_video_frames": 8, "video_frame_size": 112, "video_pool": [[4, 1, 1]]}
    save_adapter(model, tmp_path / "adapter", LoraSettings(r=4, alpha=8), config=settings)
    assert json.loads((tmp_path / "adapter" / "nvila_adapter.json").read_text())["config"] == settings
    pipe = nvila.load(CHECKPOINTS / "nvila-video", dtype="float32", lora=tmp_path / "adapter")
    assert (pipe.config.num_video_frames, pipe.config.frame_size) == (8, 112)
    assert pipe.config.video_encoder.pool_sizes == ((4, 1, 1),)
    assert pipe.prepare(video_messages()).media[0].num_embeddings == 2 * (16 + 1)
    with pytest.raises(ConfigError, match="unknown media setting"):
        save_adapter(model, tmp_path / "bad", LoraSettings(r=4, alpha=8), config={"fps": 2})
    # a recorded setting this base cannot take: refused, the model left as it was
    meta = tmp_path / "adapter" / "nvila_adapter.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "config": {"video_frame_size": 100}}))
    fresh = copy.deepcopy(base.model)
    with pytest.raises(CheckpointError, match="media settings"):
        load_adapter(fresh, tmp_path / "adapter")
    assert fresh.cfg == base.config
    assert not any("lora_" in n for n, _ in fresh.named_parameters())


def test_hf_export_refuses_video_frame_size(tmp_path) -> None:
    src = tmp_path / "src"
    shutil.copytree(CHECKPOINTS / "nvila-lite", src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "video_frame_size": 112}))
    with pytest.raises(CheckpointError, match="video_frame_size"):
        convert(src, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()
