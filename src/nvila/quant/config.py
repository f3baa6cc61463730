"""``quant_config.json``: what a quantized checkpoint folder holds, and rebuilding its modules at load.

A quantized checkpoint is the official layout (config.json, llm/, vision_tower/, mm_projector/) plus::

    ROOT/quant_config.json
    {"format_version": 1,
     "vision": {"scheme": "w8a8", "method": "smoothquant", "alpha": 0.3} | null,
     "llm": {"scheme": "w4a16", "method": "awq", "w_bit": 4, "group_size": 128} | null,
     "group_size": 128,
     "calibration": {"prompts": 16, "tiles": 160, "source": "..."},
     "modules": [{"part": "llm", "name": "model.layers.0.self_attn.q_proj", "scheme": "w4a16",
                  "in_features": 1536, "out_features": 1536, "bias": true, "input_scale": false,
                  "group_size": 128}, ...]}

``modules`` is what loading reads: ``name`` is the official tensor-name prefix inside the part's
safetensors, so the layer's tensors are ``{name}.weight``, ``{name}.weight_scale``, ``{name}.weight_zero``
(W4A16), ``{name}.bias`` and ``{name}.input_scale`` (when ``input_scale`` is true), with the shapes and
dtypes of :mod:`nvila.quant.linear`. Everything else in the folder is an ordinary float checkpoint
(norms that absorbed a smoothing scale are stored as computed). Loading builds the float skeleton,
swaps every listed ``nn.Linear`` for an empty quantized module of the same shape (and wraps MLPs whose two
linears are W8A8 in :class:`~nvila.quant.linear.W8A8MLP`, which keeps the names), and the strict loader
of :mod:`nvila.checkpoint` then checks every name, shape and integer dtype.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nvila.checkpoint import QUANT_CONFIG, key_prefix
from nvila.errors import CheckpointError
from nvila.quant.linear import QUANTIZERS, QuantLinear, W8A8Linear, W8A8MLP

FORMAT_VERSION = 1
ENTRY_FIELDS = ("part", "name", "scheme", "in_features", "out_features", "bias", "input_scale")

def official_name(part_module: nn.Module, part: str, name: str) -> str:
    """Module name inside our part module -> prefix of its tensors in the official safetensors."""
    src, dst = key_prefix(part_module, part)
    return src + name[len(dst):]


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


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``name`` inside ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def fuse_w8a8_mlps(root: nn.Module) -> int:
    """Wrap every MLP of ``root`` (a module with ``fc1``, ``activation_fn``, ``fc2``) whose linears are both
    :class:`W8A8Linear` in a :class:`W8A8MLP`, in place; returns the count."""
    targets = [name for name, m in root.named_modules()
               if isinstance(getattr(m, "fc1", None), W8A8Linear) and isinstance(getattr(m, "fc2", None), W8A8Linear)
               and callable(getattr(m, "activation_fn", None)) and not isinstance(m, W8A8MLP) and name]
    for name in targets:
        replace_module(root, name, W8A8MLP(root.get_submodule(name)))
    return len(targets)


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


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())

