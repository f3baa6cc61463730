"""Resumable training checkpoints: trainable weights, optimizer, scheduler and every process's RNG state.

    checkpoints/step-N/
        trainable.safetensors     the trainable tensors (full state dict, whatever the wrapping)
        optimizer.pt              optimizer + scheduler state: tensors and numbers only (weights_only load)
        rng.json, rng.safetensors Python/NumPy generator states and torch/CUDA generator bytes, per rank
        state.json                step, samples, world size, global batch, total steps

Nothing is unpickled: a run folder someone else wrote cannot execute code when it is resumed. Checkpoints
use PyTorch's distributed state-dict API, so they are the same files whatever the wrapping (DDP, FSDP).
"""

from __future__ import annotations

import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nvila.base.errors import CheckpointError, ConfigError
from nvila.base.files import atomic_dir, read_json, write_json
from nvila.train.distributed import Dist

STEP_DIR = "step-{:08d}"
STATE, WEIGHTS, OPTIMIZER = "state.json", "trainable.safetensors", "optimizer.pt"
RNG_JSON, RNG_TENSORS = "rng.json", "rng.safetensors"


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / "checkpoints"
    done = sorted(p for p in folder.glob("step-*") if (p / STATE).is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def _options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def save_state(out: Path, step: int, wrapped: nn.Module, optimizer: Any, scheduler: Any, d: Dist,
               info: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically (all processes call it) and keep the last ``keep_last``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = out / "checkpoints" / STEP_DIR.format(step)
    weights = get_model_state_dict(wrapped, options=_options(ignore_frozen_params=True))
    optim = get_optimizer_state_dict(wrapped, optimizer, options=_options(ignore_frozen_params=True))
    rngs = d.gather(rng_state())
    if d.main:
        with atomic_dir(final, replace=True) as tmp:
            save_file(_unshared(weights), str(tmp / WEIGHTS))
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER)
            _write_rng(tmp, rngs)
            write_json(tmp / STATE, {"step": step, "world_size": d.world, **info})
        old = sorted(p for p in final.parent.glob("step-*") if p != final)
        for p in old[: max(0, len(old) - (keep_last - 1))]:
            shutil.rmtree(p)
    d.barrier()
    return final


def load_state(folder: Path, wrapped: nn.Module, optimizer: Any, scheduler: Any, d: Dist,
               expect: dict[str, Any]) -> int:
    """Restore a checkpoint written by :func:`save_state`; returns its step. ``expect``: values of
    state.json that must match this run (global batch, total steps)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = read_json(folder / STATE)
    diffs = {k: (state.get(k), v) for k, v in expect.items() if state.get(k) != v}
    if diffs:
        raise ConfigError(
            f"{folder} was written with {', '.join(f'{k} {a}' for k, (a, _) in diffs.items())}; this run has "
            f"{', '.join(f'{k} {b}' for k, (_, b) in diffs.items())}. Resume with the same recipe and batch layout "
            "(batch_size x grad_accum x processes)")
    options = _options(strict=False)
    set_model_state_dict(wrapped, load_file(str(folder / WEIGHTS)), options=options)
    blob = load_trusted(folder / OPTIMIZER)
    set_optimizer_state_dict(wrapped, optimizer, blob["optimizer"], options=options)
    scheduler.load_state_dict(blob["scheduler"])
    if state["world_size"] == d.world:
        _restore_rng(folder, d.rank)
    return int(state["step"])


def load_trusted(path: Path) -> Any:
    """``torch.load`` of tensors, numbers and containers only; anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and numbers; nvila refuses to unpickle "
                              f"them (they could run code): {str(e).splitlines()[0]}") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


# ---- RNG state without pickle ------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's generator states: Python and NumPy as JSON-able lists, torch/CUDA as byte tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "tensors": tensors}


def _write_rng(folder: Path, states: list[Any]) -> None:
    write_json(folder / RNG_JSON, {"ranks": [{k: s[k] for k in ("python", "numpy")} for s in states]})
    save_file({f"rank{r}.{k}": t.contiguous() for r, s in enumerate(states) for k, t in s["tensors"].items()},
              str(folder / RNG_TENSORS))


def _restore_rng(folder: Path, rank: int) -> None:
    if not (folder / RNG_JSON).is_file():
        if any(folder.glob("rng-*.pt")):
            print(f"nvila train: {folder} keeps its RNG state in a pickled file of an older nvila, which is not "
                  "loaded; resuming without it (random draws such as dropout differ from an uninterrupted run)",
                  file=sys.stderr)
        return
    entry = read_json(folder / RNG_JSON)["ranks"][rank]
    version, internal, gauss = entry["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = entry["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(folder / RNG_TENSORS))
    torch.set_rng_state(tensors[f"rank{rank}.torch"])
    cuda = sorted((k for k in tensors if k.startswith(f"rank{rank}.cuda")), key=lambda k: int(k.rpartition("cuda")[2]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tensors already present (a tied LM head): loading one restores both."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v.contiguous()
    return out


__all__ = ["latest_checkpoint", "load_state", "load_trusted", "rng_state", "save_state"]
