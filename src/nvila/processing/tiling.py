"""Tile geometry: the one place that decides how an image is cut and how many tokens it becomes.

Pure functions of (image size, config) -> :class:`TilePlan`. The image pipeline crops exactly the tiles a
plan lists, the prompt builder expands placeholders from the plan, and the model checks that the
embeddings it produced match the plan's counts. Nothing else computes token geometry.

Modes (NVILA spec §2):
* ``dynamic_s2`` (NVILA-8B/15B), single image: one tile per square scale (1, then 2x2, ...) + an
  aspect-adaptive grid at the last scale; one placeholder; tokens in raster order over the last-scale grid.
* ``dynamic`` (NVILA-Lite), single image: InternVL grid of 1..12 tiles + a thumbnail when >1 tile; every
  tile is its own placeholder followed by a literal newline in the prompt.
* everything else (``resize`` models, several images in one prompt, video frames): one squashed tile.
"""

from __future__ import annotations

from nvila.base.errors import PromptError
from nvila.formats.config import NvilaConfig
from nvila.formats.plans import Tile, TilePlan, VideoPlan


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with ``min_num <= cols*rows <= max_num`` in the reference's tie-break order.

    The order among equal tile counts matters for exact ties, so it is built as the reference builds it:
    a Python set filled n-major, i-major, j-minor, then stably sorted by tile count.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile: int) -> tuple[int, int]:
    """Pick the grid whose cols/rows ratio is closest to the image's; on an exact tie a later (larger)
    grid wins only if the image has more than half the pixels that grid would hold."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def _grid_tiles(cols: int, rows: int, tile: int) -> list[Tile]:
    size = (tile * cols, tile * rows)
    return [
        Tile(size, (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]


def plan_image(width: int, height: int, cfg: NvilaConfig, *, single_image: bool) -> TilePlan:
    """Decide tiles and token counts for one ``width x height`` image.

    ``single_image`` is True when it is the only image of the prompt: tiling applies only then.
    """
    tile, per_tile = cfg.tile_size, cfg.tokens_per_tile
    if single_image and cfg.image_mode == "dynamic_s2":
        k_last = cfg.s2_scales[-1] // tile
        cols, rows = closest_grid(width, height, candidate_grids(k_last * k_last, cfg.max_tiles), tile)
        return s2_plan(cols, rows, cfg)
    if single_image and cfg.image_mode == "dynamic":
        cols, rows = closest_grid(width, height, candidate_grids(cfg.min_tiles, cfg.max_tiles), tile)
        tiles = _grid_tiles(cols, rows, tile)
        if len(tiles) > 1:
            tiles.append(Tile((tile, tile), (0, 0, tile, tile)))  # thumbnail goes last
        return TilePlan("dynamic", tuple(tiles), (cols, rows), None, 1, len(tiles), per_tile + 1)
    return single_tile_plan(tile, cfg)


def single_tile_plan(size: int, cfg: NvilaConfig) -> TilePlan:
    """One ``size`` px tile, one placeholder (an image of a multi-image prompt, or a video frame); an S2
    model repeats its channels per scale."""
    repeat = len(cfg.s2_scales) if cfg.image_mode == "dynamic_s2" else 1
    side = cfg.token_side(size)
    return TilePlan("single", (Tile((size, size), (0, 0, size, size)),), None, None, repeat, 1, side * side + 1)


def s2_plan(cols: int, rows: int, cfg: NvilaConfig) -> TilePlan:
    """The Dynamic-S2 plan of a single image whose last scale is a ``cols x rows`` grid: one tile per square
    scale (1, then 2x2, ...), then the grid's tiles; one placeholder."""
    tile = cfg.tile_size
    tiles: list[Tile] = []
    for scale in cfg.s2_scales[:-1]:
        k = scale // tile
        tiles += _grid_tiles(k, k, tile)
    tiles += _grid_tiles(cols, rows, tile)
    return TilePlan("dynamic_s2", tuple(tiles), (cols, rows), (rows, cols), 1, 1, cfg.tokens_per_tile * rows * cols + 1)


def plan_video(num_frames: int, cfg: NvilaConfig) -> VideoPlan:
    """Token geometry of a video; raises PromptError when TSP pooling cannot divide the frame count.

    Frames are single tiles of ``cfg.frame_size`` px (the tile size unless the config sets
    ``video_frame_size``)."""
    frame = single_tile_plan(cfg.frame_size, cfg)
    side = cfg.frame_token_side
    enc = cfg.video_encoder
    if enc.kind == "basic":
        return VideoPlan(num_frames, frame, num_frames * frame.embeds_per_placeholder)
    total = 0
    for t, h, w in enc.pool_sizes:
        if num_frames % t or side % h or side % w:
            raise PromptError(
                f"temporal pooling {t}x{h}x{w} needs a frame count divisible by {t} (got {num_frames}); "
                f"ask for a multiple of {enc.frame_multiple} frames"
            )
        total += (num_frames // t) * ((side // h) * (side // w) + 1)
    return VideoPlan(num_frames, frame, total)
