"""Typed configuration of an NVILA model: parsed once from the official ``config.json``, written back by
:meth:`NvilaConfig.to_official`, the only producer of that file.

The released checkpoints keep their settings in a LLaVA-style top-level ``config.json`` whose values come
in loose string forms (``s2_scales: "448,896,1344"``, encoder entries as Hydra JSON strings, keys that are
absent and fall back to class defaults). :func:`NvilaConfig.from_official` turns that into frozen, typed
data at the boundary; nothing downstream looks at the raw dict again. The raw dict is kept
(``NvilaConfig.raw``) for the entries nvila does not interpret, so an unchanged configuration writes the
same file back; a changed one (``dataclasses.replace``) writes its typed values under their official keys.
:meth:`NvilaConfig.for_parts` makes the configuration of a new model (random presets, assembled models).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from nvila.base.errors import ConfigError

ImageMode = Literal["dynamic_s2", "dynamic", "resize"]
IMAGE_MODES: tuple[str, ...] = get_args(ImageMode)

# Space-to-channel block side of each projector type (token geometry needs it; the modules themselves are
# built by nvila.model.projector.PROJECTORS, which has exactly these keys).
PROJECTOR_DOWNSAMPLE: dict[str, int] = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
VideoEncoderKind = Literal["basic", "tsp"]

# Top-level keys absent from the NVILA-8B release config take these class defaults.
DEFAULT_MIN_TILES = 1
DEFAULT_MAX_TILES = 12
DEFAULT_NUM_VIDEO_FRAMES = 8

# `_target_` class names of the reference's Hydra encoder entries -> our kinds.
_VIDEO_ENCODERS: dict[str, VideoEncoderKind] = {"BasicVideoEncoder": "basic", "TSPVideoEncoder": "tsp"}
_IMAGE_ENCODERS = {"BasicImageEncoder"}
_VIDEO_TARGETS = {"basic": "llava.model.encoders.BasicVideoEncoder", "tsp": "llava.model.encoders.TSPVideoEncoder"}


@dataclass(frozen=True)
class VideoEncoderConfig:
    """How frame embeddings become the embedding block of one video.

    ``basic``: every frame's tokens followed by the end ("\\n") embedding.
    ``tsp``: temporal-spatial pooling of the *projected* frame tokens; each ``(t, h, w)`` in ``pool_sizes``
    averages ``t`` consecutive frames and ``h x w`` spatial cells (NVILA-8B-Video: ``[(8, 1, 1)]``).
    """

    kind: VideoEncoderKind = "basic"
    pool_sizes: tuple[tuple[int, int, int], ...] = ()

    @property
    def frame_multiple(self) -> int:
        """The number of frames must be a multiple of this (the product of temporal pool sizes' lcm)."""
        multiple = 1
        for t, _, _ in self.pool_sizes:
            multiple = _lcm(multiple, t)
        return multiple


@dataclass(frozen=True)
class NvilaConfig:
    """Everything that decides how media become LLM embeddings, plus context limits.

    Vision/LLM architecture details live in the transformers configs of the sub-folders; this holds
    the NVILA-specific glue between them.
    """

    image_mode: ImageMode
    tile_size: int                      # pixels per square tile (448 for the released models)
    patch_size: int                     # ViT patch size (14)
    projector_type: str                 # key of nvila.model.projector.PROJECTORS
    mm_hidden_size: int                 # projector input channels
    llm_hidden_size: int
    s2_scales: tuple[int, ...] = ()     # dynamic_s2 only, ascending, scales[0] == tile_size
    min_tiles: int = DEFAULT_MIN_TILES
    max_tiles: int = DEFAULT_MAX_TILES
    select_layer: int = -2              # index into the ViT's hidden_states tuple
    select_feature: Literal["cls_patch", "patch"] = "cls_patch"
    num_video_frames: int = DEFAULT_NUM_VIDEO_FRAMES
    video_encoder: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    video_frame_size: int | None = None  # pixels per (square) video frame; None: tile_size (every released model)
    num_time_tokens: int = 0            # NVILA-8B-Video's <t0>..<tN-1> (nvila.processing.timestamps)
    time_token_format: str = "<t{t}>"
    model_max_length: int = 8192        # context limit used to reject over-long prompts
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    chat_template: str | None = None    # name of a built-in template; None: the tokenizer's own
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def grid_size(self) -> int:
        """Patch tokens per side of one tile (32 for 448/14)."""
        return self.tile_size // self.patch_size

    @property
    def downsample(self) -> int:
        """Side of the space-to-channel block of the projector (2 or 3)."""
        return downsample_factor(self.projector_type)

    @property
    def frame_size(self) -> int:
        """Pixels per side of one video frame: ``video_frame_size`` when set, else the tile size."""
        return self.video_frame_size or self.tile_size

    def token_side(self, size: int) -> int:
        """LLM tokens per side of a ``size`` px square after the projector (its space-to-channel fold pads)."""
        return -(-(size // self.patch_size) // self.downsample)

    @property
    def frame_token_side(self) -> int:
        """LLM tokens per side of one (unpooled) video frame after the projector."""
        return self.token_side(self.frame_size)

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one tile yields after the projector (256 for 2x2, 121 for 3x3 at 448 px)."""
        return self.token_side(self.tile_size) ** 2

    @classmethod
    def from_official(
        cls,
        raw: dict[str, Any],
        vision: dict[str, Any],
        projector: dict[str, Any],
        llm: dict[str, Any],
        preprocessor: dict[str, Any] | None = None,
    ) -> "NvilaConfig":
        """Build from the top-level ``config.json``, the sub-folders' ``config.json`` dicts and
        ``vision_tower/preprocessor_config.json`` (SigLIP defaults when absent)."""
        pre = preprocessor or {}
        dynamic_s2 = bool(raw.get("dynamic_s2", False))
        aspect = raw.get("image_aspect_ratio")
        if dynamic_s2:
            mode: ImageMode = "dynamic_s2"
        elif aspect in ("dynamic", "resize"):
            mode = aspect
        else:
            raise ConfigError(
                f"image_aspect_ratio={aspect!r} is not supported; NVILA checkpoints use 'dynamic_s2' "
                "(with dynamic_s2: true), 'dynamic' or 'resize'"
            )
        tile = _int(_require(vision, "image_size", "vision_tower/config.json"), "image_size")
        scales: tuple[int, ...] = ()
        if mode == "dynamic_s2":
            scales = parse_scales(_require(raw, "s2_scales", "config.json"))
            idx = _int(raw.get("s2_resize_output_to_scale_idx", -1), "s2_resize_output_to_scale_idx")
            if idx not in (-1, len(scales) - 1):
                raise ConfigError(f"s2_resize_output_to_scale_idx={idx} is not supported (only -1, the last scale)")
            # The reference forces the processor size to the first scale for S2 models.
            tile = scales[0]
        proj_type = _require(projector, "mm_projector_type", "mm_projector/config.json")
        llm_max = llm.get("tokenizer_model_max_length") or llm.get("model_max_length")
        llm_max = llm_max or raw.get("model_max_length") or llm.get("max_position_embeddings") or 8192
        cfg = cls(
            image_mode=mode,
            tile_size=tile,
            patch_size=_int(_require(vision, "patch_size", "vision_tower/config.json"), "patch_size"),
            projector_type=str(proj_type),
            mm_hidden_size=_int(_require(raw, "mm_hidden_size", "config.json"), "mm_hidden_size"),
            llm_hidden_size=_int(_require(llm, "hidden_size", "llm/config.json"), "hidden_size"),
            s2_scales=scales,
            min_tiles=_int(raw.get("min_tiles", DEFAULT_MIN_TILES), "min_tiles"),
            max_tiles=_int(raw.get("max_tiles", DEFAULT_MAX_TILES), "max_tiles"),
            select_layer=_int(raw.get("mm_vision_select_layer", -2), "mm_vision_select_layer"),
            select_feature=_select_feature(raw.get("mm_vision_select_feature", "cls_patch")),
            num_video_frames=_int(raw.get("num_video_frames", DEFAULT_NUM_VIDEO_FRAMES), "num_video_frames"),
            video_encoder=parse_video_encoder(raw.get("video_encoder")),
            video_frame_size=_optional_int(raw.get("video_frame_size"), "video_frame_size"),
            num_time_tokens=_int(raw.get("num_time_tokens", 0) or 0, "num_time_tokens"),
            time_token_format=_time_format(raw.get("time_token_format")),
            model_max_length=_int(llm_max, "model_max_length"),
            image_mean=_triple(pre.get("image_mean", (0.5, 0.5, 0.5)), "image_mean"),
            image_std=_triple(pre.get("image_std", (0.5, 0.5, 0.5)), "image_std"),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
            chat_template=_optional_str(raw.get("chat_template"), "chat_template"),
            raw=dict(raw),
        )
        _check_image_encoder(raw.get("image_encoder"))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ConfigError on inconsistent values (called by from_official)."""
        if self.tile_size % self.patch_size:
            raise ConfigError(f"tile size {self.tile_size} is not a multiple of the patch size {self.patch_size}")
        if self.image_mode == "dynamic_s2":
            if any(s % self.s2_scales[0] for s in self.s2_scales) or list(self.s2_scales) != sorted(self.s2_scales):
                raise ConfigError(f"s2_scales {list(self.s2_scales)} must ascend in multiples of the first scale")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        if self.num_video_frames < 1:
            raise ConfigError(f"num_video_frames must be >= 1, got {self.num_video_frames}")
        if self.video_frame_size is not None and (self.video_frame_size < self.patch_size
                                                  or self.video_frame_size % self.patch_size):
            raise ConfigError(f"video_frame_size {self.video_frame_size} must be a positive multiple of the patch "
                              f"size {self.patch_size}")

    def to_official(self) -> dict[str, Any]:
        """The top-level ``config.json`` dict: ``raw`` with every typed setting under its official key.

        An entry whose value already parses to the typed one is left as written (``"448,896,1344"`` stays
        a string), and an absent entry whose typed value is the class default stays absent, so
        ``from_official(raw).to_official() == raw``.
        """
        out = dict(self.raw)
        if self.image_mode == "dynamic_s2":
            out["dynamic_s2"] = True
            out.setdefault("image_aspect_ratio", "dynamic_s2")
            if "s2_scales" not in out or parse_scales(out["s2_scales"]) != self.s2_scales:
                out["s2_scales"] = ",".join(map(str, self.s2_scales))
            out.setdefault("s2_max_split_size", self.s2_scales[0])
            out.setdefault("s2_resize_output_to_scale_idx", -1)
        else:
            out["dynamic_s2"] = False
            out["image_aspect_ratio"] = self.image_mode
        for name, (key, default) in _TOP_LEVEL.items():
            value = getattr(self, name)
            if key in out and _written_as(out[key], default) == value:
                continue                                 # keep the entry as written ("12", null, ...)
            if key in out or value != default:
                out[key] = value
        if "video_encoder" in out or self.video_encoder != VideoEncoderConfig():
            if "video_encoder" not in out or parse_video_encoder(out["video_encoder"]) != self.video_encoder:
                out["video_encoder"] = _official_video_encoder(self.video_encoder)
        if "chat_template" in out or self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    @classmethod
    def for_parts(cls, llm: dict[str, Any], vision: dict[str, Any], projector_type: str, image_mode: ImageMode,
                  mm_hidden_size: int | None = None, s2_scales: tuple[int, ...] = (), **settings: Any) -> "NvilaConfig":
        """The configuration of a new model built from an LLM config and a vision config (transformers
        ``to_dict()`` forms), with the release's top-level entries; ``settings``: further typed fields.

        ``mm_hidden_size`` defaults to the vision width times the number of scales (Dynamic-S2 concatenates
        the scales' features on channels).
        """
        if mm_hidden_size is None:
            mm_hidden_size = int(vision["hidden_size"]) * max(1, len(s2_scales))
        raw = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": llm["hidden_size"],
               "mm_hidden_size": mm_hidden_size, "mm_vision_select_layer": -2,
               "mm_vision_select_feature": "cls_patch", "chat_template": None, "fps": 0.0,
               "model_dtype": "torch.bfloat16", "num_time_tokens": 0, "num_video_frames": DEFAULT_NUM_VIDEO_FRAMES,
               "llm_cfg": llm, "vision_tower_cfg": vision,
               "mm_projector_cfg": {"mm_projector_type": projector_type, "model_type": "v2l_projector",
                                    "architectures": ["MultimodalProjector"]}}
        if image_mode == "dynamic_s2":
            raw.update(dynamic_s2=True, image_aspect_ratio="dynamic_s2", s2_scales=",".join(map(str, s2_scales)),
                       s2_max_split_size=s2_scales[0], s2_resize_output_to_scale_idx=-1)
        else:
            raw.update(dynamic_s2=False, image_aspect_ratio=image_mode)
        base = cls.from_official(raw, vision, raw["mm_projector_cfg"], llm)
        cfg = dataclasses.replace(base, **settings)
        cfg.validate()
        return cfg


def downsample_factor(name: str) -> int:
    """STC block side of a projector type; unknown types are a ConfigError listing the known ones."""
    if name not in PROJECTOR_DOWNSAMPLE:
        raise ConfigError(f"mm_projector_type {name!r} is not supported; known types: {sorted(PROJECTOR_DOWNSAMPLE)}")
    return PROJECTOR_DOWNSAMPLE[name]


def parse_scales(value: Any) -> tuple[int, ...]:
    """Parse ``"448,896,1344"`` (the official string form) or a list into a tuple of ints."""
    try:
        if isinstance(value, str):
            scales = tuple(int(s) for s in value.split(",") if s.strip())
        else:
            scales = tuple(int(s) for s in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"s2_scales {value!r} is not a comma-separated list of integers") from e
    if not scales:
        raise ConfigError("s2_scales is empty")
    return scales


def parse_video_encoder(value: Any) -> VideoEncoderConfig:
    """Parse the Hydra-style ``video_encoder`` entry (a JSON string or dict); absent -> basic."""
    if value is None:
        return VideoEncoderConfig()
    spec = _parse_json_entry(value, "video_encoder")
    target = str(spec.get("_target_", "")).rsplit(".", 1)[-1]
    if target not in _VIDEO_ENCODERS:
        raise ConfigError(f"video_encoder {target!r} is not supported (known: {sorted(_VIDEO_ENCODERS)})")
    kind = _VIDEO_ENCODERS[target]
    pools: tuple[tuple[int, int, int], ...] = ()
    if kind == "tsp":
        try:
            pools = tuple((int(t), int(h), int(w)) for t, h, w in spec.get("pool_sizes", []))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"TSP pool_sizes {spec.get('pool_sizes')!r} must be [[t, h, w], ...]") from e
        if not pools or any(min(p) < 1 for p in pools):
            raise ConfigError(f"TSP pool_sizes {spec.get('pool_sizes')!r} must be non-empty positive triples")
        if spec.get("sep_tokens") or spec.get("start_tokens"):
            raise ConfigError("TSP sep_tokens/start_tokens are not supported (no released model uses them)")
    return VideoEncoderConfig(kind=kind, pool_sizes=pools)


def _official_video_encoder(enc: VideoEncoderConfig) -> str:
    """The Hydra JSON string form of a video encoder entry, as the releases write it."""
    spec: dict[str, Any] = {"_target_": _VIDEO_TARGETS[enc.kind]}
    if enc.kind == "tsp":
        spec["pool_sizes"] = [list(p) for p in enc.pool_sizes]
    return json.dumps(spec)


def _written_as(value: Any, default: Any) -> Any:
    """The typed value an official entry stands for (null: the default; integral strings and floats: int)."""
    if value is None:
        return default
    if isinstance(value, (str, float)) and not isinstance(default, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"config value {name}={value!r} must be a string or null")
    return value or None


def _optional_int(value: Any, name: str) -> int | None:
    return None if value is None else _int(value, name)


def _check_image_encoder(value: Any) -> None:
    if value is None:
        return
    target = str(_parse_json_entry(value, "image_encoder").get("_target_", "")).rsplit(".", 1)[-1]
    if target not in _IMAGE_ENCODERS:
        raise ConfigError(f"image_encoder {target!r} is not supported (known: {sorted(_IMAGE_ENCODERS)})")


def _parse_json_entry(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        spec = json.loads(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} entry {value!r} is not valid JSON") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"{name} entry {value!r} is not a JSON object")
    return spec


def _select_feature(value: Any) -> Literal["cls_patch", "patch"]:
    if value not in ("cls_patch", "patch"):
        raise ConfigError(f"mm_vision_select_feature={value!r} is not supported ('cls_patch' or 'patch')")
    return value


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    try:
        a, b, c = (float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"preprocessor_config.json {name} {value!r} must be three numbers") from e
    return (a, b, c)


def _int(value: Any, name: str) -> int:
    """An integer config value; anything else (text, fractions, booleans) is a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"config value {name}={value!r} must be an integer")
    try:
        number = float(value)
    except ValueError as e:
        raise ConfigError(f"config value {name}={value!r} must be an integer") from e
    if not number.is_integer():
        raise ConfigError(f"config value {name}={value!r} must be an integer")
    return int(number)


def _time_format(value: Any) -> str:
    if value is None:
        return "<t{t}>"
    if not isinstance(value, str) or value.count("{t}") != 1:
        raise ConfigError(f"time_token_format must be a string with one '{{t}}', got {value!r}")
    return value


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where} has no {key!r} entry")
    return d[key]


def _lcm(a: int, b: int) -> int:
    from math import gcd

    return a * b // gcd(a, b)


# Typed field -> (official top-level key, value when the key is absent).
_TOP_LEVEL: dict[str, tuple[str, Any]] = {
    "mm_hidden_size": ("mm_hidden_size", None),
    "min_tiles": ("min_tiles", DEFAULT_MIN_TILES),
    "max_tiles": ("max_tiles", DEFAULT_MAX_TILES),
    "select_layer": ("mm_vision_select_layer", -2),
    "select_feature": ("mm_vision_select_feature", "cls_patch"),
    "num_video_frames": ("num_video_frames", DEFAULT_NUM_VIDEO_FRAMES),
    "video_frame_size": ("video_frame_size", None),
    "num_time_tokens": ("num_time_tokens", 0),
    "time_token_format": ("time_token_format", "<t{t}>"),
}


# ---- media settings a recipe may change (recorded in adapters) ----------------------------------------------
# name -> what it sets. A recipe's ``data`` section and an adapter's ``nvila_adapter.json`` ("config") use
# these names, so a LoRA adapter trained with 32 TSP-pooled frames loads with 32 TSP-pooled frames.
MEDIA_SETTINGS = ("image_mode", "max_tiles", "num_video_frames", "video_frame_size", "video_pool")


def with_media_settings(cfg: NvilaConfig, settings: dict[str, Any]) -> NvilaConfig:
    """``cfg`` with some of :data:`MEDIA_SETTINGS` changed (``video_pool``: TSP ``[[t, h, w], ...]``, ``[]`` for
    no pooling); the projector's input width cannot change, so switching to or from dynamic_s2 is refused."""
    unknown = sorted(set(settings) - set(MEDIA_SETTINGS))
    if unknown:
        raise ConfigError(f"unknown media setting(s) {unknown}; known: {list(MEDIA_SETTINGS)}")
    changes = {k: v for k, v in settings.items() if k != "video_pool"}
    mode = changes.get("image_mode", cfg.image_mode)
    if (mode == "dynamic_s2") != (cfg.image_mode == "dynamic_s2"):
        raise ConfigError(f"image_mode {mode!r} does not fit this checkpoint ({cfg.image_mode}): switching to or "
                          "from dynamic_s2 changes the projector's input width")
    if "video_pool" in settings:
        changes["video_encoder"] = video_pool(settings["video_pool"])
    new = dataclasses.replace(cfg, **changes)
    new.validate()
    return new


def video_pool(value: Any) -> VideoEncoderConfig:
    """``[[t, h, w], ...]`` -> TSP pooling; ``[]`` or None -> no pooling (every frame kept)."""
    if not value:
        return VideoEncoderConfig()
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                              for x in p) for p in value)
    if not ok:
        raise ConfigError(f"video_pool must be a list of [t, h, w] positive integers, e.g. [[4, 1, 1]]; got {value!r}")
    return VideoEncoderConfig("tsp", tuple(tuple(p) for p in value))


def media_settings_of(cfg: NvilaConfig, base: NvilaConfig) -> dict[str, Any]:
    """The :data:`MEDIA_SETTINGS` where ``cfg`` differs from ``base``, as plain JSON values."""
    out: dict[str, Any] = {}
    for name in MEDIA_SETTINGS:
        if name == "video_pool":
            if cfg.video_encoder != base.video_encoder:
                out[name] = [list(p) for p in cfg.video_encoder.pool_sizes]
        elif getattr(cfg, name) != getattr(base, name):
            out[name] = getattr(cfg, name)
    return out
