"""Tile geometry against the spec's numbers (NVILA.md §2.2, §2.4, §5) and the reference's recorded plans.

Expected values are either stated in the spec (worked examples, candidate order) or recorded by the
reference implementation in tests/fixtures/official/outputs/<variant>/<case>.json / .npz.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import OUTPUTS, case_messages, fixture_cases, fixture_pipeline

from nvila.base.errors import PromptError
from nvila.formats.config import NvilaConfig, VideoEncoderConfig
from nvila.processing.tiling import TilePlan, candidate_grids, closest_grid, plan_image, plan_video

CASES = fixture_cases()

# NVILA.md §2.2 step 2, grids written cols x rows, in the reference's order for max_tiles=12.
SPEC_CANDIDATES_9_12 = [(3, 3), (9, 1), (1, 9), (10, 1), (1, 10), (2, 5), (5, 2), (11, 1), (1, 11), (1, 12),
                        (6, 2), (12, 1), (3, 4), (4, 3), (2, 6)]

NVILA_8B = NvilaConfig(image_mode="dynamic_s2", tile_size=448, patch_size=14, projector_type="mlp_downsample",
                       mm_hidden_size=3456, llm_hidden_size=3584, s2_scales=(448, 896, 1344))
NVILA_LITE = NvilaConfig(image_mode="dynamic", tile_size=448, patch_size=14, projector_type="mlp_downsample_3x3_fix",
                         mm_hidden_size=1152, llm_hidden_size=1536)
NVILA_VIDEO = NvilaConfig(image_mode="resize", tile_size=448, patch_size=14, projector_type="mlp_downsample_2x2_fix",
                          mm_hidden_size=1152, llm_hidden_size=3584,
                          video_encoder=VideoEncoderConfig("tsp", ((8, 1, 1),)))


def _json(case: str) -> dict:
    return json.loads((OUTPUTS / f"{case}.json").read_text())


# ---- candidate grids --------------------------------------------------------------------------------
def test_candidate_grids_9_12_is_the_spec_list() -> None:
    got = candidate_grids(9, 12)
    assert set(got) == set(SPEC_CANDIDATES_9_12) and len(got) == len(SPEC_CANDIDATES_9_12)
    products = [c * r for c, r in got]
    assert products == sorted(products)
    assert got == SPEC_CANDIDATES_9_12


def test_candidate_grids_1_12_count_matches_fixture() -> None:
    got = candidate_grids(1, 12)
    brute = {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    assert set(got) == brute and len(got) == 35
    assert [c * r for c, r in got] == sorted(c * r for c, r in got)
    assert _json("nvila-lite/img_china_800x600")["preprocess"]["closest_aspect_ratio_calls"][0][
        "num_candidate_ratios"] == 35
    assert _json("nvila/img_china_800x600")["preprocess"]["closest_aspect_ratio_calls"][0][
        "num_candidate_ratios"] == len(candidate_grids(9, 12))


def test_closest_grid_tie_break_needs_more_than_half_the_pixels() -> None:
    # README: 2x2 beats 1x1 (both ratio 1) for 196-px tiles only if w*h > 0.5 * 196^2 * 4 = 76832
    grids = candidate_grids(1, 12)
    assert closest_grid(277, 277, grids, 196) == (1, 1)
    assert closest_grid(278, 278, grids, 196) == (2, 2)
    # exactly half is not enough (strict >): 4x2 image, ratio 2 is equally far from 3x1 and 2x2;
    # 2x2 with tile 2 holds 16 px, the image has exactly 8
    assert closest_grid(4, 2, [(3, 1), (2, 2)], 2) == (3, 1)
    assert closest_grid(4, 2, [(3, 1), (2, 2)], 1) == (2, 2)
    # a strictly closer later grid wins regardless of size; a farther one never does
    assert closest_grid(10, 10, [(2, 1), (1, 1)], 196) == (1, 1)
    assert closest_grid(10000, 10000, [(1, 1), (2, 1)], 196) == (1, 1)


# ---- spec worked examples ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,grid,tiles,tokens",
    [
        ((448, 448), (3, 3), 14, 2304),
        ((640, 480), (4, 3), 17, 3072),
        ((800, 600), (4, 3), 17, 3072),
        ((1024, 768), (4, 3), 17, 3072),
        ((1920, 1080), (4, 3), 17, 3072),
        ((1080, 1920), (2, 5), 15, 2560),
        ((3000, 1000), (6, 2), 17, 3072),
        ((4000, 500), (9, 1), 14, 2304),
    ],
)
def test_nvila_8b_worked_examples(size, grid, tiles, tokens) -> None:
    plan = plan_image(*size, NVILA_8B, single_image=True)
    assert plan.kind == "dynamic_s2"
    assert plan.grid == grid
    assert plan.block == (grid[1], grid[0])
    assert len(plan.tiles) == tiles
    assert plan.placeholders == 1
    assert plan.num_embeddings - 1 == tokens
    # tile order: [448 whole image, 4 x 896 row-major, cols*rows last-scale row-major]
    assert plan.tiles[0].resize == (448, 448) and plan.tiles[0].box == (0, 0, 448, 448)
    assert [t.resize for t in plan.tiles[1:5]] == [(896, 896)] * 4
    assert [t.box[:2] for t in plan.tiles[1:5]] == [(0, 0), (448, 0), (0, 448), (448, 448)]
    cols, rows = grid
    last = plan.tiles[5:]
    assert all(t.resize == (448 * cols, 448 * rows) for t in last)
    assert [t.box for t in last] == [(448 * c, 448 * r, 448 * (c + 1), 448 * (r + 1))
                                     for r in range(rows) for c in range(cols)]


@pytest.mark.parametrize(
    "size,grid,tiles,visual",
    [((448, 448), (1, 1), 1, 121), ((1024, 768), (4, 3), 13, 1573), ((1920, 1080), (4, 2), 9, 1089)],
)
def test_nvila_lite_worked_examples(size, grid, tiles, visual) -> None:
    plan = plan_image(*size, NVILA_LITE, single_image=True)
    assert plan.kind == "dynamic"
    assert plan.grid == grid
    assert len(plan.tiles) == tiles and plan.placeholders == tiles
    assert plan.embeds_per_placeholder == 121 + 1                 # 11x11 tokens + newline embedding
    assert plan.num_embeddings - plan.placeholders == visual
    if tiles > 1:                                                  # thumbnail last, whole image squashed
        assert plan.tiles[-1].resize == (448, 448) and plan.tiles[-1].box == (0, 0, 448, 448)
        assert all(t.resize == (448 * grid[0], 448 * grid[1]) for t in plan.tiles[:-1])


def test_multi_image_and_resize_models_use_one_squashed_tile() -> None:
    for cfg, per_tile in [(NVILA_8B, 256), (NVILA_LITE, 121), (NVILA_VIDEO, 256)]:
        for single in (True, False):
            if cfg is not NVILA_VIDEO and single:
                continue
            plan = plan_image(1920, 1080, cfg, single_image=single)
            assert plan.kind == "single" and len(plan.tiles) == 1
            assert plan.tiles[0].resize == (448, 448)
            assert plan.num_embeddings == per_tile + 1
    # an S2 model's single tile repeats its features once per scale (spec §2.3 step 7)
    assert plan_image(100, 100, NVILA_8B, single_image=False).repeat_channels == 3
    assert plan_image(100, 100, NVILA_LITE, single_image=False).repeat_channels == 1


# ---- 277 / 278 tie-break pair -----------------------------------------------------------------------
@pytest.mark.parametrize("side", [277, 278])
def test_tie_break_pair_against_fixture(side: int) -> None:
    lite = fixture_pipeline("nvila-lite").config
    plan = plan_image(side, side, lite, single_image=True)
    if side == 277:
        assert plan.grid == (1, 1) and len(plan.tiles) == 1
    else:
        assert plan.grid == (2, 2) and len(plan.tiles) == 5       # 2x2 + thumbnail
    ref = _json(f"nvila-lite/img_hopper_{side}x{side}")
    assert list(plan.grid) == ref["preprocess"]["closest_aspect_ratio_calls"][0]["grid_wh"]
    assert len(plan.tiles) == ref["media"]["image"]["num_tensors"]
    assert plan.num_embeddings == ref["num_visual_tokens"]

    s2 = fixture_pipeline("nvila").config
    plan = plan_image(side, side, s2, single_image=True)
    ref = _json(f"nvila/img_hopper_{side}x{side}")
    assert plan.grid == (3, 3)
    assert list(plan.grid) == ref["preprocess"]["closest_aspect_ratio_calls"][0]["grid_wh"]
    assert [list(plan.block)] == ref["media"]["image"]["block_sizes"]
    assert len(plan.tiles) == ref["media"]["image"]["num_tensors"] == 14
    assert plan.num_embeddings == ref["num_visual_tokens"] == 442


# ---- every fixture case -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared() -> dict:
    return {case: fixture_pipeline(case.split("/")[0]).prepare(case_messages(spec)) for case, spec in CASES.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_matches_reference(prepared, case: str) -> None:
    prompt = prepared[case]
    ref = _json(case)
    assert prompt.input_ids == ref["prompt"]["input_ids"]
    assert prompt.num_media_embeddings == ref["num_visual_tokens"]
    assert prompt.fused_length == ref["prefill"]["seq_len"]
    assert prompt.input_ids.count(ref["model"]["media_token_ids"]["image"]) == ref["prompt"]["num_media_tokens"]["image"]
    assert prompt.input_ids.count(ref["model"]["media_token_ids"]["video"]) == ref["prompt"]["num_media_tokens"]["video"]

    images = [m for m in prompt.media if m.kind == "image"]
    videos = [m for m in prompt.media if m.kind == "video"]
    img_ref, vid_ref = ref["media"].get("image"), ref["media"].get("video")
    assert bool(images) == bool(img_ref) and bool(videos) == bool(vid_ref)

    grids = [c["grid_wh"] for c in ref["preprocess"]["closest_aspect_ratio_calls"]]
    assert [list(m.plan.grid) for m in images if m.plan.grid is not None] == grids

    if img_ref:
        assert sum(len(m.plan.tiles) for m in images) == img_ref["num_tensors"]
        assert sum(m.pixels.shape[0] for m in images) == img_ref["num_tensors"]
        blocks = [list(m.plan.block) for m in images if m.plan.block is not None]
        assert blocks == (img_ref["block_sizes"] or [])
        per_item = [n for m in images for n in [m.plan.embeds_per_placeholder] * m.plan.placeholders]
        assert per_item == img_ref["num_embeds_per_item"]
        tiling = img_ref["tiling"]
        if tiling["mode"] == "dynamic_s2":
            (plan,) = [m.plan for m in images]
            rows, cols = tiling["last_scale_grid_rows_cols"]
            assert plan.block == (rows, cols)
            assert len(plan.tiles) == sum(tiling["tiles_per_scale"])
            assert plan.tiles[-1].resize == tuple(tiling["last_scale_resized_wh"])
        elif tiling["mode"] == "dynamic":
            (plan,) = [m.plan for m in images]
            assert list(plan.grid) == tiling["grid_cols_rows"]
            assert len(plan.tiles) == tiling["grid_tiles"] + int(tiling["thumbnail"])
            assert plan.tiles[0].resize == tuple(tiling["resized_wh"])
        else:
            assert all(len(m.plan.tiles) == 1 for m in images)
    if vid_ref:
        assert [m.plan.num_frames for m in videos] == vid_ref["frames_per_video"]
        assert [m.num_embeddings for m in videos] == vid_ref["num_embeds_per_item"]
        assert [list(m.pixels.shape) for m in videos] == [t["pixel_shape"] for t in vid_ref["tensors"]]

    arrays = np.load(OUTPUTS / f"{case}.npz")
    for kind, items in (("image", images), ("video", videos)):
        key = f"{kind}_pixel_probe"
        if not items:
            assert key not in arrays
            continue
        probe = torch.cat([m.pixels for m in items])[:, :, ::14, ::14].numpy()
        assert probe.shape == arrays[key].shape
        assert np.array_equal(probe, arrays[key]), f"{case}: pixel probe differs"


# ---- video plans ------------------------------------------------------------------------------------
def test_tsp_plan_rejects_frame_count_not_divisible() -> None:
    with pytest.raises(PromptError, match="12"):
        plan_video(12, NVILA_VIDEO)
    with pytest.raises(PromptError):
        plan_video(12, fixture_pipeline("nvila-video").config)


def test_tsp_plan_counts() -> None:
    # spec §5: 256 frames -> 32 pooled frames x (256 + 1) = 8224 embeddings
    assert plan_video(256, NVILA_VIDEO).num_embeddings == 8224
    # README: nvila-video fixture, 16 frames -> 2 pooled frames x (49 + 1) = 100
    assert plan_video(16, fixture_pipeline("nvila-video").config).num_embeddings == 100


def test_tsp_frame_count_error_through_prepare() -> None:
    pipe = fixture_pipeline("nvila-video")
    spec = CASES["nvila-video/video_avi"]
    with pytest.raises(PromptError):
        pipe.prepare(case_messages(spec), num_frames=12)
    assert pipe.prepare(case_messages(spec), num_frames=8).num_media_embeddings == 1 * (49 + 1)


@pytest.mark.parametrize("T", [1, 7, 8, 13])
def test_basic_video_plan_counts(T: int) -> None:
    # spec §5: NVILA-8B with 8 frames gives 8 x 257 = 2056
    assert plan_video(T, NVILA_8B).num_embeddings == T * 257
    assert plan_video(T, NVILA_LITE).num_embeddings == T * 122
    frame = plan_video(T, NVILA_8B).frame_plan
    assert isinstance(frame, TilePlan) and frame.repeat_channels == 3 and len(frame.tiles) == 1
    # fixtures (README): nvila 49 + 1, nvila-lite 25 + 1 per frame
    assert plan_video(T, fixture_pipeline("nvila").config).num_embeddings == T * 50
    assert plan_video(T, fixture_pipeline("nvila-lite").config).num_embeddings == T * 26
