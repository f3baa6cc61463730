"""Text-only answers of SmolLM2 inside NVILA-Nano before and after the Nano training (LoRA on the LLM).

    python recipes/nano/chat_check.py [--adapter DIR] [--json docs/perf/nano-chat-before-after.json]

"Before" is the untrained Nano base (SmolLM2-135M-Instruct as released); "after" is the base with the
trained adapter (default: the shipped one). Greedy decoding, so the output is reproducible.
"""

from __future__ import annotations

import argparse

import nvila
from nvila.base.files import write_json
from nvila.base.provenance import provenance
from nvila.builders.nano import build, trained_adapter

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a short poem about the sea.",
    "What is 12 times 7?",
    "Explain what a neural network is in one sentence.",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", default=None, help="trained adapter folder (default: the shipped one)")
    p.add_argument("--json", default=None, help="write the answers here")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    adapter = args.adapter or trained_adapter()
    if adapter is None:
        raise SystemExit("no trained adapter: pass --adapter or run `make nano`")
    base = build()
    rows = [{"question": q} for q in QUESTIONS]
    for label, lora in (("before", None), ("after", adapter)):
        pipe = nvila.load(base, dtype="float32", lora=lora)
        for row in rows:
            row[label] = pipe.chat(row["question"], max_new_tokens=args.max_new_tokens)
    for row in rows:
        print(f"Q: {row['question']}\n  before: {row['before']!r}\n  after:  {row['after']!r}")
    if args.json:
        write_json(args.json, {"answers": rows, "provenance": provenance(model="nvila:nano-base", adapter=str(adapter),
                                                                         dtype="float32")})


if __name__ == "__main__":
    main()
