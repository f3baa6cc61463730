"""Reporting benchmark results: ratios between setups, the JSON file, plots and the printed tables."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nvila.base.files import write_json as write_json_file
from nvila.base.provenance import provenance
from nvila.bench.timing import BenchResult

RATIO_KEYS = ("ttft_s", "vision_s", "prefill_s", "decode_tokens_per_s", "peak_rss_bytes")


def ratios(base: BenchResult | Mapping[str, float], other: BenchResult | Mapping[str, float]) -> dict[str, float]:
    """Speed-ups of ``other`` over ``base`` (>1 = faster / smaller); results or :func:`bench_interleaved` medians."""
    base, other = (x if isinstance(x, Mapping) else asdict(x) for x in (base, other))
    out = {}
    for key in RATIO_KEYS:
        a, b = base.get(key), other.get(key)
        if a and b:
            out[key] = (b / a) if key == "decode_tokens_per_s" else (a / b)
    return out


def comparisons(results: Sequence[BenchResult], quantized: bool = False) -> list[tuple[BenchResult, BenchResult]]:
    """(base, other) pairs whose ratios are reported: every setup against the first, and a quantized setup
    (the last one) also against each other float setup (``fast`` is the one it runs like)."""
    pairs = [(results[0], r) for r in results[1:]]
    if quantized:
        pairs += [(r, results[-1]) for r in results[1:-1]]
    return pairs


def write_json(path: str | Path, results: Sequence[BenchResult], extra: dict[str, Any] | None = None,
               quantized: bool = False, interleaved: dict[str, dict[str, float]] | None = None,
               inputs: dict[str, Any] | None = None) -> None:
    """Medians of the first setup at the top level, every setup under ``setups``, ratios if compared;
    :func:`~nvila.bench.timing.bench_interleaved` medians and their ratios under ``interleaved``; what
    produced them under ``provenance`` (``inputs``: model, media, ...)."""
    data: dict[str, Any] = dict(asdict(results[0]))
    data.update(extra or {})
    data["setups"] = {r.label: asdict(r) for r in results}
    pairs = comparisons(results, quantized)
    if pairs:
        data["ratios"] = {f"{b.label}_vs_{a.label}": ratios(a, b) for a, b in pairs}
    if interleaved:
        data["interleaved"] = {
            "setups": interleaved,
            "ratios": {f"{b.label}_vs_{a.label}": ratios(interleaved[a.label], interleaved[b.label]) for a, b in pairs},
        }
    data["provenance"] = provenance(**(inputs or {}))
    write_json_file(path, data)


def plot(results: Sequence[BenchResult], out_dir: str | Path, sweep: dict[str, list[tuple[float, float]]] | None = None) -> list[Path]:
    """PNG plots: stage breakdown per setup, decode tokens/s per setup, latency vs sweep values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    stages = ("preprocess_s", "vision_s", "projector_s", "prefill_s")
    labels = [r.label for r in results]
    left = [0.0] * len(results)
    for stage in stages:
        vals = [getattr(r, stage) for r in results]
        ax.barh(labels, vals, left=left, label=stage.removesuffix("_s"))
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("seconds to first token")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Time to first token by stage")
    fig.tight_layout()
    paths.append(out / "stages.png")
    fig.savefig(paths[-1], dpi=110)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, [r.decode_tokens_per_s for r in results], color="tab:green")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode speed")
    fig.tight_layout()
    paths.append(out / "decode.png")
    fig.savefig(paths[-1], dpi=110)
    for name, points in (sweep or {}).items():
        fig, ax = plt.subplots(figsize=(5, 3))
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o")
        ax.set_xlabel(name)
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"Latency vs {name}")
        fig.tight_layout()
        paths.append(out / f"latency_vs_{name.replace(' ', '_')}.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close("all")
    return paths


def print_bench(results: list, bandwidth: float | None = None, quantized: bool = False,
                interleaved: dict[str, dict[str, float]] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table


    table = Table(title="nvila bench (medians)")
    rows = [("preprocess (s)", "preprocess_s", "{:.3f}"), ("vision tower (s)", "vision_s", "{:.3f}"),
            ("projector+fusion (s)", "projector_s", "{:.3f}"), ("LLM prefill (s)", "prefill_s", "{:.3f}"),
            ("time to first token (s)", "ttft_s", "{:.3f}"), ("decode tokens/s", "decode_tokens_per_s", "{:.2f}"),
            ("decode weight GB/s", "decode_gb_per_s", "{:.1f}"), ("peak RSS (GiB)", "peak_rss_bytes", "gib"),
            ("weights (GiB)", "weight_bytes", "gib"), ("visual tokens", "num_visual_tokens", "{}"),
            ("prompt length", "prompt_length", "{}"), ("load (s)", "load_s", "{:.1f}")]
    table.add_column("metric")
    for r in results:
        table.add_column(r.label, justify="right")
    for name, key, fmt in rows:
        vals = [getattr(r, key) for r in results]
        table.add_row(name, *[f"{v / 2**30:.2f}" if fmt == "gib" else fmt.format(v) for v in vals])
    Console().print(table)
    if bandwidth:
        print(f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s; decode streams "
              + ", ".join(f"{r.label} {100 * r.decode_gb_per_s * 1e9 / bandwidth:.0f}%" for r in results)
              + " of it")
    def print_ratios(prefix: str, medians: Callable[[Any], Any]) -> None:
        for base, other in comparisons(results, quantized):
            rat = ratios(medians(base), medians(other))
            print(f"{prefix}{other.label} vs {base.label}: " + ", ".join(f"{k} x{v:.2f}" for k, v in rat.items()))

    print_ratios("", lambda r: r)
    if interleaved:
        table = Table(title="interleaved (medians of rounds, setups in turns)")
        table.add_column("metric")
        for label in interleaved:
            table.add_column(label, justify="right")
        timed = next(iter(interleaved.values()))                   # the stages time_once measures
        for name, key, fmt in rows:
            if key in timed:
                table.add_row(name, *[fmt.format(m[key]) for m in interleaved.values()])
        Console().print(table)
        print_ratios("interleaved ", lambda r: interleaved[r.label])
