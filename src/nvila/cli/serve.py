"""``nvila serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nvila.base.errors import NvilaError
from nvila.cli.common import add_lora_arg, add_model_args, load_model

HELP = "OpenAI-compatible HTTP server"
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, optional=True)
    add_lora_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the folder name; nvila-nano without --model)")
    p.add_argument("--allowed-media-dir", default=None, help="local media paths are allowed only inside DIR")
    p.add_argument("--allow-remote-media", action="store_true", help="allow http(s) media URLs")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running before HTTP 429")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--no-ui", dest="ui", action="store_false", help="no chat page at / (the HTTP API only)")


def run(args: argparse.Namespace) -> int:
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
    model_id = args.served_model_name or (Path(str(args.model).rstrip("/")).name if args.model else "nvila-nano")
    settings = ServerSettings(model_id=model_id, api_key=args.api_key,
                              media=MediaPolicy(allowed_dir=allowed, allow_remote=args.allow_remote_media), ui=args.ui)
    app = create_app(pipe, settings, max_queue=args.max_queue, max_batch=args.max_batch)
    print(f"serving {model_id} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    if args.ui:
        print(f"chat page: http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
