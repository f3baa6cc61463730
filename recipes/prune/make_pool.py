"""The training pool of the DeltaLoss mini-replication: two easy-VQA sub-datasets on disjoint images.

    python recipes/prune/make_pool.py [--data data/easy-vqa] [--per-file 240] [--seed 0]

``nvila nano data`` writes the easy-VQA training conversations (one image, up to 10 questions answered as
independent turns). This samples ``--per-file`` conversations from two of its files, each on its own images,
so the pool is a mixture of two sub-datasets as NVILA's SFT data is:

    own.jsonl        the split's own questions (train.jsonl): yes/no answers follow the wording's prior
    balanced.jsonl   balanced questions (train-balanced.jsonl): yes/no 50/50 for every wording

Records are copied verbatim, so `nvila prune` scores them and the recipes in this folder train on them.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path


def by_image(path: Path) -> dict[str, list[str]]:
    """JSONL lines of a training file grouped by their image, in file order."""
    groups: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            groups[json.loads(line)["image"]].append(line)
    return groups


def sample(groups: dict[str, list[str]], images: list[str], n: int) -> list[str]:
    """The first ``n`` records of the given images, taken image by image."""
    out: list[str] = []
    for image in images:
        out.extend(groups.get(image, []))
        if len(out) >= n:
            break
    if len(out) < n:
        raise SystemExit(f"only {len(out)} records on the images given; asked for {n}")
    return out[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/easy-vqa", help="folder `nvila nano data` wrote")
    p.add_argument("--out", default=None, help="output folder (default: DATA/pool)")
    p.add_argument("--per-file", type=int, default=240, help="conversations per sub-dataset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = Path(args.data)
    out = Path(args.out) if args.out else data / "pool"
    own, balanced = by_image(data / "train.jsonl"), by_image(data / "train-balanced.jsonl")
    images = sorted(own.keys() & balanced.keys())
    random.Random(args.seed).shuffle(images)
    half = len(images) // 2
    out.mkdir(parents=True, exist_ok=True)
    for name, groups, pick in (("own", own, images[:half]), ("balanced", balanced, images[half:])):
        lines = sample(groups, pick, args.per_file)
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        questions = sum(len(json.loads(line)["conversations"]) // 2 for line in lines)
        print(f"{out / name}.jsonl: {len(lines)} conversations, {questions} questions")


if __name__ == "__main__":
    main()
