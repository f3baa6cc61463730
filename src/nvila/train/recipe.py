"""Training recipes as typed data: a YAML file (+ ``key=value`` overrides) -> :class:`Recipe`.

A recipe names the starting checkpoint, the data mixture, which parts train (and how), their learning
rates, the schedule and the checkpointing policy. Every key is checked: a typo is an error naming the
key and the keys that exist, never a silently ignored setting. Relative paths written in the YAML file
are relative to that file; paths given as command-line overrides are relative to the current folder.

    model: ../checkpoints/nvila-lite          # an NVILA checkpoint (folder, Hub id, nvila:nano-base) ...
    assemble: {llm: ..., vision: ..., projector: mlp_downsample_3x3_fix, image_mode: dynamic}  # ... or parts
    data:
      datasets: [{path: data/train.jsonl, media_root: data, ratio: 1.0}]
      max_length: 4096
    train:
      parts: {vision: layernorm, projector: full, llm: frozen}
      lr: {vision: 2.0e-6, projector: 1.0e-4, llm: 1.0e-4}
      lora: {r: 64, alpha: 16, dropout: 0.05}
      max_steps: 100
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nvila.base.errors import ConfigError
from nvila.builders.assemble import AssembleConfig
from nvila.formats.config import IMAGE_MODES, video_pool
from nvila.formats.lora import LoraSettings
from nvila.train.fp8 import FP8_PRECISIONS, FP8_RECIPES

Precision = Literal["auto", "bf16", "fp32", "fp8", "fp8-emulated"]
PRECISIONS = ("auto", "bf16", "fp32", *FP8_PRECISIONS)
OPTIMIZERS = ("adamw", "adamw-fp8")
SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
HUB_KEYS = {("model",), ("assemble", "llm"), ("assemble", "vision")}   # a folder or a Hub id
PATH_KEYS = HUB_KEYS | {("output_dir",), ("train", "init_adapter"), ("train", "feature_cache"), ("data", "datasets", "*", "path"), ("data", "datasets", "*", "media_root")}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset file of the mixture. ``ratio`` scales its share of an epoch: 1.0 = every sample
    once, 0.5 = a random half, 2.0 = every sample twice."""

    path: str
    media_root: str | None = None
    ratio: float = 1.0
    name: str | None = None


@dataclass(frozen=True)
class DataConfig:
    datasets: tuple[DatasetSpec, ...]
    max_length: int | None = None          # fused tokens; default: the model's context length
    overlong: Literal["skip", "error"] = "skip"
    packing: bool = False                  # pack each micro-batch's samples into rows of max_length
    independent_turns: bool = False        # train each question of a conversation as its own single-turn
                                           # prompt, sharing the media prefix (nvila.train.branches)
    image_mode: str | None = None          # tiling override: dynamic_s2 | dynamic | resize
    max_tiles: int | None = None
    num_video_frames: int | None = None
    video_frame_size: int | None = None    # px per video frame (a multiple of the ViT patch size)
    video_pool: list[list[int]] | None = None   # TSP pooling [[t, h, w], ...]; [] keeps every frame


@dataclass(frozen=True)
class TrainConfig:
    parts: dict[str, str] = field(default_factory=lambda: {"vision": "frozen", "projector": "full", "llm": "frozen"})
    lr: dict[str, float] = field(default_factory=dict)
    lora: LoraSettings | None = None     # LoRA on the LLM (peft); parts.llm stays frozen
    init_adapter: str | None = None      # start LoRA + trained tensors from an adapter folder (a later stage)
    batch_size: int = 1                    # samples per micro-batch on each process
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None           # overrides epochs when set
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0             # 0 disables clipping
    precision: Precision = "auto"
    fp8_recipe: Literal["tensorwise", "rowwise"] | None = None   # precision fp8*: scaling (default tensorwise)
    optimizer: Literal["adamw", "adamw-fp8"] = "adamw"            # adamw-fp8: torchao AdamWFp8 (FP8 states)
    gradient_checkpointing: bool = False
    frozen_dtype: Literal["fp32", "bf16"] = "fp32"   # bf16: frozen weights stored in bf16, math in fp32
    save_every: int = 0                    # optimizer steps between resumable checkpoints (0: end only)
    keep_last: int = 2
    distributed: Literal["ddp", "fsdp"] = "ddp"
    feature_cache: str | None = None       # folder of cached ViT tokens (a frozen tower runs once per media)


@dataclass(frozen=True)
class Recipe:
    data: DataConfig
    train: TrainConfig
    model: str | None = None
    assemble: AssembleConfig | None = None
    output_dir: str | None = None
    seed: int = 0
    stage: str = ""
    source: str | None = field(default=None, compare=False)   # the YAML file it came from

    def global_batch(self, world_size: int) -> int:
        return self.train.batch_size * self.train.grad_accum * world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- parsing ---------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of settings")
    raw = _floats(raw)
    _resolve_paths(raw, path.parent.resolve())
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, source=str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``train.max_steps=10`` -> raw["train"]["max_steps"] = 10 (relative paths: current folder)."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    try:
        value = _floats(yaml.safe_load(text)) if text else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from e
    parts = key.split(".")
    node: Any = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} has no item {p!r}")
            node = node[int(p)]
        else:
            node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} has no item {last!r}")
        last = int(last)
    holder = {last: value}
    _resolve_paths(holder, Path.cwd(), prefix=tuple("*" if q.isdigit() else q for q in parts[:-1]))
    node[last] = holder[last]


def _floats(node: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; recipes mean the number."""
    if isinstance(node, dict):
        return {k: _floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_floats(v) for v in node]
    if isinstance(node, str) and SCIENTIFIC.fullmatch(node.strip()):
        return float(node)
    return node


def _resolve_paths(node: Any, base: Path, prefix: tuple[str, ...] = ()) -> None:
    """Make the path-valued keys absolute against ``base`` (Hub ids like ``org/name`` stay as they are)."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = prefix + (str(k),)
            if here in PATH_KEYS and isinstance(v, str) and v:
                node[k] = _absolute(v, base, hub_ok=here in HUB_KEYS)
            else:
                _resolve_paths(v, base, here)
    elif isinstance(node, list):
        for v in node:
            _resolve_paths(v, base, prefix + ("*",))


def _absolute(value: str, base: Path, hub_ok: bool) -> str:
    p = Path(value).expanduser()
    if p.is_absolute() or (hub_ok and value.startswith("nvila:")):      # nvila:nano-base: a built-in model
        return str(p) if p.is_absolute() else value
    local = base / p
    if hub_ok and not local.exists() and value.count("/") == 1 and not value.startswith("."):
        return value          # a Hub id such as Efficient-Large-Model/NVILA-Lite-2B
    return str(local)


def recipe_from_dict(raw: dict[str, Any], source: str | None = None) -> Recipe:
    """Typed, validated recipe from plain data."""
    raw = dict(raw)
    data = dict(_section(raw, "data", required=True))
    datasets = data.pop("datasets", None)
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError("data.datasets must be a non-empty list of {path: ..., ratio: ...} entries")
    data["datasets"] = tuple(_build(DatasetSpec, d, f"data.datasets[{i}]") for i, d in enumerate(datasets))
    train = dict(_section(raw, "train"))
    if train.get("lora") is not None:
        if not isinstance(train["lora"], dict):
            raise ConfigError(f"train.lora must be a mapping of LoRA settings, got {train['lora']!r}")
        train["lora"] = LoraSettings.from_dict(train["lora"])
    if "betas" in train:
        train["betas"] = tuple(train["betas"])
    if raw.get("assemble") is not None:
        raw["assemble"] = _build(AssembleConfig, raw["assemble"], "assemble")
    raw["data"] = _build(DataConfig, data, "data")
    raw["train"] = _build(TrainConfig, train, "train")
    recipe = _build(Recipe, {**raw, "source": source}, "recipe")
    validate(recipe)
    return recipe


def _section(raw: dict[str, Any], key: str, required: bool = False) -> dict[str, Any]:
    value = raw.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"recipe section {key!r} must be a mapping" + (" (it is required)" if value is None else ""))
    return value


def _build(cls: type, values: Any, where: str) -> Any:
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _positive(value: Any, name: str, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{name} must be a {'non-negative' if zero_ok else 'positive'} number, got {value!r}")


def validate(r: Recipe) -> None:
    """Raise ConfigError on values that cannot work (checked before any model is loaded)."""
    if (r.model is None) == (r.assemble is None):
        raise ConfigError("a recipe needs exactly one of 'model' (a checkpoint) or 'assemble' (LLM + vision parts)")
    if not isinstance(r.seed, int):
        raise ConfigError(f"seed must be an integer, got {r.seed!r}")
    for i, d in enumerate(r.data.datasets):
        _positive(d.ratio, f"data.datasets[{i}].ratio")
    d = r.data
    if d.image_mode is not None and d.image_mode not in IMAGE_MODES:
        raise ConfigError(f"data.image_mode {d.image_mode!r} is not one of {list(IMAGE_MODES)}")
    if d.independent_turns and d.packing:
        raise ConfigError("data.independent_turns and data.packing cannot be combined: turns already share one "
                          "row per conversation; set packing: false")
    if d.overlong not in ("skip", "error"):
        raise ConfigError(f"data.overlong must be 'skip' or 'error', got {d.overlong!r}")
    if d.video_pool is not None:
        video_pool(d.video_pool)                         # ConfigError naming the setting
    for name in ("max_length", "max_tiles", "num_video_frames", "video_frame_size"):
        if getattr(d, name) is not None and (not isinstance(getattr(d, name), int) or getattr(d, name) < 1):
            raise ConfigError(f"data.{name} must be a positive integer, got {getattr(d, name)!r}")
    t = r.train
    for name in ("batch_size", "grad_accum", "keep_last"):
        if not isinstance(getattr(t, name), int) or getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be a positive integer, got {getattr(t, name)!r}")
    if t.max_steps is not None and (not isinstance(t.max_steps, int) or t.max_steps < 1):
        raise ConfigError(f"train.max_steps must be a positive integer, got {t.max_steps!r}")
    if not isinstance(t.save_every, int) or t.save_every < 0:
        raise ConfigError(f"train.save_every must be an integer >= 0, got {t.save_every!r}")
    _positive(t.epochs, "train.epochs")
    for name in ("weight_decay", "max_grad_norm", "eps"):
        _positive(getattr(t, name), f"train.{name}", zero_ok=True)
    if not 0 <= t.warmup_ratio < 1 or not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {t.precision!r}")
    if t.fp8_recipe is not None:
        if t.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"train.fp8_recipe must be one of {list(FP8_RECIPES)}, got {t.fp8_recipe!r}")
        if t.precision not in FP8_PRECISIONS:
            raise ConfigError(f"train.fp8_recipe is for precision fp8 or fp8-emulated; this recipe's precision is "
                              f"{t.precision}: remove fp8_recipe or set the precision")
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {list(OPTIMIZERS)}, got {t.optimizer!r}")
    if t.frozen_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"train.frozen_dtype must be fp32 or bf16, got {t.frozen_dtype!r}")
    if t.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"train.distributed must be ddp or fsdp, got {t.distributed!r}")
    for part, lr in t.lr.items():
        _positive(lr, f"train.lr.{part}")
    if t.lora is not None:
        if t.parts.get("llm", "frozen") != "frozen":
            raise ConfigError("train.lora trains the LLM through adapters: set train.parts.llm to 'frozen'")
        if "llm" not in t.lr:
            raise ConfigError("train.lora needs a learning rate for the adapters: set train.lr.llm")
    if t.feature_cache is not None and t.parts.get("vision", "frozen") != "frozen":
        raise ConfigError("train.feature_cache reuses the vision tower's output, which only a frozen tower keeps: "
                          f"set train.parts.vision to frozen (it is {t.parts.get('vision')!r}) or remove feature_cache")
    if t.init_adapter is not None and t.lora is None:
        raise ConfigError("train.init_adapter continues a LoRA run: set train.lora to the adapter's settings")
