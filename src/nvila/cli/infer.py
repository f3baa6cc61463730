"""``nvila infer``: answer one prompt about images and videos."""

from __future__ import annotations

import argparse
import json

from nvila.base.errors import NvilaError
from nvila.cli.common import add_lora_arg, add_model_args, add_sampling_args, generation_options, load_model
from nvila.processing.media import media_part

HELP = "answer one prompt about images/videos"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--media", nargs="+", default=[], metavar="FILE", help="images, videos or frame folders")
    p.add_argument("--text", required=True, help="the question or instruction")
    p.add_argument("--system", default=None, help="system prompt (default: the model's)")
    p.add_argument("--stream", action="store_true", help="print the answer while it is generated")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and token ids")
    add_sampling_args(p)


def run(args: argparse.Namespace) -> int:
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
            "raw_text": result.raw_text,
            "segments": [{"start": s.start, "end": s.end} for s in result.segments],
        }))
    else:
        print(result.text)
    return 0
