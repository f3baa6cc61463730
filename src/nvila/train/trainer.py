"""The training recipe runner: one explicit class (setup -> train -> export), resumable, torchrun-ready.

Determinism: the data order is a pure function of (seed, position) (see :mod:`nvila.train.mixture`), step
``s`` always trains stream positions ``[s*G, (s+1)*G)`` for the global batch G, and every checkpoint holds
the trainable weights, optimizer, scheduler and every process's RNG state, so a resumed run continues
the exact loss curve of an uninterrupted one.

Loss normalisation: every supervised token of a global batch weighs the same. Each micro-batch's summed
cross-entropy is divided by the token count of the whole global batch (all micro-batches, all processes,
counted before the forward), so one process with gradient accumulation and N processes with the same
global batch compute the same loss and the same update.

Distributed: launched by ``torchrun``, PyTorch's DistributedDataParallel (``ddp``) or fully_shard
(``fsdp``, FSDP2: each LLM/ViT layer sharded) wraps the model; NCCL on CUDA, gloo on CPU. Checkpoints
use PyTorch's distributed state-dict API, so they are the same files whatever the wrapping.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nvila.errors import ConfigError, NvilaError
from nvila.processing.processor import IGNORE_INDEX, Processor, Prompt
from nvila.train.data import Sample, load_dataset
from nvila.train.mixture import Mixture
from nvila.train.params import param_groups, set_trainable
from nvila.train.recipe import Recipe
from nvila.train.step import collate, supervised_tokens

STEP_DIR = "step-{:08d}"


# ---- processes ---------------------------------------------------------------------------------------


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


class HeadLogits(torch.autograd.Function):
    """``h @ W.T`` in float32 for a weight stored in any dtype, upcast one vocabulary chunk at a time in both
    passes, so a bf16 LM head never has a whole float32 copy alive (151648 x 1536 would be 0.9 GB)."""

    CHUNK = 16384

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:   # (n, D), (V, D) -> (n, V)
        ctx.save_for_backward(h, weight)
        return torch.cat([h @ w.float().T for w in weight.split(HeadLogits.CHUNK)], dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h, weight = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = sum(g @ w.float() for g, w in zip(grad.split(HeadLogits.CHUNK, dim=1), weight.split(HeadLogits.CHUNK)))
        if ctx.needs_input_grad[1]:
            grad_w = (grad.T @ h).to(weight.dtype)
        return grad_h, grad_w


class LossModule(nn.Module):
    """What DDP/FSDP wrap: labelled prompts -> (summed token cross-entropy, supervised tokens)."""

    def __init__(self, model: nn.Module, packing: bool, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.packing = packing
        self.max_length = max_length

    def forward(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, int]:
        if self.packing:
            from nvila.train.packing import collate_packed, plan_packs

            batch = collate_packed(self.model, prompts, plan_packs([p.fused_length for p in prompts], self.max_length))
        else:
            batch = collate(self.model, prompts)
        llm = self.model.llm
        hidden = llm.get_decoder()(inputs_embeds=batch["inputs_embeds"], attention_mask=batch.get("attention_mask"),
                                   position_ids=batch["position_ids"], use_cache=False).last_hidden_state  # (B, L, D)
        targets = batch["labels"][:, 1:]
        supervised = targets != IGNORE_INDEX
        # The LM head runs on supervised positions only: answers are a small share of a multimodal sequence,
        # and full-vocabulary logits for every position dominate time and memory otherwise.
        # It also runs in float32 outside autocast: CPU bf16 GEMMs that contract over the vocabulary (its
        # backward) fall off the fast kernels (measured 143 s vs 0.3 s fp32 for 40 x 151648 x 1536).
        head = llm.get_output_embeddings()
        with torch.autocast(hidden.device.type, enabled=False):
            logits = HeadLogits.apply(hidden[:, :-1][supervised].float(), head.weight)          # (n, V)
            if head.bias is not None:
                logits = logits + head.bias.float()
        ce = F.cross_entropy(logits, targets[supervised], reduction="sum")
        return ce, int(supervised.sum())


# ---- the recipe runner ---------------------------------------------------------------------------------


class Trainer:
    """Runs one recipe: ``Trainer(recipe, output_dir).run()``.

    Output folder::

        recipe.yaml              the resolved recipe (overrides applied)
        metrics.jsonl            one JSON object per optimizer step (step, loss, lr, grad_norm, tokens, ...)
        checkpoints/step-N/      resumable state, the last ``keep_last`` kept
        model/                   the trained model in the official layout (LoRA merged)
        adapter/                 LoRA runs: the adapter (LLM LoRA + projector/ViT-LayerNorm tensors)
    """

    def __init__(self, recipe: Recipe, output_dir: str | Path | None = None, resume: bool = False,
                 device: str = "auto", progress: bool = True) -> None:
        out = output_dir or recipe.output_dir
        if out is None:
            raise ConfigError("no output folder: pass --output-dir or set output_dir in the recipe")
        self.recipe = recipe
        self.out = Path(out)
        self.resume = resume
        self.device_pref = device
        self.show_progress = progress

    # ---- setup --------------------------------------------------------------------------------------
    def setup(self) -> None:
        r, t = self.recipe, self.recipe.train
        self.dist = init_distributed(self.device_pref)
        self._check_output()
        _seed_everything(r.seed)
        self.ckpt = self._load_model()
        model = self.ckpt.model
        counts = set_trainable(model, t.parts)
        if t.init_adapter is not None:
            counts["llm"] += _continue_adapter(model, t.init_adapter, t.lora)
        elif t.lora is not None:
            from nvila.train.lora import apply_lora

            counts["llm"] += apply_lora(model, t.lora)
        self.trainable_counts = counts
        if t.frozen_dtype == "bf16":
            from nvila.train.lowmem import store_frozen_in

            store_frozen_in(model, torch.bfloat16)
        if t.gradient_checkpointing:
            _checkpoint_activations(model.llm)
            if counts["vision"]:
                _checkpoint_activations(model.vision.model)
        self.precision = _precision(t.precision, self.dist.device)
        self.max_length = min(r.data.max_length or model.cfg.model_max_length, model.cfg.model_max_length)
        self.samples = self._load_data()
        self.mixture = Mixture([s for s, _ in self.samples], [ratio for _, ratio in self.samples], r.seed)
        self.global_batch = r.global_batch(self.dist.world)
        steps_per_epoch = max(1, self.mixture.epoch_size // self.global_batch)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        model.train()
        groups = param_groups(model, t.lr, t.weight_decay)
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        self.wrapped = self._wrap(LossModule(model, r.data.packing, self.max_length))
        params = dict(model.named_parameters())   # FSDP replaces parameters by sharded ones of the same name
        for g, members in zip(groups, group_names):
            g["params"] = [params[n] for n in members]
        self.optimizer = torch.optim.AdamW(groups, betas=t.betas, eps=t.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        if self.resume:
            latest = self.latest_checkpoint()
            if latest is not None:
                self._load_state(latest)
        if self.step == 0:
            _seed_everything(r.seed + self.dist.rank)   # per-process randomness (dropout) from here on
        if self.dist.main:
            self._write_recipe()
            self._trim_metrics()
            if self.show_progress:
                self._summary()

    def _summary(self) -> None:
        """What is about to run, on stderr (the main process only)."""
        import sys

        parts = ", ".join(f"{k} {v:,}" for k, v in self.trainable_counts.items())
        print(f"nvila train: {self.mixture.epoch_size} samples/epoch, global batch {self.global_batch} "
              f"({self.dist.world} process(es)), steps {self.step}->{self.total_steps}, precision {self.precision}; "
              f"trainable: {parts}", file=sys.stderr)
        if self.skipped:
            print(f"nvila train: skipped {len(self.skipped)} samples longer than max_length={self.max_length} "
                  f"(first: {self.skipped[:5]})", file=sys.stderr)

    def _check_output(self) -> None:
        has_state = (self.out / "checkpoints").is_dir() and any((self.out / "checkpoints").iterdir())
        if has_state and not self.resume:
            raise ConfigError(f"{self.out} already holds a training run; pass --resume to continue it, or choose "
                              "another --output-dir")
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()

    def _load_model(self) -> Any:
        from nvila.checkpoint import load_checkpoint

        r = self.recipe
        source = r.model
        if r.assemble is not None:
            from nvila.train.assemble import assemble

            source = self.out / "init"
            if self.dist.main and not source.is_dir():
                assemble(r.assemble, source, seed=r.seed)
            self.dist.barrier()
        if source == "nvila:nano-base":
            from nvila.nano import build

            if self.dist.main:
                build()
            self.dist.barrier()
            source = build()
        ckpt = load_checkpoint(source, dtype=torch.float32, device=str(self.dist.device))
        d = r.data
        changes = {k: v for k, v in (("image_mode", d.image_mode), ("max_tiles", d.max_tiles),
                                     ("num_video_frames", d.num_video_frames)) if v is not None}
        if changes:
            ckpt.model.cfg = _retile(ckpt.model.cfg, changes)
        self.processor = Processor(ckpt.model.cfg, ckpt.tokenizer, ckpt.chat_template)
        return ckpt

    def _load_data(self) -> list[tuple[list[Sample], float]]:
        """Every sample is processed once up front (in parallel over processes): broken media or labels
        fail before training starts, and over-long samples are dropped (or refused) deterministically."""
        d = self.recipe.data
        loaded = [(load_dataset(s.path, s.media_root, s.name), s.ratio) for s in d.datasets]
        flat = [(i, j) for i, (samples, _) in enumerate(loaded) for j in range(len(samples))]
        lengths: dict[tuple[int, int], int] = {}
        for k in range(self.dist.rank, len(flat), self.dist.world):
            i, j = flat[k]
            lengths[flat[k]] = self._prompt(loaded[i][0][j]).fused_length
        if self.dist.world > 1:
            gathered: list[Any] = [None] * self.dist.world
            dist.all_gather_object(gathered, lengths)
            lengths = {k: v for part in gathered for k, v in part.items()}
        kept, self.skipped = [], []
        for i, (samples, ratio) in enumerate(loaded):
            ok = []
            for j, s in enumerate(samples):
                if lengths[(i, j)] <= self.max_length:
                    ok.append(s)
                    continue
                if d.overlong == "error":
                    raise NvilaError(f"sample {s.id} of {s.dataset} has {lengths[(i, j)]} tokens after media "
                                     f"expansion, above data.max_length={self.max_length}")
                self.skipped.append(s.id)
            if not ok:
                raise NvilaError(f"dataset {d.datasets[i].path} has no sample within max_length={self.max_length}")
            kept.append((ok, ratio))
        return kept

    def _prompt(self, sample: Sample) -> Prompt:
        try:
            if self.recipe.data.independent_turns:
                from nvila.train.branches import branched_prompt

                return branched_prompt(self.processor, sample.messages)
            return self.processor(sample.messages, training=True)
        except NvilaError as e:
            raise type(e)(f"sample {sample.id} of dataset {sample.dataset}: {e}") from None

    def _wrap(self, module: LossModule) -> nn.Module:
        if self.dist.world == 1:
            return module
        if self.recipe.train.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            if self.recipe.train.frozen_dtype != "fp32":
                raise ConfigError("train.frozen_dtype bf16 is for one process or ddp; FSDP shards one dtype per "
                                  "layer: use frozen_dtype fp32 with distributed fsdp")

            model = module.model
            layers = list(model.llm.model.layers) + list(model.vision.layers)
            for layer in layers:
                fully_shard(layer)
            fully_shard(module)
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def _lr_factor(self, step: int) -> float:
        """Linear warmup then cosine decay to ``min_lr_ratio`` of the peak learning rate."""
        t = self.recipe.train
        warmup = int(round(t.warmup_ratio * self.total_steps))
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ---- training -----------------------------------------------------------------------------------
    def run(self) -> Path:
        """Set up, train to the last step (saving as configured) and export the model; returns the output."""
        self.setup()
        t = self.recipe.train
        with _Progress(self.total_steps, self.step, enabled=self.show_progress and self.dist.main) as bar:
            while self.step < self.total_steps:
                metrics = self.train_step()
                if self.dist.main:
                    with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(metrics) + "\n")
                bar.update(metrics)
                if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                    self.save_state()
        self.save_state()
        self.export()
        self.dist.barrier()
        return self.out

    def micro_batches(self, step: int) -> list[list[Sample]]:
        """This process's micro-batches of ``step``: stream positions [step*G, (step+1)*G) dealt out."""
        t = self.recipe.train
        base = step * self.global_batch
        out = []
        for m in range(t.grad_accum):
            start = base + (m * self.dist.world + self.dist.rank) * t.batch_size
            out.append([self.mixture[p] for p in range(start, start + t.batch_size)])
        return out

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over a global batch; returns its metrics."""
        t0 = time.perf_counter()
        prompts = [[self._prompt(s) for s in micro] for micro in self.micro_batches(self.step)]
        n_global = self.dist.sum(sum(supervised_tokens(p) for micro in prompts for p in micro))
        if n_global == 0:
            raise NvilaError(f"step {self.step + 1}: the global batch has no supervised (assistant) tokens")
        ce_total = 0.0
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        for m, micro in enumerate(prompts):
            last = m == len(prompts) - 1
            sync = self.wrapped.no_sync() if hasattr(self.wrapped, "no_sync") and not last else nullcontext()
            with sync:
                with autocast:
                    ce, _ = self.wrapped(micro)
                (ce * (self.dist.world / n_global)).backward()
            ce_total += float(ce.detach())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.recipe.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = self.dist.sum(sum(p.fused_length for micro in prompts for p in micro))
        seconds = time.perf_counter() - t0
        return {"step": self.step, "loss": self.dist.sum(ce_total) / n_global, "lr": lrs, "grad_norm": norm,
                "supervised_tokens": int(n_global), "tokens": int(tokens), "tokens_per_s": tokens / seconds,
                "seconds": seconds, "samples": self.step * self.global_batch}

    # ---- checkpoints ----------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        folder = self.out / "checkpoints"
        done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file()) if folder.is_dir() else []
        return done[-1] if done else None

    def _state_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

    def save_state(self) -> Path:
        """Write a resumable checkpoint atomically (temp folder + rename) and keep the last ``keep_last``."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        final = self.out / "checkpoints" / STEP_DIR.format(self.step)
        tmp = final.with_name(f".{final.name}.tmp")
        weights = get_model_state_dict(self.wrapped, options=self._state_options())
        optim = get_optimizer_state_dict(self.wrapped, self.optimizer, options=self._state_options())
        if self.dist.main:
            if final.exists():
                shutil.rmtree(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        torch.save(_rng_state(), tmp / f"rng-{self.dist.rank}.pt")
        if self.dist.main:
            save_file(_unshared(weights), str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optim, "scheduler": self.scheduler.state_dict()}, tmp / "optimizer.pt")
        self.dist.barrier()
        if self.dist.main:
            state = {"step": self.step, "samples": self.step * self.global_batch, "world_size": self.dist.world,
                     "global_batch": self.global_batch, "total_steps": self.total_steps}
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
            tmp.rename(final)
            old = sorted(p for p in final.parent.glob("step-*") if p != final)
            for p in old[: max(0, len(old) - (self.recipe.train.keep_last - 1))]:
                shutil.rmtree(p)
        self.dist.barrier()
        return final

    def _load_state(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        state = json.loads((folder / "state.json").read_text())
        if state["global_batch"] != self.global_batch or state["total_steps"] != self.total_steps:
            raise ConfigError(
                f"{folder} was written with global batch {state['global_batch']} and {state['total_steps']} steps; "
                f"this run has {self.global_batch} and {self.total_steps}. Resume with the same recipe and batch "
                "layout (batch_size x grad_accum x processes)")
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)
        weights = load_file(str(folder / "trainable.safetensors"))
        set_model_state_dict(self.wrapped, weights, options=options)
        blob = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.wrapped, self.optimizer, blob["optimizer"], options=options)
        self.scheduler.load_state_dict(blob["scheduler"])
        rng = folder / f"rng-{self.dist.rank}.pt"
        if rng.is_file() and state["world_size"] == self.dist.world:
            _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
        self.step = state["step"]

    def _write_recipe(self) -> None:
        import yaml

        (self.out / "recipe.yaml").write_text(yaml.safe_dump(_plain(self.recipe.to_dict()), sort_keys=False))

    def _trim_metrics(self) -> None:
        """Drop metrics of steps after the checkpoint being resumed (a killed run may have logged them)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
        path.write_text("".join(ln + "\n" for ln in lines))

    # ---- export ---------------------------------------------------------------------------------------
    def export(self) -> Path:
        """Write ``model/`` (official layout, LoRA merged) and, for LoRA runs, ``adapter/``."""
        from nvila.checkpoint import save_checkpoint

        sharded = self.recipe.train.distributed == "fsdp" and self.dist.world > 1
        weights = self._gathered_weights() if sharded else {}
        out = self.out / "model"
        if not self.dist.main:
            return out
        model = self.ckpt.model
        if sharded:
            fresh = self._load_model()      # the FSDP-sharded modules cannot be saved directly
            model = fresh.model
            if self.recipe.train.lora is not None:
                from nvila.train.lora import apply_lora

                apply_lora(model, self.recipe.train.lora)
            missing = [k for k in weights if k not in model.state_dict()]
            if missing:
                raise NvilaError(f"cannot export: tensors {missing[:3]} are not in the model")
            model.load_state_dict(weights, strict=False)
            self.ckpt.model = model
        model.eval()
        if self.recipe.train.lora is not None:
            from nvila.train.lora import merge_lora, save_adapter

            base = self.recipe.model or str(self.out / "init")
            for path in (self.out / "adapter",):
                shutil.rmtree(path, ignore_errors=True)
            save_adapter(model, self.out / "adapter", self.recipe.train.lora, base=base)
            merge_lora(model)
        shutil.rmtree(out, ignore_errors=True)
        save_checkpoint(self.ckpt, out)
        return out

    def _gathered_weights(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        weights = get_model_state_dict(self.wrapped, options=self._state_options())
        return {k.removeprefix("model."): v for k, v in weights.items()}


# ---- helpers ------------------------------------------------------------------------------------------


def _retile(cfg: Any, changes: dict[str, Any]) -> Any:
    """The model config with a recipe's tiling settings (also written to the exported config.json)."""
    mode = changes.get("image_mode", cfg.image_mode)
    if (mode == "dynamic_s2") != (cfg.image_mode == "dynamic_s2"):
        raise ConfigError(f"data.image_mode {mode!r} does not fit this checkpoint ({cfg.image_mode}): switching to or "
                          "from dynamic_s2 changes the projector's input width")
    raw = dict(cfg.raw)
    if "image_mode" in changes and mode != "dynamic_s2":
        raw["image_aspect_ratio"] = mode
    for key in ("max_tiles", "num_video_frames"):
        if key in changes:
            raw[key] = changes[key]
    new = dataclasses.replace(cfg, raw=raw, **changes)
    new.validate()
    return new


def _continue_adapter(model: nn.Module, folder: str, settings: Any) -> int:
    """Load an earlier stage's adapter to train on: its LoRA layers (which must match ``settings``, so the
    exported adapter describes them) and its other tensors, which must all be trainable in this recipe
    (a frozen one would be left out of the exported adapter). Returns the LoRA parameter count."""
    from safetensors import safe_open

    from nvila.train.lora import LORA_MARK, OTHER_FILE, applied_settings, find_adapter, load_adapter, same_settings

    load_adapter(model, folder)
    found = applied_settings(model.llm)
    if not same_settings(found, settings):
        raise ConfigError(f"train.init_adapter {folder} has LoRA {found.to_dict()}, but train.lora is "
                          f"{settings.to_dict()}: make train.lora match the adapter")
    other = find_adapter(folder) / OTHER_FILE
    if other.is_file():
        params = dict(model.named_parameters())
        with safe_open(str(other), "pt") as f:
            frozen = sorted(k for k in f.keys() if not params[k].requires_grad)
        if frozen:
            raise ConfigError(f"train.init_adapter {folder} holds trained tensors of parts this recipe freezes "
                              f"({frozen[:3]}...): train those parts too (train.parts), or the exported adapter "
                              "would lose them")
    return sum(p.numel() for n, p in model.llm.named_parameters() if LORA_MARK in n and p.requires_grad)


def _checkpoint_activations(module: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (transformers' own per-layer switch)."""
    if hasattr(module, "activation_checkpointing_enable"):      # transformers >= 5.2x
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tensors already present (a tied LM head): loading one restores both."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v.contiguous()
    return out


def _precision(value: str, device: torch.device) -> str:
    if value != "auto":
        if value == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("train.precision bf16 was requested but this GPU does not support bfloat16")
        return value
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # CPU: bf16 autocast is fast for inference but its backward GEMMs fall back to a slow generic kernel
    # (measured with torch 2.13 on an AVX512-BF16/AMX CPU: a 1536x8960 linear's forward+backward on 400
    # tokens takes 23 s in bf16 vs 0.35 s in fp32), so CPU training runs in fp32 unless asked otherwise.
    return "fp32"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Progress:
    """A rich progress bar with loss, learning rate and tokens/s (main process only)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.stop()

    def update(self, m: dict[str, Any]) -> None:
        if self.enabled:
            lr = max(m["lr"].values())
            info = f"loss {m['loss']:.4f}  lr {lr:.2e}  {m['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, completed=m["step"], info=info)


def iter_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
