"""LoRA adapters on the LLM (peft): apply, save, load, merge (folder names: :mod:`nvila.formats.layout`).

NVILA fine-tuning trains LoRA on the LLM, the vision tower's LayerNorms and the full projector. The
LoRA half lives here; the rest is ``params.set_trainable``. Order matters, because ``set_trainable``
sets ``requires_grad`` on every parameter of a part (LoRA ones included)::

    set_trainable(model, {"llm": "frozen", "vision": "layernorm", "projector": "full"})   # first
    apply_lora(model, LoraSettings())                                                   # then LoRA

peft's LoRA layers are swapped into ``model.llm`` in place (``peft.inject_adapter_in_model``), so the LLM
stays the same transformers causal LM (same forward, ``get_input_embeddings``), and
``params.param_groups`` finds the LoRA parameters in its ``llm`` group.

An adapter folder, written atomically by :func:`save_adapter`::

    adapter_config.json               peft LoraConfig                       } standard peft format: loads with
    adapter_model.safetensors         LLM LoRA tensors, peft's keys         } PeftModel.from_pretrained(llm, dir)
    non_lora_trainables.safetensors   every other trained tensor (projector, ViT LayerNorms, ...),
                                      keyed by NvilaModel parameter names; absent when there are none
    nvila_adapter.json                format version, base model, LoRA settings, trained parts
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nvila.base.errors import CheckpointError, ConfigError
from nvila.base.files import atomic_dir, read_json, write_json
from nvila.formats.config import with_media_settings
from nvila.formats.layout import ADAPTER_CONFIG as CONFIG_FILE
from nvila.formats.layout import ADAPTER_FORMAT_VERSION as FORMAT_VERSION
from nvila.formats.layout import ADAPTER_LORA as LORA_FILE
from nvila.formats.layout import ADAPTER_META as META_FILE
from nvila.formats.layout import ADAPTER_OTHER as OTHER_FILE
from nvila.formats.layout import LORA_MARK, PEFT_PREFIX
from nvila.formats.lora import LoraSettings, require_peft
from nvila.model.quantized import replace_module

if TYPE_CHECKING:
    from nvila.model.nvila import NvilaModel

ADAPTER = "default"                      # peft's adapter name; one adapter at a time
PART_PREFIXES = {"vision": "vision.", "projector": "projector.", "llm": "llm."}


# ---- apply -----------------------------------------------------------------------------------------
def lora_layers(llm: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft tuner layer inside ``llm``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in llm.named_modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: NvilaModel) -> bool:
    """True when ``model.llm`` carries LoRA layers (applied or loaded, not yet merged)."""
    return any(LORA_MARK in n for n, _ in model.llm.named_parameters())


def apply_lora(model: NvilaModel, settings: LoraSettings = LoraSettings()) -> int:
    """Put fresh LoRA layers (B = 0, so outputs are unchanged) on ``model.llm``'s target linears.

    Afterwards exactly the LoRA parameters require grad inside the LLM; the vision tower and projector
    are not touched. Call ``params.set_trainable`` before, not after (it would reset the LoRA flags).
    Returns the number of LoRA parameters.
    """
    if has_lora(model):
        raise ConfigError("model.llm already has LoRA layers; merge_lora() them or start from a fresh base model")
    _inject(model.llm, settings.peft_config())
    for name, p in model.llm.named_parameters():
        p.requires_grad_(LORA_MARK in name)
    return sum(p.numel() for n, p in model.llm.named_parameters() if LORA_MARK in n)


def _inject(llm: nn.Module, config: Any) -> None:
    peft = require_peft()
    try:
        peft.inject_adapter_in_model(config, llm, adapter_name=ADAPTER)
    except ValueError as e:   # e.g. no module matches target_modules
        raise ConfigError(f"cannot put LoRA on the LLM: {e}") from None
    for _, layer in lora_layers(llm):
        layer.train(llm.training)   # new modules start in training mode: dropout would be on in an eval model


def _unwrap(llm: nn.Module, merge: bool) -> None:
    """Replace every LoRA layer by its base linear, after folding the LoRA delta into it when ``merge``."""
    with torch.no_grad():
        for name, layer in lora_layers(llm):
            if merge:
                layer.merge(safe_merge=True)   # raises on NaN/inf rather than writing them into the base
            replace_module(llm, name, layer.get_base_layer())
    if hasattr(llm, "peft_config"):
        del llm.peft_config


def merge_lora(model: NvilaModel) -> None:
    """Fold LoRA into the base linears and remove the LoRA modules.

    ``model.llm`` is a plain transformers model again: its ``state_dict`` keys are the original ones,
    so ``nvila.checkpoint.save_checkpoint`` writes a clean official-layout checkpoint.
    """
    if not has_lora(model):
        raise ConfigError("model.llm has no LoRA layers to merge")
    try:
        _unwrap(model.llm, merge=True)
    except ValueError as e:
        raise ConfigError(f"cannot merge LoRA: {e}") from None


# ---- save ------------------------------------------------------------------------------------------
def save_adapter(
    model: NvilaModel, out_dir: str | os.PathLike, settings: LoraSettings, base: str | None = None,
    replace: bool = False, config: dict[str, Any] | None = None,
) -> Path:
    """Write the LoRA tensors and every other trainable tensor as an adapter folder (atomically).

    ``settings`` must be the ones ``apply_lora`` used; ``base`` (path or Hub id of the base checkpoint)
    is recorded for people and tools, not checked when loading. ``replace``: an existing adapter folder is
    replaced once the new one is complete. ``config``: media settings the adapter was trained with
    (:data:`nvila.formats.config.MEDIA_SETTINGS`, e.g. ``{"num_video_frames": 32, "video_pool": [[4, 1, 1]]}``),
    applied to the model's config whenever the adapter is loaded.
    """
    from safetensors.torch import save_file

    if not has_lora(model):
        raise ConfigError("the model has no LoRA layers; call apply_lora() before save_adapter()")
    _check_settings(model.llm, settings)
    lora = {k: _cpu(t) for k, t in lora_state(model.llm).items()}
    other = {n: _cpu(p) for n, p in model.named_parameters() if p.requires_grad and LORA_MARK not in n}
    base = str(base) if base is not None else None
    meta = {
        "format_version": FORMAT_VERSION,
        "base": base,
        "lora": settings.to_dict(),
        "parts": ["llm"] + [part for part, prefix in PART_PREFIXES.items()
                            if part != "llm" and any(n.startswith(prefix) for n in other)],
        "lora_tensors": len(lora),
        "non_lora_tensors": sorted(other),
    }
    if config:
        with_media_settings(model.cfg, config)          # refuses unknown or impossible settings now
        meta["config"] = dict(config)
    with atomic_dir(out_dir, replace=replace) as tmp:
        settings.peft_config(base).save_pretrained(str(tmp))
        save_file(lora, str(tmp / LORA_FILE), metadata={"format": "pt"})
        if other:
            save_file(other, str(tmp / OTHER_FILE), metadata={"format": "pt"})
        write_json(tmp / META_FILE, meta)
    return Path(out_dir)


def lora_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The LLM's LoRA tensors under the keys peft writes (views of the parameters, not copies)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(llm, adapter_name=ADAPTER, save_embedding_layers=False)
    return {PEFT_PREFIX + k: t for k, t in state.items()}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def applied_settings(llm: nn.Module) -> LoraSettings:
    """The settings of the LoRA layers on ``llm`` (target modules sorted)."""
    cfg = llm.peft_config[ADAPTER]
    return LoraSettings(r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=tuple(sorted(cfg.target_modules)))


def same_settings(a: LoraSettings, b: LoraSettings) -> bool:
    return (a.r, a.alpha, a.dropout, set(a.target_modules)) == (b.r, b.alpha, b.dropout, set(b.target_modules))


def _check_settings(llm: nn.Module, settings: LoraSettings) -> None:
    """The settings written to the folder must describe the layers actually on the model."""
    used = applied_settings(llm)
    if not same_settings(used, settings):
        raise ConfigError(f"save_adapter settings {settings} differ from the applied LoRA {used}; pass the "
                          "settings given to apply_lora")


# ---- load ------------------------------------------------------------------------------------------
def load_adapter(model: NvilaModel, adapter_dir: str | os.PathLike) -> None:
    """Put an adapter folder's LoRA layers on ``model.llm`` and copy in all of its tensors (strictly).

    Also reads plain peft LLM adapters (no nvila_adapter.json). Every tensor is checked before any is
    copied; a missing, unexpected or mis-shaped one raises CheckpointError and leaves the model as it was.
    Inside the LLM, ``requires_grad`` ends up as after :func:`apply_lora` (only LoRA), so training can resume.
    The media settings the adapter records (``config``) replace the model's.
    """
    folder = find_adapter(adapter_dir)
    meta = read_json(folder / META_FILE) if (folder / META_FILE).is_file() else None
    if meta is not None and meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / META_FILE} has format_version {meta.get('format_version')!r}; "
                              f"this nvila reads version {FORMAT_VERSION}")
    has_other = (folder / OTHER_FILE).is_file()
    if meta is not None and meta.get("non_lora_tensors") and not has_other:
        raise CheckpointError(f"{folder} is missing {OTHER_FILE}, which {META_FILE} lists")
    config = _read_config(folder)
    media = meta.get("config") if meta is not None else None
    try:
        new_cfg = with_media_settings(model.cfg, media) if media else model.cfg
    except ConfigError as e:
        raise CheckpointError(f"{folder / META_FILE}: its media settings do not fit this base model: {e}") from None
    if has_lora(model):
        raise ConfigError("model.llm already has LoRA layers; load the adapter into a fresh base model")
    try:
        _inject(model.llm, config)
    except ConfigError as e:
        raise CheckpointError(f"LoRA adapter {folder} does not fit this base model: {e}") from None
    try:
        lora = lora_state(model.llm)
        params = {n: p for n, p in model.named_parameters() if LORA_MARK not in n}
        sources = [(folder / LORA_FILE, lora, True)] + ([(folder / OTHER_FILE, params, False)] if has_other else [])
        for file, targets, complete in sources:
            _check_tensors(folder, file, targets, complete)
        with torch.no_grad():
            for file, targets, _ in sources:
                _copy_tensors(file, targets)
        model.cfg = new_cfg
    except BaseException:
        _unwrap(model.llm, merge=False)
        raise


def find_adapter(adapter_dir: str | os.PathLike) -> Path:
    """The adapter folder as a Path; CheckpointError if it is missing or not an adapter folder."""
    folder = Path(adapter_dir).expanduser()
    if not folder.exists():
        raise CheckpointError(f"LoRA adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; a LoRA adapter is a folder (written by save_adapter)")
    missing = [name for name in (CONFIG_FILE, LORA_FILE) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is not a LoRA adapter folder: missing {', '.join(missing)} "
                              f"(an adapter holds {CONFIG_FILE} + {LORA_FILE}, as written by save_adapter)")
    return folder


def _read_config(folder: Path) -> Any:
    raw = read_json(folder / CONFIG_FILE)
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder / CONFIG_FILE} describes a {raw.get('peft_type')!r} adapter; "
                              "nvila loads LoRA adapters only")
    peft = require_peft()
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a valid LoRA config: {e}") from None
    config.inference_mode = False   # keep the loaded LoRA trainable (resuming); inference ignores the flag
    return config


def _check_tensors(folder: Path, file: Path, targets: dict[str, torch.Tensor], complete: bool) -> None:
    """Compare a safetensors header with the model's tensors; ``complete``: every target must be there."""
    from safetensors import SafetensorError, safe_open

    unexpected, shapes = [], []
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                if key not in targets:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(targets[key].shape):
                    shapes.append(f"{key}: adapter {shape} vs model {tuple(targets[key].shape)}")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
    missing = sorted(set(targets) - set(keys)) if complete else []
    if not (missing or unexpected or shapes):
        return
    msg = [f"LoRA adapter {folder} does not fit this base model ({file.name}); "
           "it was trained for a different base model:"]
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            msg.append(f"  {label}: {', '.join(items[:5])}{more}")
    raise CheckpointError("\n".join(msg))


def _copy_tensors(file: Path, targets: dict[str, torch.Tensor]) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            targets[key].copy_(f.get_tensor(key))
