"""``nvila convert``: the llava layout <-> the "-hf" layout (:mod:`nvila.formats.hf`), tensors copied verbatim.

Tensors are read and written as stored (same dtype, same bytes, same shapes): only their keys change, by the
part prefixes of :data:`nvila.formats.hf.HF_PREFIX`. Each source safetensors file becomes one output file, so
peak memory is one shard. The configs are mapped by :mod:`nvila.formats.hf`; the "-hf" folder also gets the
processor, its configuration classes and a model entry for transformers' Auto classes
(:mod:`nvila.formats.hf_processor`, :mod:`nvila.hf_remote`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nvila.base.errors import CheckpointError
from nvila.base.files import atomic_dir, json_bytes, write_json
from nvila.checkpoint.load import Folder, folder_config, load_tokenizer, read_folder, resolve, transformers_config
from nvila.checkpoint.save import tokenizer_files
from nvila.checkpoint.weights import PartSource
from nvila.formats.hf import (CONFIGURATION_FILE, GENERATION_CONFIG, HF_PREFIX, MODELING_FILE, MODELING_SOURCE,
                              hf_config, hf_type_for)
from nvila.formats.hf_processor import processor_files
from nvila.formats.layout import (ADAPTER_CONFIG, ADAPTER_META, CONFIG, PARTS, PREPROCESSOR, QUANT_CONFIG,
                                  SHARD_INDEX, SINGLE_WEIGHTS)

Layout = Literal["hf", "llava"]


def convert(src: str | os.PathLike, out: str | os.PathLike, to: Layout, replace: bool = False) -> Path:
    """Convert the checkpoint folder (or Hub id) ``src`` to the ``to`` layout in the new folder ``out``."""
    if to not in ("hf", "llava"):
        raise CheckpointError(f"--to must be 'hf' or 'llava', got {to!r}")
    root = resolve(src)
    if (root / ADAPTER_CONFIG).is_file() or (root / ADAPTER_META).is_file():
        raise CheckpointError(f"{root} is a LoRA adapter, not a model; merge it into its base model first "
                              "(`nvila merge --model BASE --lora ADAPTER --out DIR`), then convert DIR")
    folder = read_folder(root)
    if folder.layout == to:
        raise CheckpointError(f"{root} is already in the {to} layout")
    if QUANT_CONFIG in folder.files[""]:
        raise CheckpointError(
            f"{root} is a quantized checkpoint ({QUANT_CONFIG}): its int8/int4 tensors and scales are nvila's own "
            "format, which no '-hf' consumer reads. Convert the float checkpoint, and quantize in the serving "
            "engine (or keep serving the quantized folder with `nvila serve`)")
    with atomic_dir(out, replace=replace) as tmp:
        if to == "hf":
            _write_hf(folder, tmp)
        else:
            _write_llava(folder, tmp)
    return Path(out)


def _write_hf(folder: Folder, tmp: Path) -> None:
    cfg = folder_config(folder)
    if cfg.video_frame_size is not None:
        raise CheckpointError(
            f"this checkpoint sets video_frame_size={cfg.video_frame_size} (video frames smaller than image tiles), "
            "an nvila setting that the '-hf' format and its consumers do not have; serve it with `nvila serve`")
    tokenizer, template, _, media_ids, _ = load_tokenizer(folder.tokenizer_dir, cfg.chat_template,
                                                           transformers_config(folder, "llm"))
    c = folder.configs
    kind = hf_type_for(cfg.projector_type)
    files = {CONFIG: json_bytes(hf_config(c[""], c["llm"], c["vision_tower"], c["mm_projector"],
                                          media_ids["image"], media_ids["video"]))}
    files |= processor_files(cfg, tokenizer_files(tokenizer), template, lite=kind.model_type == "nvila_lite")
    for name, part in ((GENERATION_CONFIG, "llm"), (PREPROCESSOR, "vision_tower")):
        if name in folder.files[part]:
            files[name] = folder.files[part][name]
    files[CONFIGURATION_FILE] = resources.files("nvila.hf_remote").joinpath(CONFIGURATION_FILE).read_bytes()
    files[MODELING_FILE] = MODELING_SOURCE.encode()
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    # One output shard per source file, parts in a fixed order; keys get the part's prefix.
    _write_shards(tmp, [(folder.sources[part], file, HF_PREFIX[part]) for part in PARTS
                        for file in folder.sources[part].files], single_file=False)


def _write_llava(folder: Folder, tmp: Path) -> None:
    (tmp / CONFIG).write_bytes(json_bytes(folder.configs[""]))
    for part in PARTS:
        d = tmp / part
        d.mkdir()
        for name, data in folder.files[part].items():
            (d / name).write_bytes(data)
        source = folder.sources[part]
        shards = [(source, file, "") for file in source.files if _holds_part(source, file)]
        if not shards:
            raise CheckpointError(f"{source.folder} has no tensors under {source.prefix!r}")
        _write_shards(d, shards, single_file=True)


def _write_shards(out: Path, shards: list[tuple[PartSource, Path, str]], single_file: bool) -> None:
    """Each (source, file, key prefix) becomes one output safetensors file, read and written one at a time (peak
    memory: one shard): ``model.safetensors`` for a single shard when ``single_file``, else
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``."""
    index = not (single_file and len(shards) == 1)
    weight_map: dict[str, str] = {}
    total = 0
    for i, (source, file, prefix) in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if index else SINGLE_WEIGHTS
        tensors = {prefix + k: v for k, v in _read(source, file).items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(v.numel() * v.element_size() for v in tensors.values())
    if index:
        write_json(out / SHARD_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _holds_part(source: PartSource, file: Path) -> bool:
    """Whether a safetensors file has any of the part's tensors (reads the header only)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return bool(source.keys(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e


def _read(source: PartSource, file: Path) -> dict:
    """The part's tensors of one safetensors file, under their llava keys, as stored."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(stored) for stored, key in source.keys(f)}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e
