"""Processes: one, or one per device under torchrun, with PyTorch's own data-parallel wrappers.

DistributedDataParallel (``ddp``) or fully_shard (``fsdp``, FSDP2: each LLM/ViT layer sharded) wraps the
model; NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from nvila.base.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def close(self) -> None:
        """Leave the process group, as every process should before it exits; the trainer does so before
        returning. (`nvila train` under torchrun then also skips the interpreter's teardown, where a finished
        gloo process could still abort intermittently.)"""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, value: object) -> list[object]:
        """Every process's ``value``, in rank order (small Python objects)."""
        if self.world == 1:
            return [value]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but CUDA is not available on this machine")
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"))


def wrap(module: nn.Module, d: Dist, strategy: str, frozen_dtype: str) -> nn.Module:
    """``module`` (a LossModule over an NvilaModel) as the processes train it: itself for one process, else
    DDP or FSDP2 with every LLM and ViT layer sharded."""
    if d.world == 1:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if frozen_dtype != "fp32":
            raise ConfigError("train.frozen_dtype bf16 is for one process or ddp; FSDP shards one dtype per "
                              "layer: use frozen_dtype fp32 with distributed fsdp")
        model = module.model
        for layer in list(model.llm.model.layers) + list(model.vision.layers):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
