"""What produced a result: recorded in every result JSON nvila writes (evaluation, benchmarks, pruning,
quantization reports), so a number in the docs can be traced to the code, machine and model behind it."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nvila.base.hardware import cpu_class, cpu_flags, cpu_rules, emulated_cpu

# CPU features that decide nvila's kernels (the full flag list is long and mostly irrelevant)
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                "amx_tile", "asimd", "sve", "bf16", "i8mm")


def git_commit() -> str | None:
    """The commit of the source tree nvila runs from (with ``+dirty`` for uncommitted changes), if any."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def provenance(**inputs: Any) -> dict[str, Any]:
    """Commit, time, CPU (name, kernel-relevant flags, cores), GPU, library versions, plus ``inputs``
    (model, adapter, dataset, ... as the caller names them)."""
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "git_commit": git_commit(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": {"name": cpu_name(), "flags": sorted(f for f in KERNEL_FLAGS if f in cpu_flags()),
                "class": cpu_class(), "rules": dataclasses.asdict(cpu_rules()),
                "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "emulated": emulated_cpu(), "torch_capability": torch.backends.cpu.get_cpu_capability()},
        "gpu": gpu,
        "versions": {p: _version(p) for p in ("nvila", "torch", "transformers", "peft", "safetensors")},
        "python": platform.python_version(),
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in inputs.items()},
    }
