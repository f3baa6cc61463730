"""The training recipe runner: one explicit class (setup -> train -> export), resumable, torchrun-ready.

Determinism: the data order is a pure function of (seed, position) (see :mod:`nvila.train.mixture`), step
``s`` always trains stream positions ``[s*G, (s+1)*G)`` for the global batch G, and every checkpoint holds
the trainable weights, optimizer, scheduler and every process's RNG state (:mod:`nvila.train.state`), so a
resumed run continues the exact loss curve of an uninterrupted one.

Loss normalisation: every supervised token of a global batch weighs the same. Each micro-batch's summed
cross-entropy is divided by the token count of the whole global batch (all micro-batches, all processes,
counted before the forward), so one process with gradient accumulation and N processes with the same
global batch compute the same loss and the same update.

Distributed: launched by ``torchrun``, the model is wrapped by DDP or FSDP2 (:mod:`nvila.train.distributed`).

Precision: fp32, bf16 autocast, or FP8 linears (torchao, :mod:`nvila.train.fp8`) inside bf16 autocast.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nvila.api import resolve_model
from nvila.base.errors import ConfigError, NvilaError
from nvila.base.progress import ProgressBar
from nvila.builders.assemble import assemble
from nvila.checkpoint.load import load_checkpoint
from nvila.checkpoint.lora import (
    applied_settings,
    apply_lora,
    find_adapter,
    load_adapter,
    merge_lora,
    same_settings,
    save_adapter,
)
from nvila.checkpoint.save import save_checkpoint
from nvila.formats.config import MEDIA_SETTINGS, media_settings_of, with_media_settings
from nvila.formats.layout import ADAPTER_OTHER, LORA_MARK
from nvila.formats.plans import Prompt
from nvila.processing.processor import Processor
from nvila.train.data import Sample, load_dataset, training_prompt
from nvila.train.distributed import init_distributed, wrap
from nvila.train.features import FeatureCache
from nvila.train.fp8 import FP8_PRECISIONS, check_fp8_device, convert_to_fp8, make_optimizer, restore_linears
from nvila.train.loss import LossModule, supervised_tokens
from nvila.train.lowmem import store_frozen_in
from nvila.train.mixture import Mixture
from nvila.train.params import param_groups, set_trainable
from nvila.train.recipe import Recipe
from nvila.train.state import latest_checkpoint, load_state, save_state


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
        self.precision = _precision(t.precision, self.dist.device)      # refuses fp8 without FP8 hardware
        self._check_output()
        _seed_everything(r.seed)
        self.source = self._resolve_source()
        self.ckpt = self._load_model()
        model = self.ckpt.model
        self.trainable_counts = self._prepare_model(model)
        self.max_length = min(r.data.max_length or model.cfg.model_max_length, model.cfg.model_max_length)
        self.samples = self._load_data()
        self.mixture = Mixture([s for s, _ in self.samples], [ratio for _, ratio in self.samples], r.seed)
        self.global_batch = r.global_batch(self.dist.world)
        steps_per_epoch = max(1, self.mixture.epoch_size // self.global_batch)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        model.train()
        self._prepare_optimizer(model)
        self.step = 0
        if self.resume:
            latest = latest_checkpoint(self.out)
            if latest is not None:
                self.step = load_state(latest, self.wrapped, self.optimizer, self.scheduler, self.dist,
                                       {"global_batch": self.global_batch, "total_steps": self.total_steps})
        if self.step == 0:
            _seed_everything(r.seed + self.dist.rank)   # per-process randomness (dropout) from here on
        if self.dist.main:
            self._write_recipe()
            self._trim_metrics()
            if self.show_progress:
                self._summary()

    def _prepare_model(self, model: nn.Module) -> dict[str, int]:
        """Trainable parts, LoRA, FP8 linears, frozen-weight storage and activation checkpointing; trainable
        counts. FP8 comes after LoRA (the frozen base_layer under each LoRA layer is converted)."""
        t = self.recipe.train
        counts = set_trainable(model, t.parts)
        if t.init_adapter is not None:
            counts["llm"] += _continue_adapter(model, t.init_adapter, t.lora)
            # the adapter brought its own media settings; the recipe's still come first
            model.cfg = with_media_settings(model.cfg, self._media_changes())
            self.processor = Processor(model.cfg, self.ckpt.tokenizer, self.ckpt.chat_template)
        elif t.lora is not None:
            counts["llm"] += apply_lora(model, t.lora)
        self.fp8_layers: list[str] = []
        if self.precision in FP8_PRECISIONS:
            frozen = torch.bfloat16 if t.frozen_dtype == "bf16" else None
            self.fp8_layers = convert_to_fp8(model, t.fp8_recipe or "tensorwise", self.precision == "fp8-emulated",
                                             frozen)
        if t.frozen_dtype == "bf16":
            store_frozen_in(model, torch.bfloat16)
        if t.gradient_checkpointing:
            _checkpoint_activations(model.llm)
            if counts["vision"]:
                _checkpoint_activations(model.vision.model)
        return counts

    def _prepare_optimizer(self, model: nn.Module) -> None:
        t = self.recipe.train
        groups = param_groups(model, t.lr, t.weight_decay)
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        features = FeatureCache(t.feature_cache, model.vision) if t.feature_cache else None
        self.wrapped = wrap(LossModule(model, self.recipe.data.packing, self.max_length, features), self.dist,
                            t.distributed, t.frozen_dtype)
        params = dict(model.named_parameters())   # FSDP replaces parameters by sharded ones of the same name
        for g, members in zip(groups, group_names):
            g["params"] = [params[n] for n in members]
        self.optimizer = make_optimizer(t.optimizer, groups, t.betas, t.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _summary(self) -> None:
        """What is about to run, on stderr (the main process only)."""
        import sys

        parts = ", ".join(f"{k} {v:,}" for k, v in self.trainable_counts.items())
        print(f"nvila train: {self.mixture.epoch_size} samples/epoch, global batch {self.global_batch} "
              f"({self.dist.world} process(es)), steps {self.step}->{self.total_steps}, precision {self.precision}; "
              f"trainable: {parts}", file=sys.stderr)
        if self.fp8_layers:
            print(f"nvila train: {len(self.fp8_layers)} LLM/ViT linears in FP8 "
                  f"({self.recipe.train.fp8_recipe or 'tensorwise'} scaling)", file=sys.stderr)
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

    def _resolve_source(self) -> Any:
        """The starting checkpoint folder: assembled, or a built-in model built, by the main process first."""
        r = self.recipe
        source: Any = r.model
        if r.assemble is not None:
            source = self.out / "init"
            if self.dist.main and not source.is_dir():
                assemble(r.assemble, source, seed=r.seed)
        elif self.dist.main:
            resolve_model(source)
        self.dist.barrier()
        source, adapter = resolve_model(source)
        if adapter is not None:
            raise ConfigError(f"recipe model {r.model} includes a trained adapter; start from its base model "
                              "and continue the adapter with train.init_adapter")
        return source

    def _load_model(self) -> Any:
        source = self.source
        ckpt = load_checkpoint(source, dtype=torch.float32, device=str(self.dist.device))
        self.base_cfg = ckpt.model.cfg
        changes = self._media_changes()
        if changes:
            ckpt.model.cfg = with_media_settings(ckpt.model.cfg, changes)
        self.processor = Processor(ckpt.model.cfg, ckpt.tokenizer, ckpt.chat_template)
        return ckpt

    def _media_changes(self) -> dict[str, Any]:
        d = self.recipe.data
        return {k: getattr(d, k) for k in MEDIA_SETTINGS if getattr(d, k) is not None}

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
        return training_prompt(self.processor, sample, self.recipe.data.independent_turns)

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
        try:
            self.setup()
            t = self.recipe.train
            with ProgressBar("train", self.total_steps, done=self.step,
                             enabled=self.show_progress and self.dist.main) as bar:
                while self.step < self.total_steps:
                    metrics = self.train_step()
                    if self.dist.main:
                        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                            f.write(json.dumps(metrics) + "\n")
                    bar.update(metrics["step"], f"loss {metrics['loss']:.4f}  "
                                                f"lr {max(metrics['lr'].values()):.2e}  "
                                                f"{metrics['tokens_per_s']:.0f} tok/s")
                    if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                        self.save_state()
            self.save_state()
            self.export()
            self.dist.barrier()
        finally:
            if hasattr(self, "dist"):
                self.dist.close()
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
        low = self.precision == "bf16" or self.precision in FP8_PRECISIONS      # FP8 linears inside bf16 autocast
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16) if low else nullcontext()
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
        lrs = {g["name"]: float(g["lr"]) for g in self.optimizer.param_groups}   # adamw-fp8 keeps lr as a tensor
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
        return latest_checkpoint(self.out)

    def save_state(self) -> Path:
        """Write a resumable checkpoint (atomically) and keep the last ``keep_last``."""
        info = {"samples": self.step * self.global_batch, "global_batch": self.global_batch,
                "total_steps": self.total_steps}
        return save_state(self.out, self.step, self.wrapped, self.optimizer, self.scheduler, self.dist, info,
                          self.recipe.train.keep_last)

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
                apply_lora(model, self.recipe.train.lora)
            missing = [k for k in weights if k not in model.state_dict()]
            if missing:
                raise NvilaError(f"cannot export: tensors {missing[:3]} are not in the model")
            model.load_state_dict(weights, strict=False)
            self.ckpt.model = model
        restore_linears(model)              # FP8 runs: plain nn.Linear again, same parameters
        model.eval()
        if self.recipe.train.lora is not None:
            base = self.recipe.model or str(self.out / "init")
            save_adapter(model, self.out / "adapter", self.recipe.train.lora, base=base, replace=True,
                         config=media_settings_of(model.cfg, self.base_cfg))
            merge_lora(model)
        return save_checkpoint(self.ckpt, out, replace=True)

    def _gathered_weights(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                              ignore_frozen_params=True))
        return {k.removeprefix("model."): v for k, v in weights.items()}


# ---- helpers ------------------------------------------------------------------------------------------


def _continue_adapter(model: nn.Module, folder: str, settings: Any) -> int:
    """Load an earlier stage's adapter to train on: its LoRA layers (which must match ``settings``, so the
    exported adapter describes them) and its other tensors, which must all be trainable in this recipe
    (a frozen one would be left out of the exported adapter). Returns the LoRA parameter count."""
    from safetensors import safe_open

    load_adapter(model, folder)
    found = applied_settings(model.llm)
    if not same_settings(found, settings):
        raise ConfigError(f"train.init_adapter {folder} has LoRA {found.to_dict()}, but train.lora is "
                          f"{settings.to_dict()}: make train.lora match the adapter")
    other = find_adapter(folder) / ADAPTER_OTHER
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


def _precision(value: str, device: torch.device) -> str:
    if value != "auto":
        check_fp8_device(value, device)
        if value != "fp32" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision {value} was requested (bf16 autocast) but this GPU does not support "
                              "bfloat16")
        return value
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # CPU: bf16 autocast's backward GEMMs fall back to a generic kernel far slower than fp32's (torch 2.13),
    # so CPU training runs in fp32 unless asked otherwise.
    return "fp32"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def iter_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
