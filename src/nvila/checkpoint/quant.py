"""Quantized checkpoints: rebuilding the modules a ``quant_config.json`` lists (:mod:`nvila.formats.quant`).

Loading builds the float skeleton, then :func:`apply_quant_config` swaps every listed ``nn.Linear`` for an
empty quantized module of the same shape (and wraps MLPs whose two linears are W8A8 in
:class:`~nvila.model.quantized.W8A8MLP`, which keeps the names); the strict loader of
:mod:`nvila.checkpoint.weights` then checks every name, shape and integer dtype.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nvila.base.errors import CheckpointError
from nvila.formats.layout import QUANT_CONFIG, key_prefix
from nvila.formats.quant import ENTRY_FIELDS, FORMAT_VERSION
from nvila.model.quantized import QUANTIZERS, QuantLinear, fuse_w8a8_mlps, replace_module


def module_name(part_module: nn.Module, part: str, official: str) -> str:
    src, dst = key_prefix(part_module, part)
    if not official.startswith(src):
        raise CheckpointError(f"{QUANT_CONFIG}: module {official!r} of {part} does not start with {src!r}")
    return dst + official[len(src):]


def module_entry(part: str, name: str, module: QuantLinear) -> dict[str, Any]:
    """The ``modules`` entry of a quantized linear (``name``: official prefix)."""
    entry = {"part": part, "name": name, "scheme": module.scheme, "in_features": module.in_features,
             "out_features": module.out_features, "bias": module.bias is not None,
             "input_scale": module.input_scale is not None}
    if module.group_size is not None:
        entry["group_size"] = module.group_size
    return entry


def apply_quant_config(part_module: nn.Module, part: str, config: dict[str, Any]) -> int:
    """Swap the linears ``config`` lists for ``part`` into empty quantized modules; returns the count.

    Raises CheckpointError when the file is malformed or names a module the float skeleton lacks or
    shapes differently.
    """
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{QUANT_CONFIG} has format_version {version!r}; "
                              f"this nvila reads version {FORMAT_VERSION}")
    entries = config.get("modules")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CheckpointError(f"{QUANT_CONFIG} needs a 'modules' list of objects")
    count = 0
    for entry in entries:
        if entry.get("part") != part:
            continue
        missing = [f for f in ENTRY_FIELDS if f not in entry]
        if missing:
            raise CheckpointError(f"{QUANT_CONFIG}: entry {entry.get('name', entry)!r} lacks {missing}")
        replace_module(part_module, module_name(part_module, part, entry["name"]), _empty(part_module, part, entry))
        count += 1
    fuse_w8a8_mlps(part_module)
    return count


def _empty(part_module: nn.Module, part: str, entry: dict[str, Any]) -> QuantLinear:
    """An empty quantized module for ``entry``, after checking it against the float linear it replaces."""
    name = module_name(part_module, part, entry["name"])
    where = f"{QUANT_CONFIG}: {part} module {entry['name']!r}"
    if entry["scheme"] not in QUANTIZERS:
        raise CheckpointError(f"{where} has unknown scheme {entry['scheme']!r} (known: {sorted(QUANTIZERS)})")
    try:
        linear = part_module.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where} does not exist in the model its config.json describes") from None
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{where} is a {type(linear).__name__}, not a Linear layer")
    found = (linear.in_features, linear.out_features)
    listed = (entry["in_features"], entry["out_features"])
    if found != listed:
        raise CheckpointError(f"{where}: (in, out) {listed} in the file but {found} in the model")
    if linear.bias is not None and not entry["bias"]:          # bias correction may add a bias, never drop one
        raise CheckpointError(f"{where} has no bias but the model's layer has one")
    options = {"group_size": int(entry["group_size"])} if entry["scheme"] == "w4a16" and "group_size" in entry else {}
    try:
        return QUANTIZERS[entry["scheme"]](linear.in_features, linear.out_features, bool(entry["bias"]),
                                           bool(entry["input_scale"]), linear.weight.dtype, linear.weight.device,
                                           **options)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
