"""Timing of setups: stage timings, decode speed and memory, measured side by side in one process.

Every number is a median over ``runs`` repetitions after ``warmup`` untimed ones. Setups (``fp32``, ``bf16``,
``fast``) are run one after the other in the same process; each loads its own model after the previous
one is freed, and its peak RSS is measured from a reset high-water mark (Linux ``/proc/self/clear_refs``).
Decode speed is measured over a fixed number of steps that ignore stop tokens, so random checkpoints
give comparable numbers.

On a shared machine whose speed drifts while the setups run one after the other (other tenants moved
figures by 10-30 % between setups here), :func:`bench_interleaved` measures the setups in turns: all
loaded together, each round runs every setup once, so a slow spell hits all of them alike. Its ratios are
the ones to quote; the sequential pass still gives memory.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nvila import api
from nvila.base.errors import ConfigError
from nvila.formats.layout import QUANT_CONFIG
from nvila.generate import decode_step, left_pad, prefill

# setup name -> keyword arguments of nvila.load
SETUPS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32", "fast": False},        # the reference's arithmetic, eager
    "bf16": {"dtype": "bfloat16", "fast": False},       # plain bf16, eager
    "fast": {"dtype": "bfloat16", "fast": True},        # our bf16 CPU fast path (bf16 + decode kernels)
    "fp32-w16": {"dtype": "float32", "fast": True},     # float32 math on the 16-bit stored weights (lossless)
    "auto": {"dtype": "auto"},                          # what nvila.load picks on this machine
}


def quantized_label(folder: str | Path) -> str:
    """``w8a8+w4a16``-style label from a quantized checkpoint's quant_config.json."""
    path = Path(folder) / QUANT_CONFIG
    if not path.is_file():
        raise ConfigError(f"--quantized {folder}: no {QUANT_CONFIG} there; write one with `nvila quantize`")
    cfg = json.loads(path.read_text())
    schemes = [(cfg.get(part) or {}).get("scheme") for part in ("vision", "llm")]
    return "+".join(s for s in schemes if s) or "quantized"


def load_quantized(folder: str | Path, device: str, dtype: str) -> Any:
    """A quantized checkpoint as ``nvila.load`` serves it: with the fast path where it applies (bf16 on CPU:
    the vision attention, and the decode kernel for linears left in float, such as the LM head), so it is
    to be compared with the ``fast`` setup."""
    return api.load(folder, device=device, dtype=dtype)


@dataclass
class BenchResult:
    """Medians of one setup (seconds unless stated)."""

    label: str
    preprocess_s: float
    vision_s: float
    projector_s: float
    prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    decode_gb_per_s: float           # LLM weight bytes streamed per second while decoding
    peak_rss_bytes: int
    weight_bytes: int
    num_visual_tokens: int
    prompt_length: int
    load_s: float


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole process


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tensor_bytes(module: torch.nn.Module, skip: torch.Tensor | None = None) -> int:
    """Bytes of a module's parameters and buffers (quantized layers keep their weights as buffers) and of
    packed weights (``packed_bytes`` of :class:`~nvila.model.mixed.PackedFp16Linear` and of FBGEMM-packed
    :class:`~nvila.model.quantized.W8A8Linear`)."""
    seen: set[int] = set()
    total = sum(getattr(m, "packed_bytes", 0) for m in module.modules())
    for t in (*module.parameters(), *module.buffers()):
        if t is skip or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _decode_weight_bytes(llm: torch.nn.Module) -> int:
    """Bytes of LLM weights read per decoded token (the input embedding table is only gathered)."""
    emb = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    total = _tensor_bytes(llm, skip=emb)
    if head is not None and getattr(head, "weight", None) is emb:
        total += emb.numel() * emb.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_once(pipe: Any, messages: Any, new_tokens: int, media_options: dict[str, Any]) -> dict[str, float]:
    """One timed pass: prepare -> vision -> projector+fusion -> prefill -> ``new_tokens`` decode steps."""
    model, dev = pipe.model, pipe.model.device
    t0 = time.perf_counter()
    prompt = pipe.prepare(messages, **media_options)
    t1 = time.perf_counter()
    feats = model.encode_media(prompt.media) if prompt.media else None
    _sync(dev)
    t2 = time.perf_counter()
    x = model.fuse(prompt.input_ids, model.embed_media(prompt.media, feats))
    _sync(dev)
    t3 = time.perf_counter()
    x, mask, pos = left_pad([x])
    logits, cache = prefill(model.llm, x, mask, pos)
    token = logits.argmax(-1)
    _sync(dev)
    t4 = time.perf_counter()
    pos = pos[:, -1]
    for _ in range(new_tokens):
        pos = pos + 1
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        logits, cache = decode_step(model.llm, token, cache, mask, pos)
        token = logits.argmax(-1)
    _sync(dev)
    t5 = time.perf_counter()
    return {"preprocess_s": t1 - t0, "vision_s": t2 - t1, "projector_s": t3 - t2, "prefill_s": t4 - t3,
            "ttft_s": t4 - t0, "decode_tokens_per_s": new_tokens / (t5 - t4)}


def _step_name(i: int, warmup: int, timed: str) -> str:
    """Progress text of pass ``i``: ``warm-up 1`` .. then ``{timed} 1`` .."""
    return f"warm-up {i + 1}" if i < warmup else f"{timed} {i + 1 - warmup}"


def bench_setup(
    label: str,
    load: Callable[[], Any],
    messages: Any,
    *,
    runs: int = 3,
    warmup: int = 1,
    new_tokens: int = 32,
    media_options: dict[str, Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> BenchResult:
    """Load a model with ``load()`` and measure it; the model is freed before returning."""
    if runs < 1 or warmup < 0 or new_tokens < 1:
        raise ConfigError("need runs >= 1, warmup >= 0 and new_tokens >= 1")
    gc.collect()
    _reset_peak_rss()
    t = time.perf_counter()
    pipe = load()
    load_s = time.perf_counter() - t
    samples = []
    for i in range(warmup + runs):
        if on_step:
            on_step(f"{label}: {_step_name(i, warmup, 'run')}")
        sample = time_once(pipe, messages, new_tokens, media_options or {})
        if i >= warmup:
            samples.append(sample)
    prompt = pipe.prepare(messages, **(media_options or {}))
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    weight_bytes = _decode_weight_bytes(pipe.model.llm)
    all_bytes = _tensor_bytes(pipe.model)
    result = BenchResult(
        label=label, **med, decode_gb_per_s=weight_bytes * med["decode_tokens_per_s"] / 1e9,
        peak_rss_bytes=_peak_rss(), weight_bytes=all_bytes, num_visual_tokens=prompt.num_media_embeddings,
        prompt_length=prompt.fused_length, load_s=load_s,
    )
    del pipe, prompt
    gc.collect()
    return result


def bench_interleaved(
    loads: Sequence[tuple[str, Callable[[], Any]]],
    messages: Any,
    *,
    rounds: int = 5,
    warmup: int = 1,
    new_tokens: int = 32,
    media_options: dict[str, Any] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Medians of :func:`time_once` per setup (label -> stage -> value), the setups measured in turns.

    Every setup is loaded first (their memory adds up), then each of ``warmup + rounds`` rounds runs each
    setup once in the given order.
    """
    if rounds < 1 or warmup < 0 or new_tokens < 1:
        raise ConfigError("need rounds >= 1, warmup >= 0 and new_tokens >= 1")
    pipes = []
    for label, load in loads:
        if on_step:
            on_step(f"interleaved: loading {label}")
        pipes.append((label, load()))
    samples: dict[str, list[dict[str, float]]] = {label: [] for label, _ in pipes}
    for i in range(warmup + rounds):
        if on_step:
            on_step(f"interleaved: {_step_name(i, warmup, 'round')}")
        for label, pipe in pipes:
            sample = time_once(pipe, messages, new_tokens, media_options or {})
            if i >= warmup:
                samples[label].append(sample)
    del pipes
    gc.collect()
    return {label: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for label, runs in samples.items()}


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: median time to sum a ``gib`` GiB float32 tensor (all threads)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times)
