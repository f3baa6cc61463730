"""Fine-tuning memory and speed: full fine-tuning vs NVILA's LoRA + ViT-LayerNorm recipe, side by side.

Each mode runs in a fresh process (so peak memory is that mode's own): load the model, run a few
optimizer steps of the real trainer on the bundled sample data, report the peak memory and the median
step time. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and the process's peak resident
set (``ru_maxrss``) on a CPU, where it also includes the Python runtime and libraries (~0.5 GiB).

    nvila bench-train --model .cache/bench/lite2b-8l --modes full,lora --steps 4
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nvila.base.errors import NvilaError

EXAMPLE_DATA = Path(__file__).resolve().parents[3] / "recipes" / "examples" / "data"
MODES: dict[str, dict[str, Any]] = {
    "full": {"parts": {"vision": "full", "projector": "full", "llm": "full"}, "lora": None,
             "lr": {"vision": 2e-6, "projector": 2e-5, "llm": 2e-5}},
    "lora": {"parts": {"vision": "layernorm", "projector": "full", "llm": "frozen"},
             "lora": {"r": 64, "alpha": 16, "dropout": 0.05}, "lr": {"vision": 2e-5, "projector": 2e-4, "llm": 2e-4},
             "frozen_dtype": "bf16"},
}


def measure(model: str, mode: str, steps: int, batch_size: int, precision: str, data: Path,
            gradient_checkpointing: bool = True, device: str = "auto") -> dict[str, Any]:
    """Run ``steps`` optimizer steps of ``mode`` in this process; memory and time figures."""
    from nvila.train.recipe import recipe_from_dict
    from nvila.train.trainer import Trainer

    spec = MODES[mode]
    recipe = recipe_from_dict({
        "model": model, "seed": 0,
        "data": {"datasets": [{"path": str(data / "shapes.jsonl")}], "packing": True},
        "train": {**spec, "batch_size": batch_size, "grad_accum": 1, "max_steps": steps + 1, "precision": precision,
                  "gradient_checkpointing": gradient_checkpointing},
    })
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(recipe, out, device=device, progress=False)
        trainer.setup()
        cuda = trainer.dist.device.type == "cuda"
        loaded = _current_memory(cuda)
        times = [trainer.train_step()["seconds"] for _ in range(steps + 1)][1:]   # first step: warm-up
        peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = sum(p.numel() for p in trainer.ckpt.model.parameters())
    trainable = sum(trainer.trainable_counts.values())
    return {"mode": mode, "device": str(trainer.dist.device), "precision": trainer.precision,
            "params": total, "trainable_params": trainable, "peak_gib": peak / 2**30,
            "after_load_gib": loaded / 2**30, "training_gib": (peak - loaded) / 2**30,
            "step_s": statistics.median(times), "steps": steps, "batch_size": batch_size}


def _current_memory(cuda: bool) -> int:
    if cuda:
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def compare(model: str, modes: Sequence[str], steps: int = 3, batch_size: int = 2, precision: str = "auto",
            data: Path = EXAMPLE_DATA, device: str = "auto") -> list[dict[str, Any]]:
    """Measure each mode in its own process (clean peak memory); results in ``modes`` order."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise NvilaError(f"unknown fine-tuning modes {unknown}; known: {sorted(MODES)}")
    results = []
    for mode in modes:
        args = json.dumps({"model": str(model), "mode": mode, "steps": steps, "batch_size": batch_size,
                           "precision": precision, "data": str(data), "device": device})
        proc = subprocess.run([sys.executable, "-m", "nvila.train.membench", args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise NvilaError(f"fine-tuning benchmark ({mode}) failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    args = json.loads(sys.argv[1])
    print(json.dumps(measure(args["model"], args["mode"], args["steps"], args["batch_size"], args["precision"],
                             Path(args["data"]), device=args["device"])))


if __name__ == "__main__":
    main()
