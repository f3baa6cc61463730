"""A whole ``nvila bench`` run: synthetic or given media, each setup measured, printed and written out."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from nvila import api
from nvila.base.errors import ConfigError
from nvila.base.progress import ProgressBar
from nvila.bench import report, structured
from nvila.bench.timing import (
    SETUPS,
    BenchResult,
    bench_interleaved,
    bench_setup,
    load_quantized,
    measure_read_bandwidth,
    quantized_label,
)
from nvila.processing.media import media_part


@dataclass(frozen=True)
class BenchJob:
    """What ``nvila bench`` measures (its flags)."""

    model: str
    setups: tuple[str, ...] = ("auto",)
    device: str = "cpu"
    media: tuple[str, ...] = ()
    image_size: int = 448
    frames: int | None = None
    text: str = "Describe this in detail."
    quantized: str | None = None
    quant_dtype: str = "auto"
    runs: int = 3
    warmup: int = 1
    interleave: int = 0
    new_tokens: int = 32
    json: str | None = None
    plot: str | None = None
    sweep: tuple[int, ...] = ()
    response_format: dict[str, Any] | None = None    # --json-schema: decode speed with and without it instead


def run_structured(job: BenchJob) -> dict[str, Any]:
    """Decode tokens/s of the first setup with and without ``job.response_format`` (nvila.bench.structured)."""
    if job.response_format is None:
        raise ConfigError("the structured-output benchmark needs a response_format (--json-schema FILE)")
    with tempfile.TemporaryDirectory() as tmp:
        messages, opts = _messages(job, Path(tmp), None)
        return structured.run(job.model, job.response_format, messages, opts, json_out=job.json, setup=job.setups[0],
                              device=job.device, runs=job.runs, warmup=job.warmup, new_tokens=job.new_tokens)


def run(job: BenchJob) -> list[BenchResult]:
    """Measure every setup (and the quantized model), print the tables, write the JSON and plots."""
    unknown = [n for n in job.setups if n not in SETUPS]
    if unknown:
        raise ConfigError(f"unknown setup(s) {unknown}; known: {sorted(SETUPS)}")
    timing = {"runs": job.runs, "warmup": job.warmup, "new_tokens": job.new_tokens}
    loads: list[tuple[str, Callable[[], Any]]] = [
        (name, lambda kw=SETUPS[name]: api.load(job.model, device=job.device, **kw)) for name in job.setups]
    if job.quantized:
        loads.append((quantized_label(job.quantized),
                      lambda: load_quantized(job.quantized, job.device, job.quant_dtype)))
    with tempfile.TemporaryDirectory() as tmp, ProgressBar("benchmarking") as bar:
        messages, opts = _messages(job, Path(tmp), None)
        results = [bench_setup(label, load, messages, **timing, media_options=opts, on_step=bar.describe)
                   for label, load in loads]
        interleaved = None
        if job.interleave:
            interleaved = bench_interleaved(loads, messages, rounds=job.interleave, warmup=job.warmup,
                                            new_tokens=job.new_tokens, media_options=opts, on_step=bar.describe)
        sweep = {}
        if job.sweep:
            points = []
            for value in job.sweep:
                msgs, o = _messages(job, Path(tmp), value)
                r = bench_setup(f"auto@{value}", lambda: api.load(job.model, device=job.device, **SETUPS["auto"]),
                                msgs, runs=job.runs, warmup=job.warmup, new_tokens=1, media_options=o,
                                on_step=bar.describe)
                points.append((value, r.ttft_s))
            sweep["frames" if job.frames else "image size"] = points
    bandwidth = measure_read_bandwidth()
    report.print_bench(results, bandwidth, quantized=bool(job.quantized), interleaved=interleaved)
    if job.json:
        inputs = {"model": job.model, "quantized": job.quantized, "media": list(job.media) or None,
                  "image_size": None if job.media or job.frames else job.image_size, "frames": job.frames}
        report.write_json(job.json, results, {"read_bandwidth_bytes_per_s": bandwidth}, quantized=bool(job.quantized),
                          interleaved=interleaved, inputs=inputs)
    if job.plot:
        for path in report.plot(results, job.plot, sweep):
            print(f"wrote {path}")
    return results


def _messages(job: BenchJob, tmp: Path, value: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The benchmark prompt: the given media, or a synthetic image (side ``value``) or clip (``value`` frames)."""
    if job.media:
        parts: Sequence[dict[str, Any]] = [media_part(m) for m in job.media]
        opts: dict[str, Any] = {}
    elif job.frames:
        n = value or job.frames
        parts, opts = [{"type": "video", "video": synthetic_frames(tmp / f"v{n}", n)}], {"num_frames": n}
    else:
        size = value or job.image_size
        parts, opts = [{"type": "image", "image": synthetic_image(tmp / f"i{size}.png", size)}], {}
    return [{"role": "user", "content": [*parts, {"type": "text", "text": job.text}]}], opts


def synthetic_image(path: Path, size: int) -> str:
    """A deterministic colourful test image (gradients + shapes) of size x size."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([(x * 255 // size), (y * 255 // size), ((x + y) * 127 // size)], -1).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def synthetic_frames(folder: Path, n: int) -> str:
    """A folder of ``n`` small synthetic frames (a square moving across a gradient)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.zeros((144, 176, 3), np.uint8)
        arr[..., 0] = np.linspace(0, 255, 176, dtype=np.uint8)
        c = int(i * 150 / max(n - 1, 1))
        arr[50:80, c : c + 26] = (255, 255, 0)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    return str(folder)
