"""Parity with the reference implementation on every official fixture case, as a JSON report.

For the 39 recorded cases (3 checkpoint variants x 13 prompts) this measures what tests/test_parity.py
asserts (prompt ids, media-embedding counts, fused length, last-position logits, 16 greedy tokens) in
float32, and how far the bf16 fast path's logits move from the float32 reference::

    python recipes/parity/report.py --json docs/perf/parity.json        # what `make parity` runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import nvila
from nvila.base.files import write_json
from nvila.base.provenance import provenance

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "official"
OUTPUTS = FIXTURES / "outputs"


def messages(spec: dict) -> list[dict]:
    """The reference's prompt: all media first, then the text, in one user turn."""
    parts = [{"type": "image", "image": str(FIXTURES / p)} for p in spec["images"]]
    if spec["video"]:
        parts.append({"type": "video", "video": str(FIXTURES / spec["video"])})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": spec["prompt"]}]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args()
    cases = json.loads((OUTPUTS / "index.json").read_text())
    pipes: dict[str, dict[str, nvila.Pipeline]] = {}
    rows = []
    for case, spec in sorted(cases.items()):
        variant = case.split("/")[0]
        if variant not in pipes:
            pipes[variant] = {"fp32": nvila.load(FIXTURES / "checkpoints" / variant, dtype="float32", device="cpu"),
                              "fast": nvila.load(FIXTURES / "checkpoints" / variant, dtype="bfloat16", device="cpu",
                                                 fast=True)}
        ref = json.loads((OUTPUTS / f"{case}.json").read_text())
        want = np.load(OUTPUTS / f"{case}.npz")["last_logits"]
        fp32, fast, msgs = pipes[variant]["fp32"], pipes[variant]["fast"], messages(spec)
        prompt = fp32.prepare(msgs)
        logits, fast_logits = fp32.next_token_logits(msgs).numpy(), fast.next_token_logits(msgs).numpy()
        out = fp32.generate(msgs, max_new_tokens=16)
        rows.append({"case": case, "ids_equal": prompt.input_ids == ref["prompt"]["input_ids"],
                     "media_embeddings_equal": prompt.num_media_embeddings == ref["num_visual_tokens"],
                     "fused_length_equal": prompt.fused_length == ref["prefill"]["seq_len"],
                     "max_logit_error_fp32": float(np.abs(logits - want).max()),
                     "greedy_equal_fp32": out.output_token_ids == ref["generation"]["output_ids"],
                     "max_logit_error_fast_bf16": float(np.abs(fast_logits - want).max()),
                     "first_token_equal_fast_bf16": int(fast_logits.argmax()) == int(want.argmax())})
    summary = {"cases": len(rows),
               **{k: sum(r[k] for r in rows) for k in ("ids_equal", "media_embeddings_equal", "fused_length_equal",
                                                      "greedy_equal_fp32", "first_token_equal_fast_bf16")},
               "max_logit_error_fp32": max(r["max_logit_error_fp32"] for r in rows),
               "max_logit_error_fast_bf16": max(r["max_logit_error_fast_bf16"] for r in rows)}
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json(args.json, {"summary": summary, "cases": rows, "provenance": provenance(fixtures=str(FIXTURES))})


if __name__ == "__main__":
    main()
