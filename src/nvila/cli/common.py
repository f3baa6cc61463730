"""Arguments and helpers shared by the verbs: model selection, sampling options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nvila.base.errors import NvilaError


def add_model_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """``--model``, ``--dtype``, ``--device``; ``optional``: without ``--model``, NVILA-Nano (``nvila:nano``)."""
    help_text = "checkpoint folder (official layout), Hugging Face Hub id or built-in name (nvila:nano)"
    p.add_argument("--model", required=not optional, default=None,
                   help=help_text + (" (default: NVILA-Nano)" if optional else ""))
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: auto)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: auto)")


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", default=None, metavar="ADAPTER_DIR",
                   help="LoRA adapter folder, merged into --model at load (needs nvila[train])")


def load_model(args: argparse.Namespace, **options: Any) -> Any:
    """The Pipeline for ``--model``/``--lora``; without ``--model``, NVILA-Nano (built on first use)."""
    from nvila import api

    if args.model is None and args.lora is not None:
        raise NvilaError("--lora needs --model (the base the adapter was trained on)")
    return api.load(args.model or api.DEFAULT_MODEL, dtype=args.dtype, device=args.device, lora=args.lora, **options)


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
    p.add_argument("--frame-rate", type=float, default=None,
                   help="frames per second of a frame folder (its duration, for time tokens and --fps)")
    p.add_argument("--raw-time-tokens", action="store_true",
                   help="leave time tokens (<tK>, NVILA-8B-Video) as they are instead of writing them as seconds")
    structured = p.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", default=None, metavar="FILE",
                            help="answer with JSON that follows this JSON schema (constrained decoding; needs xgrammar)")
    structured.add_argument("--json-object", action="store_true", help="answer with a JSON object (constrained decoding)")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "seed": args.seed, "stop": tuple(args.stop),
        "num_frames": args.num_frames, "fps": args.fps, "max_frames": args.max_frames, "frame_rate": args.frame_rate,
        "response_format": response_format(args), "time_tokens": "raw" if args.raw_time_tokens else "seconds",
    }


def response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` for ``--json-schema FILE`` / ``--json-object`` (None: free text)."""
    if args.json_object:
        return {"type": "json_object"}
    return None if args.json_schema is None else json_schema_format(args.json_schema)


def json_schema_format(file: str) -> dict[str, Any]:
    """``response_format`` of a JSON schema file (named after the file; strict)."""
    path = Path(file)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise NvilaError(f"--json-schema {path}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NvilaError(f"--json-schema {path}: not a JSON file ({e})") from None
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema, "strict": True}}
