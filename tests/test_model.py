"""Model building blocks against independent references.

* space-to-channel, projectors, S2 merge and TSP against explicit python-loop re-derivations of the
  spec (NVILA.md §2.3, §4, §5), never against our own outputs;
* the vision tower against transformers' own ``SiglipVisionModel`` (hidden_states) on a tiny random config;
* fusion on a tiny random Qwen2;
* every fixture case's media embeddings against the reference's recorded ``*_embeds``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CHECKPOINTS, OUTPUTS, case_messages, fixture_cases, fixture_pipeline
from safetensors import safe_open
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from nvila.base.errors import ConfigError, PromptError
from nvila.formats.config import NvilaConfig
from nvila.model.nvila import NvilaModel
from nvila.model.projector import PROJECTORS, Projector, SpaceToChannel, downsample_factor
from nvila.model.s2 import merge_scales, raster_tokens
from nvila.model.temporal import tsp_pool
from nvila.model.vision import VisionTower

CASES = fixture_cases()


# ---- references written with explicit loops --------------------------------------------------------
def ref_space_to_channel(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S*S, C) -> (B, ceil(S/k)^2, k*k*C): cell (I, J) = [x(kI+dr, kJ+dc) for dr for dc], zeros outside."""
    B, L, C = x.shape
    S = math.isqrt(L)
    s = -(-S // k)
    out = torch.zeros(B, s * s, k * k * C, dtype=x.dtype)
    for b in range(B):
        for I in range(s):
            for J in range(s):
                parts = []
                for dr in range(k):
                    for dc in range(k):
                        r, c = k * I + dr, k * J + dc
                        if r < S and c < S:
                            parts.append(x[b, r * S + c])
                        else:
                            parts.append(torch.zeros(C, dtype=x.dtype))
                out[b, I * s + J] = torch.cat(parts)
    return out


def ref_stitch(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, G*G, C) row-major tiles, row-major tokens -> (C, rows*G, cols*G) map, by loops."""
    n, L, C = tiles.shape
    G = math.isqrt(L)
    out = torch.empty(C, rows * G, cols * G, dtype=tiles.dtype)
    for t in range(n):
        r, c = divmod(t, cols)
        for p in range(L):
            y, x = divmod(p, G)
            out[:, r * G + y, c * G + x] = tiles[t, p]
    return out


def ref_area_resize(m: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Spec §2.3: output cell i averages input cells [floor(i*in/out), ceil((i+1)*in/out)) on each axis."""
    C, H, W = m.shape
    out = torch.empty(C, out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        y0, y1 = (i * H) // out_h, -(-((i + 1) * H) // out_h)
        for j in range(out_w):
            x0, x1 = (j * W) // out_w, -(-((j + 1) * W) // out_w)
            out[:, i, j] = m[:, y0:y1, x0:x1].double().mean(dim=(1, 2))
    return out.to(m.dtype)


def ref_merge(tiles: torch.Tensor, scale_factors: list[int], block: tuple[int, int], pool: str) -> torch.Tensor:
    rows, cols = block
    G = math.isqrt(tiles.shape[1])
    maps, start = [], 0
    for k in scale_factors:
        maps.append(ref_stitch(tiles[start : start + k * k], k, k))
        start += k * k
    maps.append(ref_stitch(tiles[start:], rows, cols))
    H, W = rows * G, cols * G
    if pool == "adaptive":
        resized = [F.adaptive_avg_pool2d(m[None], (H, W))[0] for m in maps]
    else:
        resized = [ref_area_resize(m, H, W) for m in maps]
    full = torch.cat(resized, dim=0)                               # (C * n_scales, H, W)
    chunks = torch.empty(rows * cols, G * G, full.shape[0], dtype=full.dtype)
    for r in range(rows):
        for c in range(cols):
            for y in range(G):
                for x in range(G):
                    chunks[r * cols + c, y * G + x] = full[:, r * G + y, c * G + x]
    return chunks


def ref_raster(chunks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Token index = Y * W + X over the (rows*g, cols*g) map."""
    n, L, D = chunks.shape
    g = math.isqrt(L)
    W = cols * g
    out = torch.empty(rows * g * cols * g, D, dtype=chunks.dtype)
    for r in range(rows):
        for c in range(cols):
            for y in range(g):
                for x in range(g):
                    out[(r * g + y) * W + (c * g + x)] = chunks[r * cols + c, y * g + x]
    return out


# ---- space to channel -----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("S", [4, 5, 6, 7, 9, 14])
def test_space_to_channel_matches_loops(k: int, S: int) -> None:
    torch.manual_seed(S * 10 + k)
    x = torch.randn(2, S * S, 3)
    got = SpaceToChannel(k)(x)
    want = ref_space_to_channel(x, k)
    assert got.shape == want.shape == (2, (-(-S // k)) ** 2, k * k * 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_space_to_channel_zero_pads_bottom_right() -> None:
    S, k, C = 5, 3, 2
    x = torch.arange(1, S * S * C + 1, dtype=torch.float32).view(1, S * S, C)
    out = SpaceToChannel(k)(x)                                    # (1, 4, 18)
    # cell (1, 1) covers rows 3..5, cols 3..5: only (3,3), (3,4), (4,3), (4,4) exist
    cell = out[0, 3].view(k, k, C)
    assert torch.all(cell[2] == 0) and torch.all(cell[:, 2] == 0)
    assert torch.equal(cell[0, 0], x[0, 3 * S + 3]) and torch.equal(cell[1, 1], x[0, 4 * S + 4])
    # cell (0, 0) has no padding at all
    assert torch.all(out[0, 0] != 0)


def test_space_to_channel_rejects_non_square() -> None:
    with pytest.raises(ValueError):
        SpaceToChannel(2)(torch.zeros(1, 12, 3))


# ---- projectors -------------------------------------------------------------------------------------
OFFICIAL_KEYS = {
    2: lambda C, D: {"layers.1.weight": (4 * C,), "layers.1.bias": (4 * C,), "layers.2.weight": (D, 4 * C),
                     "layers.2.bias": (D,), "layers.4.weight": (D, D), "layers.4.bias": (D,)},
    3: lambda C, D: {"layers.1.weight": (9 * C,), "layers.1.bias": (9 * C,), "layers.2.weight": (3 * C, 9 * C),
                     "layers.2.bias": (3 * C,), "layers.4.weight": (3 * C,), "layers.4.bias": (3 * C,),
                     "layers.5.weight": (D, 3 * C), "layers.5.bias": (D,), "layers.7.weight": (D, D),
                     "layers.7.bias": (D,)},
}
SPEC_FACTOR = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}


def test_registry_is_the_spec_set() -> None:
    assert set(PROJECTORS) == set(SPEC_FACTOR)


@pytest.mark.parametrize("name", sorted(SPEC_FACTOR))
def test_projector_parameter_names_and_shapes(name: str) -> None:
    k = SPEC_FACTOR[name]
    assert downsample_factor(name) == k
    for C, D in [(5, 7), (64, 32)]:
        proj = Projector(name, C, D)
        got = {n: tuple(p.shape) for n, p in proj.state_dict().items()}
        assert got == OFFICIAL_KEYS[k](C, D)


@pytest.mark.parametrize("variant", ["nvila", "nvila-lite", "nvila-video"])
def test_projector_keys_equal_official_checkpoint(variant: str) -> None:
    root = CHECKPOINTS / variant
    name = json.loads((root / "mm_projector" / "config.json").read_text())["mm_projector_type"]
    with safe_open(str(root / "mm_projector" / "model.safetensors"), "pt") as f:
        official = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    C = json.loads((root / "config.json").read_text())["mm_hidden_size"]
    D = json.loads((root / "llm" / "config.json").read_text())["hidden_size"]
    assert {n: tuple(p.shape) for n, p in Projector(name, C, D).state_dict().items()} == official


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if is_norm_weight else 0.0))


@pytest.mark.parametrize("name", sorted(SPEC_FACTOR))
@pytest.mark.parametrize("S", [4, 5])
def test_projector_forward_is_manual_composition(name: str, S: int) -> None:
    C, D = 3, 8
    proj = Projector(name, C, D)
    _randomize(proj, 7)
    sd = {k: v.detach() for k, v in proj.state_dict().items()}
    torch.manual_seed(S)
    x = torch.randn(2, S * S, C)
    k = SPEC_FACTOR[name]
    h = ref_space_to_channel(x, k)

    def gelu(t: torch.Tensor) -> torch.Tensor:       # exact erf GELU
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))

    def ln(t: torch.Tensor, i: int) -> torch.Tensor:
        return F.layer_norm(t, t.shape[-1:], sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"], eps=1e-5)

    def lin(t: torch.Tensor, i: int) -> torch.Tensor:
        return t @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]

    if k == 2:
        want = lin(gelu(lin(ln(h, 1), 2)), 4)
    else:
        want = lin(gelu(lin(ln(gelu(lin(ln(h, 1), 2)), 4), 5)), 7)
    with torch.no_grad():
        got = proj(x)
    assert got.shape == (2, (-(-S // k)) ** 2, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unknown_projector_is_config_error() -> None:
    with pytest.raises(ConfigError, match="mlp_bogus"):
        Projector("mlp_bogus", 4, 4)
    with pytest.raises(ConfigError):
        downsample_factor("linear")


# ---- S2 merge ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [(3, 3), (3, 4), (2, 6), (1, 9), (4, 3)])
def test_merge_scales_matches_loops(block: tuple[int, int]) -> None:
    rows, cols = block
    G, C = 4, 3
    torch.manual_seed(rows * 100 + cols)
    tiles = torch.randn(1 + 4 + rows * cols, G * G, C)
    got = merge_scales(tiles, [1, 2], block)
    assert got.shape == (rows * cols, G * G, 3 * C)
    # adaptive_avg_pool2d reference, and the spec's explicit interval-average formula
    torch.testing.assert_close(got, ref_merge(tiles, [1, 2], block, "adaptive"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, ref_merge(tiles, [1, 2], block, "loops"), atol=1e-6, rtol=1e-6)
    # the last scale is not resized: its channels are the raw tile tokens, chunk by chunk
    torch.testing.assert_close(got[:, :, 2 * C :], tiles[5:], rtol=0, atol=0)
    # the first scale (1 tile, integer upscale) is pure replication of the single tile's tokens
    if block == (3, 3):
        full0 = ref_stitch(tiles[:1], 1, 1)                       # (C, G, G)
        chunk = got[4, :, :C]                                      # centre chunk (r=1, c=1)
        for y in range(G):
            for x in range(G):
                Y, X = G + y, G + x                                # position in the 3G x 3G map
                torch.testing.assert_close(chunk[y * G + x], full0[:, Y // 3, X // 3])


def test_merge_scales_rejects_too_many_tiles() -> None:
    with pytest.raises(ValueError, match="expected 14"):
        merge_scales(torch.randn(1 + 4 + 10, 16, 2), [1, 2], (3, 3))


def test_merge_scales_rejects_too_few_tiles() -> None:
    with pytest.raises(ValueError, match="expected 14"):
        merge_scales(torch.randn(1 + 4 + 8, 16, 2), [1, 2], (3, 3))


@pytest.mark.parametrize("block", [(3, 3), (3, 4), (2, 6), (1, 9)])
def test_raster_tokens_is_global_raster_order(block: tuple[int, int]) -> None:
    rows, cols = block
    g, D = 2, 3
    torch.manual_seed(rows + 10 * cols)
    chunks = torch.randn(rows * cols, g * g, D)
    got = raster_tokens(chunks, rows, cols)
    torch.testing.assert_close(got, ref_raster(chunks, rows, cols), rtol=0, atol=0)
    # token 1 is the right neighbour of token 0 in the first chunk, token W the one below it
    W = cols * g
    assert torch.equal(got[1], chunks[0, 1]) and torch.equal(got[W], chunks[0, g])
    if cols > 1:
        assert torch.equal(got[g], chunks[1, 0])                  # next chunk starts after g tokens in row 0


# ---- TSP --------------------------------------------------------------------------------------------
def ref_tsp(frames: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    T, n, D = frames.shape
    s = math.isqrt(n)
    out = torch.zeros(T // t, (s // h) * (s // w), D, dtype=torch.float64)
    for i in range(T // t):
        for I in range(s // h):
            for J in range(s // w):
                acc = torch.zeros(D, dtype=torch.float64)
                for f in range(i * t, (i + 1) * t):
                    for dy in range(h):
                        for dx in range(w):
                            acc += frames[f, (I * h + dy) * s + (J * w + dx)].double()
                out[i, I * (s // w) + J] = acc / (t * h * w)
    return out.float()


@pytest.mark.parametrize("pool", [(8, 1, 1), (2, 2, 2), (4, 1, 2), (1, 1, 1)])
def test_tsp_pool_matches_loops(pool: tuple[int, int, int]) -> None:
    torch.manual_seed(sum(pool))
    frames = torch.randn(16, 16, 3)
    got = tsp_pool(frames, pool)
    want = ref_tsp(frames, *pool)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_tsp_pool_rejects_non_divisible_frames() -> None:
    with pytest.raises(ValueError):
        tsp_pool(torch.randn(12, 16, 3), (8, 1, 1))
    with pytest.raises(ValueError):
        tsp_pool(torch.randn(8, 25, 3), (8, 2, 2))


# ---- vision tower vs transformers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def siglip():
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                             image_size=56, patch_size=14)
    model = SiglipVisionModel(cfg).eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    return model, pixels, out


@pytest.mark.parametrize("select_layer,index", [(-2, -2), (-1, -1), (0, 0), (1, 1), (-3, 1)])
def test_vision_tower_equals_transformers_hidden_states(siglip, select_layer: int, index: int) -> None:
    model, pixels, out = siglip
    assert len(out.hidden_states) == 4
    with torch.no_grad():
        got = VisionTower(model, select_layer=select_layer)(pixels)
    want = out.hidden_states[index]
    assert got.shape == want.shape == (2, 16, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if select_layer == -1:   # not the post-layernormed output
        assert (got - out.last_hidden_state).abs().max() > 1e-3
    if select_layer == 0:
        with torch.no_grad():
            torch.testing.assert_close(got, model.embeddings(pixels), atol=1e-6, rtol=1e-6)


def test_vision_tower_patch_feature_drops_first_token(siglip) -> None:
    model, pixels, out = siglip
    with torch.no_grad():
        got = VisionTower(model, select_layer=-2, select_feature="patch")(pixels)
    torch.testing.assert_close(got, out.hidden_states[-2][:, 1:], atol=1e-6, rtol=1e-6)


def test_vision_tower_rejects_out_of_range_layer(siglip) -> None:
    with pytest.raises(ValueError):
        VisionTower(siglip[0], select_layer=-5)
    with pytest.raises(ValueError):
        VisionTower(siglip[0], select_layer=4)


# ---- fusion -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model() -> NvilaModel:
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()
    vcfg = SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)
    cfg = NvilaConfig(image_mode="resize", tile_size=28, patch_size=14, projector_type="mlp_downsample_2x2_fix",
                      mm_hidden_size=16, llm_hidden_size=32)
    vision = VisionTower(SiglipVisionModel(vcfg).eval())
    return NvilaModel(cfg, vision, Projector(cfg.projector_type, 16, 32), llm, {"image": 98, "video": 99}, [7])


def test_fuse_places_blocks_at_placeholders(tiny_model: NvilaModel) -> None:
    ids = [5, 98, 1, 2, 99, 3, 98, 98]
    torch.manual_seed(1)
    blocks = [torch.randn(2, 32), torch.randn(3, 32), torch.randn(1, 32), torch.randn(4, 32)]
    with torch.no_grad():
        got = tiny_model.fuse(ids, blocks)
    table = tiny_model.llm.get_input_embeddings().weight.detach()
    rows, it = [], iter(blocks)
    for t in ids:
        if t in (98, 99):
            rows.extend(next(it))
        else:
            rows.append(table[t])
    want = torch.stack(rows)
    assert got.shape == (len(ids) - 4 + 10, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fuse_without_media_is_plain_embedding(tiny_model: NvilaModel) -> None:
    with torch.no_grad():
        got = tiny_model.fuse([3, 1, 4], [])
    torch.testing.assert_close(got, tiny_model.llm.get_input_embeddings().weight[[3, 1, 4]].detach())


@pytest.mark.parametrize("n_blocks", [1, 5])
def test_fuse_count_mismatch_names_both_counts(tiny_model: NvilaModel, n_blocks: int) -> None:
    ids = [5, 98, 1, 99, 98]
    with pytest.raises(PromptError) as e:
        tiny_model.fuse(ids, [torch.zeros(2, 32)] * n_blocks)
    msg = str(e.value)
    assert "3" in msg and str(n_blocks) in msg


# ---- fixture-level embeddings -----------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_media_embeddings_equal_reference(case: str) -> None:
    spec = CASES[case]
    pipe = fixture_pipeline(case.split("/")[0])
    prompt = pipe.prepare(case_messages(spec))
    arrays = np.load(OUTPUTS / f"{case}.npz")
    key = next((k for k in ("image_embeds", "video_embeds") if k in arrays), None)
    with torch.inference_mode():
        blocks = pipe.model.embed_media(prompt.media)
    if key is None:                                                # text-only case
        assert prompt.media == [] and blocks == []
        return
    got = torch.cat(blocks).float().numpy()
    want = arrays[key]
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err < 1e-4, f"{case}: max |embedding error| {err:.2e}"
