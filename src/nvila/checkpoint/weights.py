"""One part of a checkpoint (``llm/``, ``vision_tower/``, ``mm_projector/``) <-> a module, with safetensors.

Every tensor is checked (missing, unexpected, shape, integer dtype) before anything is copied, and errors
name the part and the tensor. Loading records each tensor's stored dtype and the part's non-weight files
(:class:`PartRecord`) so that saving writes them back unchanged: a load/save round trip is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nvila.base.errors import CheckpointError
from nvila.base.files import read_json, write_json
from nvila.formats.layout import SHARD_INDEX, SINGLE_WEIGHTS, WEIGHT_SUFFIXES, key_prefix

# Integer dtypes of quantized tensors -> their safetensors names (a float file tensor must not fill them).
INT_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32"}
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
MAX_SHARD_BYTES = 5 * 1024**3
REOPEN_BYTES = 256 * 1024**2


@dataclass
class PartRecord:
    """What was read from one sub-folder, kept so saving can reproduce it exactly."""

    dtypes: dict[str, torch.dtype] = field(default_factory=dict)   # official key -> stored dtype
    files: dict[str, bytes] = field(default_factory=dict)          # non-weight files, verbatim
    vocab_rows: int | None = None                                  # llm: embedding rows on disk


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a sub-folder (single file or the shards named by the index)."""
    index = folder / SHARD_INDEX
    if index.is_file():
        try:
            names = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} has no 'weight_map'") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing weight shards {missing} listed in {index.name}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files and any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder} has only PyTorch .bin weights; nvila reads safetensors only")
    return files


@dataclass(frozen=True)
class PartSource:
    """Where one part's tensors are: safetensors ``files`` whose keys are ``prefix`` + the llava key (the
    llava layout: the part's own sub-folder, no prefix; "-hf": the root's files, shared by all parts, with
    the part's prefix). ``folder`` is what error messages name."""

    folder: Path
    files: tuple[Path, ...]
    prefix: str = ""

    @classmethod
    def of(cls, folder: Path, prefix: str = "") -> "PartSource":
        return cls(folder, tuple(weight_files(folder)), prefix)

    def keys(self, f: Any) -> list[tuple[str, str]]:
        """(file key, llava key) of the part's tensors in an open safetensors file."""
        n = len(self.prefix)
        return [(k, k[n:]) for k in f.keys() if k.startswith(self.prefix)]


MAPPABLE = {"BF16": (torch.bfloat16, "int16"), "F16": (torch.float16, "int16"), "F32": (torch.float32, "float32")}


def map_tensor(source: PartSource, key: str) -> torch.Tensor | None:
    """One stored float tensor (llava ``key``) memory-mapped from its safetensors file, copy-on-write (the file
    is never written); None when no file of the part holds it. Pages are read when the tensor is."""
    import json
    import struct

    import numpy as np

    for file in source.files:
        try:
            with open(file, "rb") as fh:
                size = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e
        entry = header.get(source.prefix + key)
        if entry is None:
            continue
        if entry.get("dtype") not in MAPPABLE:
            return None
        dtype, np_dtype = MAPPABLE[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        array = np.memmap(file, dtype=np_dtype, mode="c", offset=8 + size + begin, shape=(count,))
        return torch.from_numpy(array).view(dtype).view(entry["shape"])
    return None


def read_rows(source: PartSource, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of one stored tensor (llava ``key``), read from its file alone (the file is closed
    again, so none of it stays mapped)."""
    for file in source.files:
        with safe_open(str(file), framework="pt") as f:
            if source.prefix + key in f.keys():
                return f.get_slice(source.prefix + key)[start:stop]
    raise CheckpointError(f"{source.folder} holds no tensor {key!r}")


def stored_float_dtype(source: PartSource) -> torch.dtype | None:
    """The one floating dtype every floating tensor of a part is stored in (None: mixed, or none at all)."""
    names = set()
    try:
        for file in source.files:
            with safe_open(str(file), framework="pt") as f:
                names |= {f.get_slice(k).get_dtype() for k, _ in source.keys(f)}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"weights in {source.folder} are not readable safetensors: {e}") from e
    floats = names & set(FLOAT_DTYPES)
    return FLOAT_DTYPES[floats.pop()] if len(floats) == 1 else None


def non_weight_files(folder: Path) -> dict[str, bytes]:
    """Every regular file of a sub-folder that is not a weight file, for verbatim write-back."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
    }


def load_weights(module: nn.Module, source: PartSource, part: str) -> PartRecord:
    """Copy a part's safetensors into ``module`` (strictly) and record stored dtypes.

    Two passes: shapes are checked from the headers first, then tensors are copied one at a time, so
    peak memory stays at the model plus one tensor.
    """
    expected = module.state_dict()
    src_prefix, dst_prefix = key_prefix(module, part)
    record = PartRecord()
    where: dict[str, tuple[Path, str]] = {}
    bad_shapes, bad_dtypes, unexpected = [], [], []
    try:
        for file in source.files:
            with safe_open(str(file), framework="pt") as f:
                for stored, key in source.keys(f):
                    name = dst_prefix + key[len(src_prefix):] if key.startswith(src_prefix) else None
                    if name is None or name not in expected:
                        unexpected.append(stored)
                        continue
                    info = f.get_slice(stored)
                    shape, want = tuple(info.get_shape()), expected[name]
                    if shape != tuple(want.shape):
                        bad_shapes.append(f"{stored}: file {shape} vs model {tuple(want.shape)}")
                    if want.dtype in INT_DTYPES and info.get_dtype() != INT_DTYPES[want.dtype]:
                        bad_dtypes.append(f"{stored}: file {info.get_dtype()} vs model {INT_DTYPES[want.dtype]}")
                    where[name] = (file, stored)
        missing = [source.prefix + k for k in expected if k not in where and not _is_tied(module, k)]
        _raise_mismatch(source.folder, part, missing, unexpected, bad_shapes, bad_dtypes)
        with torch.no_grad():
            for file in source.files:
                _copy_from(file, [(n, k) for n, (src, k) in where.items() if src == file], expected, record,
                           len(source.prefix))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"weights in {source.folder} are not readable safetensors: {e}") from e
    return record


def _copy_from(file: Path, items: list[tuple[str, str]], params: dict[str, torch.Tensor], record: PartRecord,
               strip: int = 0) -> None:
    """Copy tensors out of one safetensors file.

    The file is memory-mapped, and mapped pages count towards the process's resident memory until the
    mapping closes; reopening it every ``REOPEN_BYTES`` keeps peak RSS near the model's own size.
    """
    done = 0
    while done < len(items):
        copied = 0
        with safe_open(str(file), framework="pt") as f:
            while done < len(items) and copied < REOPEN_BYTES:
                name, key = items[done]
                t = f.get_tensor(key)
                record.dtypes[key[strip:]] = t.dtype
                params[name].copy_(t)
                copied += t.numel() * t.element_size()
                done += 1


def _is_tied(module: nn.Module, key: str) -> bool:
    """True for an LM head that shares the input embeddings (stored once, as the embeddings)."""
    cfg = getattr(module, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) if cfg is not None else False
    return tied and key == "lm_head.weight"


def _raise_mismatch(folder: Path, part: str, missing: list[str], unexpected: list[str], shapes: list[str],
                    dtypes: list[str] | None = None) -> None:
    dtypes = dtypes or []
    if not (missing or unexpected or shapes or dtypes):
        return
    msg = [f"{folder} does not match its config.json ({part}):"]
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatch", shapes),
                         ("dtype mismatch", dtypes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            msg.append(f"  {label}: {', '.join(items[:5])}{more}")
    raise CheckpointError("\n".join(msg))


def part_state(module: nn.Module, part: str, record: PartRecord) -> dict[str, torch.Tensor]:
    """Our module's tensors under their official names, cast to the dtype they were stored in."""
    src_prefix, dst_prefix = key_prefix(module, part)
    out = {}
    for name, t in module.state_dict().items():
        if _is_tied(module, name):
            continue
        key = src_prefix + name[len(dst_prefix):]
        dtype = record.dtypes.get(key, t.dtype) if t.is_floating_point() else t.dtype
        if record.vocab_rows is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = t[: record.vocab_rows]      # drop the rows appended for the media tokens
        out[key] = t.detach().to("cpu", dtype).contiguous()
    return out


def save_part(state: dict[str, torch.Tensor], folder: Path, files: dict[str, bytes]) -> None:
    """Write one sub-folder: non-weight files verbatim + safetensors (sharded above 5 GiB)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= MAX_SHARD_BYTES:
        save_file(state, str(folder / SINGLE_WEIGHTS), metadata={"format": "pt"})
        return
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_BYTES)
    for shard_name, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / shard_name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
    write_json(folder / SHARD_INDEX, index)
