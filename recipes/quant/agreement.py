"""Next-token agreement of quantized checkpoints with their float model on easy-VQA test questions.

Accuracy on a few hundred yes/no questions moves by points when a handful of answers at small logit
margins flip; the divergence of the whole next-token distribution is a steadier measure of how far a
quantized model drifted. For the first N test questions (image + question, as ``nvila eval`` asks them)
this prints, per quantized checkpoint, the mean and median KL(float || quantized) of the first answer
token's distribution and how often the two models' most likely token agrees::

    python recipes/quant/agreement.py --float .cache/bench/nano-merged --n 400 .cache/bench/nano-w4 ... \
        [--json docs/perf/nano-w4-agreement.json]

Everything runs in bf16 (the dtype quantized models use on CPUs with native bf16).
"""

from __future__ import annotations

import argparse

import torch

import nvila
from nvila.base.files import write_json
from nvila.base.provenance import provenance
from nvila.eval.datasets import load_eval


def next_token_logprobs(path: str, messages: list) -> torch.Tensor:
    pipe = nvila.load(path, dtype="bfloat16", device="cpu")
    with torch.inference_mode():
        return torch.stack([pipe.next_token_logits(m).float().reshape(-1).log_softmax(-1) for m in messages])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float", required=True, dest="float_model", help="the float checkpoint")
    parser.add_argument("--n", type=int, default=400, help="first N easy-VQA test questions (default 400)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("quantized", nargs="+", help="quantized checkpoint folders")
    args = parser.parse_args()
    results = []
    items = load_eval("easy-vqa", "test")[: args.n]
    messages = [[{"role": "user", "content": [{"type": "image", "image": it.image},
                                              {"type": "text", "text": it.question}]}] for it in items]
    ref = next_token_logprobs(args.float_model, messages)
    for path in args.quantized:
        lp = next_token_logprobs(path, messages)
        kl = (ref.exp() * (ref - lp)).sum(-1)
        agree = (ref.argmax(-1) == lp.argmax(-1)).float().mean().item()
        print(f"{path}: KL mean {kl.mean().item():.4f}, median {kl.median().item():.4f}, "
              f"top-1 agreement {agree:.3f} ({len(items)} questions)", flush=True)
        results.append({"quantized": path, "kl_mean": kl.mean().item(), "kl_median": kl.median().item(),
                        "top1_agreement": agree, "questions": len(items)})
    if args.json:
        write_json(args.json, {"results": results, "provenance": provenance(
            float_model=args.float_model, quantized=args.quantized, dataset="easy-vqa test", first=args.n)})


if __name__ == "__main__":
    main()
