"""``nvila`` command line: a registry of verbs, each a thin function over :mod:`nvila.api`.

Errors nvila raises on purpose (bad media, bad checkpoint, prompt too long, ...) are printed as one
``error: ...`` line with exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from nvila.errors import NvilaError

# verb -> (help, add_arguments(parser), run(args) -> exit status)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a CLI verb."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return register


def add_model_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """``--model``, ``--dtype``, ``--device``; ``optional``: without ``--model``, NVILA-Nano (see load_model)."""
    help_text = "checkpoint folder (official layout) or Hugging Face Hub id"
    p.add_argument("--model", required=not optional, default=None,
                   help=help_text + (" (default: NVILA-Nano)" if optional else ""))
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: auto)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: auto)")


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", default=None, metavar="ADAPTER_DIR",
                   help="LoRA adapter folder, merged into --model at load (needs nvila[train])")


def load_model(args: argparse.Namespace, **options: Any) -> Any:
    """The Pipeline for ``--model``/``--lora``; without ``--model``, NVILA-Nano (built on first use)."""
    import nvila

    model, lora = args.model, args.lora
    if model is None:
        from nvila.nano import default_model

        if lora is not None:
            raise NvilaError("--lora needs --model (the base the adapter was trained on)")
        model, lora = default_model()
    return nvila.load(model, dtype=args.dtype, device=args.device, lora=lora, **options)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--num-frames", type=int, default=None, help="frames sampled per video (default: model config)")
    p.add_argument("--fps", type=float, default=None, help="sample videos at this rate instead (capped by --max-frames)")
    p.add_argument("--max-frames", type=int, default=None, help="cap on frames when --fps is used")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "seed": args.seed, "stop": tuple(args.stop),
        "num_frames": args.num_frames, "fps": args.fps, "max_frames": args.max_frames,
    }


def media_part(path: str) -> dict[str, Any]:
    """A content part for a media path; the kind comes from the extension (a folder is a video)."""
    from nvila.media import media_kind

    kind = media_kind(path)
    return {"type": kind, kind: path}


# ---- infer ---------------------------------------------------------------------------------------
def _infer_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--media", nargs="+", default=[], metavar="FILE", help="images, videos or frame folders")
    p.add_argument("--text", required=True, help="the question or instruction")
    p.add_argument("--system", default=None, help="system prompt (default: the model's)")
    p.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and token ids")
    add_sampling_args(p)


@command("infer", "answer one prompt about images/videos", _infer_args)
def infer(args: argparse.Namespace) -> int:
    if args.stream and args.json:
        raise NvilaError("--stream and --json cannot be combined")
    parts = [media_part(m) for m in args.media] + [{"type": "text", "text": args.text}]
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": parts}]
    pipe = load_model(args)
    options = generation_options(args)
    if args.stream:
        for piece in pipe.stream(messages, **options):
            print(piece, end="", flush=True)
        print()
        return 0
    result = pipe.generate(messages, **options)
    if args.json:
        print(json.dumps({
            "text": result.text,
            "prompt_token_ids": result.prompt_token_ids,
            "num_media_embeddings": result.num_media_embeddings,
            "prompt_length": result.prompt_length,
            "output_token_ids": result.output_token_ids,
            "finish_reason": result.finish_reason,
        }))
    else:
        print(result.text)
    return 0


# ---- chat ----------------------------------------------------------------------------------------
CHAT_HELP = """commands: /image PATH, /video PATH (attach to your next message), /reset, /exit"""


def _chat_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--system", default=None, help="system prompt (default: the model's)")
    add_sampling_args(p)


@command("chat", "interactive multi-turn chat with streaming", _chat_args)
def chat(args: argparse.Namespace) -> int:
    pipe = load_model(args)
    options = generation_options(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    interactive = sys.stdin.isatty()
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history, pending = [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith(("/image ", "/video ")):
            kind, path = line[1:6], line[7:].strip()
            try:
                part = media_part(path)
            except NvilaError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            pending.append(part if part["type"] == kind else {"type": kind, kind: path})
            print(f"({kind} attached: {Path(path).name})", file=sys.stderr)
            continue
        turn = {"role": "user", "content": pending + [{"type": "text", "text": line}]}
        answer = ""
        try:
            print("nvila> " if interactive else "", end="", flush=True)
            for piece in pipe.stream(system + history + [turn], **options):
                answer += piece
                print(piece, end="", flush=True)
            print()
        except NvilaError as e:  # the turn is dropped, the conversation so far is kept
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": answer}]
        pending = []


# ---- random-checkpoint ---------------------------------------------------------------------------
def _random_args(p: argparse.ArgumentParser) -> None:
    from nvila.presets import PRESETS

    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (default: bf16, as released)")
    p.add_argument("--layers", type=int, default=None, help="truncate LLM and ViT to N layers (quick tests)")
    p.add_argument("--seed", type=int, default=0)


@command("random-checkpoint", "write a random checkpoint with a released model's exact shapes", _random_args)
def random_checkpoint(args: argparse.Namespace) -> int:
    from nvila.api import resolve_dtype
    from nvila.presets import random_checkpoint as write

    import torch

    out = write(args.preset, args.out, resolve_dtype(args.dtype, torch.device("cpu")), args.layers, args.seed)
    print(out)
    return 0


# ---- serve ---------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: folder name)")
    p.add_argument("--allowed-media-dir", default=None, help="local media paths are allowed only inside DIR")
    p.add_argument("--allow-remote-media", action="store_true", help="allow http(s) media URLs")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running before HTTP 429")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")


@command("serve", "OpenAI-compatible HTTP server", _serve_args)
def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from nvila.serve.app import ServerSettings, create_app
        from nvila.serve.media_urls import MediaPolicy
    except ImportError as e:
        raise NvilaError(f"the server needs extra packages ({e.name}); pip install 'nvila[serve]'") from None
    if args.max_queue < 1 or args.max_batch < 1:
        raise NvilaError("--max-queue and --max-batch must be >= 1")
    allowed = Path(args.allowed_media_dir) if args.allowed_media_dir else None
    if allowed is not None and not allowed.is_dir():
        raise NvilaError(f"--allowed-media-dir {allowed} is not a folder")
    pipe = load_model(args)
    model_id = args.served_model_name or Path(str(args.model).rstrip("/")).name
    settings = ServerSettings(model_id=model_id, api_key=args.api_key,
                              media=MediaPolicy(allowed_dir=allowed, allow_remote=args.allow_remote_media))
    app = create_app(pipe, settings, max_queue=args.max_queue, max_batch=args.max_batch)
    print(f"serving {model_id} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


# ---- bench-serve ---------------------------------------------------------------------------------
def _bench_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--json", default=None, metavar="FILE")


@command("bench-serve", "server throughput: sequential vs concurrent clients", _bench_serve_args)
def bench_serve(args: argparse.Namespace) -> int:
    from nvila.serve.app import ServerSettings, create_app
    from nvila.serve.loadtest import free_port, run_load, start_server

    pipe = load_model(args)
    port = free_port()
    app = create_app(pipe, ServerSettings(model_id="bench"), max_queue=max(64, args.concurrency * 2),
                     max_batch=args.max_batch)
    server = start_server(app, port)
    try:
        run_load(port, "bench", 2, 1, args.max_tokens)  # warm-up
        seq = run_load(port, "bench", args.requests, 1, args.max_tokens)
        conc = run_load(port, "bench", args.requests, args.concurrency, args.max_tokens)
    finally:
        server.should_exit = True
    result = {"sequential": seq, f"concurrency_{args.concurrency}": conc,
              "throughput_ratio": conc["requests_per_s"] / seq["requests_per_s"]}
    for name, r in (("sequential", seq), (f"concurrency {args.concurrency}", conc)):
        print(f"{name:>16}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
              f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, failures {r['failures']}")
    print(f"throughput ratio: x{result['throughput_ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---- merge ---------------------------------------------------------------------------------------
def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint folder (official layout) or Hugging Face Hub id")
    p.add_argument("--lora", required=True, metavar="ADAPTER_DIR", help="LoRA adapter folder trained on --model")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", default="float32",
                   help="dtype the merge is computed in (default float32); tensors are written in their stored dtype")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")


@command("merge", "fold a LoRA adapter into its base model and write the official layout", _merge_args)
def merge(args: argparse.Namespace) -> int:
    import nvila

    pipe = nvila.load(args.model, dtype=args.dtype, device=args.device, fast=False, lora=args.lora)
    print(pipe.save(args.out))
    return 0


# ---- bench ---------------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--media", nargs="+", default=[], metavar="FILE", help="media (default: a synthetic image)")
    p.add_argument("--image-size", type=int, default=448, help="side of the synthetic image (default 448)")
    p.add_argument("--frames", type=int, default=None, help="use a synthetic video of N frames instead")
    p.add_argument("--text", default="Describe this in detail.")
    p.add_argument("--setup", default="fast", help="setup to measure: fp32 | bf16 | fast (default fast)")
    p.add_argument("--compare", default=None, metavar="A,B", help="measure setups side by side, e.g. fp32,fast")
    p.add_argument("--quantized", default=None, metavar="DIR",
                   help="also measure this quantized checkpoint (nvila quantize of --model), after the setups")
    p.add_argument("--quant-dtype", default="auto",
                   help="dtype of the quantized model's float parts and activations (default auto)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="then load every setup at once and time them in turns for ROUNDS rounds (ratios robust "
                        "to a machine whose speed drifts; memory adds up)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", default=None, metavar="FILE", help="write the medians as JSON")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots")
    p.add_argument("--sweep", default=None, metavar="V1,V2,..",
                   help="also measure time to first token vs image sizes (or frame counts with --frames)")


@command("bench", "measure stage timings, decode speed and memory", _bench_args)
def bench(args: argparse.Namespace) -> int:
    import tempfile

    from nvila import bench as B
    from nvila.api import load
    from nvila.errors import ConfigError

    names = args.compare.split(",") if args.compare else [args.setup]
    unknown = [n for n in names if n not in B.SETUPS]
    if unknown:
        raise ConfigError(f"unknown setup(s) {unknown}; known: {sorted(B.SETUPS)}")
    with tempfile.TemporaryDirectory() as tmp:
        def messages_for(value: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            if args.media:
                parts, opts = [media_part(m) for m in args.media], {}
            elif args.frames:
                n = value or args.frames
                parts, opts = [{"type": "video", "video": synthetic_frames(Path(tmp) / f"v{n}", n)}], {"num_frames": n}
            else:
                size = value or args.image_size
                parts, opts = [{"type": "image", "image": synthetic_image(Path(tmp) / f"i{size}.png", size)}], {}
            return [{"role": "user", "content": parts + [{"type": "text", "text": args.text}]}], opts

        messages, opts = messages_for(None)
        results = []
        with _progress() as step:
            for name in names:
                kw = B.SETUPS[name]
                results.append(B.bench_setup(name, lambda: load(args.model, device=args.device, **kw), messages,
                                             runs=args.runs, warmup=args.warmup, new_tokens=args.new_tokens,
                                             media_options=opts, on_step=step))
            if args.quantized:
                label = B.quantized_label(args.quantized)
                results.append(B.bench_setup(label, lambda: B.load_quantized(args.quantized, args.device,
                                                                             args.quant_dtype),
                                             messages, runs=args.runs, warmup=args.warmup,
                                             new_tokens=args.new_tokens, media_options=opts, on_step=step))
            interleaved = None
            if args.interleave:
                loads = [(name, lambda kw=B.SETUPS[name]: load(args.model, device=args.device, **kw)) for name in names]
                if args.quantized:
                    loads.append((results[-1].label, lambda: B.load_quantized(args.quantized, args.device,
                                                                              args.quant_dtype)))
                interleaved = B.bench_interleaved(loads, messages, rounds=args.interleave, warmup=args.warmup,
                                                  new_tokens=args.new_tokens, media_options=opts, on_step=step)
            sweep = {}
            if args.sweep:
                label = "frames" if args.frames else "image size"
                points = []
                for v in [int(x) for x in args.sweep.split(",")]:
                    msgs, o = messages_for(v)
                    r = B.bench_setup(f"{names[-1]}@{v}", lambda: load(args.model, device=args.device,
                                                                        **B.SETUPS[names[-1]]),
                                      msgs, runs=args.runs, warmup=args.warmup, new_tokens=1, media_options=o,
                                      on_step=step)
                    points.append((v, r.ttft_s))
                sweep[label] = points
    bandwidth = B.measure_read_bandwidth()
    print_bench(results, bandwidth, quantized=bool(args.quantized), interleaved=interleaved)
    if args.json:
        B.write_json(args.json, results, {"read_bandwidth_bytes_per_s": bandwidth}, quantized=bool(args.quantized),
                     interleaved=interleaved)
    if args.plot:
        for path in B.plot(results, args.plot, sweep):
            print(f"wrote {path}")
    return 0


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


def _progress():
    """Context manager yielding a callback that shows the current benchmark step."""
    from contextlib import contextmanager

    from rich.console import Console

    @contextmanager
    def run():
        console = Console(stderr=True)
        with console.status("benchmarking") as status:
            yield lambda text: status.update(f"benchmarking: {text}")

    return run()


def print_bench(results: list, bandwidth: float | None = None, quantized: bool = False,
                interleaved: dict[str, dict[str, float]] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from nvila.bench import comparisons, ratios

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


# ---- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from nvila import __version__
    from nvila.cli import nano, prune, quantize, train  # noqa: F401  (register their verbs)

    parser = argparse.ArgumentParser(prog="nvila", description="NVILA vision-language models")
    parser.add_argument("--version", action="version", version=f"nvila {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except NvilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
