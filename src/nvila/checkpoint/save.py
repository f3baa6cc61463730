"""Writing checkpoints in the official layout: a loaded one back (bit-identical when unchanged), or a new
one from modules (random presets, assembled and built models). Both write atomically, and both write
``config.json`` from :meth:`nvila.formats.config.NvilaConfig.to_official`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from nvila.base.files import atomic_dir, json_bytes
from nvila.checkpoint.load import Checkpoint
from nvila.checkpoint.weights import PartRecord, part_state, save_part
from nvila.formats.config import NvilaConfig
from nvila.formats.layout import CONFIG


def save_checkpoint(ckpt: Checkpoint, out: str | os.PathLike, replace: bool = False) -> Path:
    """Write ``ckpt`` in the official layout; tensors in the dtype they were stored in, files verbatim.
    ``replace``: an existing folder at ``out`` is replaced once the new one is complete."""
    model = ckpt.model
    root = ckpt.records.get("", PartRecord())
    official = model.cfg.to_official()
    original = root.files.get(CONFIG)
    with atomic_dir(out, replace=replace) as tmp:
        unchanged = original is not None and json.loads(original) == official
        (tmp / CONFIG).write_bytes(original if unchanged else json_bytes(official))
        for name, data in root.files.items():
            if name != CONFIG:                       # quant_config.json of a quantized model
                (tmp / name).write_bytes(data)
        modules = {"llm": model.llm, "vision_tower": model.vision.model, "mm_projector": model.projector}
        for part, module in modules.items():
            record = ckpt.records[part]
            save_part(part_state(module, part, record), tmp / part, record.files)
    return Path(out)


def write_checkpoint(out: str | os.PathLike, cfg: NvilaConfig, parts: dict[str, tuple[nn.Module, dict[str, Any]]],
                     files: dict[str, Any] | None = None, replace: bool = False) -> Path:
    """Write a new model: ``parts`` maps each part name to (module, its sub-folder's files); ``files`` are
    extra top-level files. File contents are bytes, text or JSON-able dicts. ``replace``: an existing
    folder at ``out`` is replaced once the new one is complete."""
    with atomic_dir(out, replace=replace) as tmp:
        for part, (module, part_files) in parts.items():
            save_part(part_state(module, part, PartRecord()), tmp / part, _blobs(part_files))
        (tmp / CONFIG).write_bytes(json_bytes(cfg.to_official()))
        for name, data in _blobs(files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out)


def _blobs(files: dict[str, Any]) -> dict[str, bytes]:
    return {k: v if isinstance(v, bytes) else v.encode() if isinstance(v, str) else json_bytes(v)
            for k, v in files.items()}


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for a tokenizer, as bytes (for the ``llm/`` sub-folder)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
