"""The frame-count ablation of NVILA-Nano's video stage: more frames, then pool, at an equal token budget.

    python recipes/nano-video/ablation.py [--runs runs/nano-video-ablation] [--data data/nano-video]
        [--json docs/perf/nano-video-ablation.json] [--plot docs/img/nano-video-ablation.png]

Three arms, trained by ``make nano-video-ablation`` with recipes/nano-video/ablation.yaml and nothing changed
but the frame settings (same data, steps, seed, learning rates, feature cache). That recipe is fixed for the
ablation, so its arms stay comparable while the shipped stage's recipe (video.yaml) is tuned:

    a-8f        8 frames, no pooling          8 x (16 + 1) = 136 visual tokens
    b-32f-tsp4  32 frames, TSP x4             8 x (16 + 1) = 136 visual tokens
    c-32f       32 frames, no pooling        32 x (16 + 1) = 544 visual tokens (upper reference)

Each arm's adapter is loaded on the Nano base (its nvila_adapter.json carries its frame settings) and
answers every held-out test clip greedily (or its `nvila eval --json` report is reused: --eval-json ARM=FILE);
accuracy per question type, flash accuracy split by whether 8 uniform frames contain the flash at all, and
the time to the first token (median over a few clips: video decoding, vision tower, projector + pooling,
prefill) are written side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import nvila
from nvila.base.files import write_json
from nvila.base.provenance import provenance
from nvila.bench.timing import time_once
from nvila.builders.nano import build
from nvila.eval.datasets import load_eval
from nvila.eval.run import evaluate
from nvila.eval.video_shapes import QUESTION_TYPES
from nvila.formats.config import with_media_settings

ARMS = {"a-8f": "8 frames, no pooling", "b-32f-tsp4": "32 frames, TSP x4", "c-32f": "32 frames, no pooling"}
# each arm's frame settings (the recipe's data section holds b's); what `make nano-video-ablation` overrides
SETTINGS = {"a-8f": {"num_video_frames": 8, "video_frame_size": 168, "video_pool": []},
            "b-32f-tsp4": {"num_video_frames": 32, "video_frame_size": 168, "video_pool": [[4, 1, 1]]},
            "c-32f": {"num_video_frames": 32, "video_frame_size": 168, "video_pool": []}}


def flash_seen_by_8(data: Path) -> dict[str, bool]:
    """Test clip id -> whether 8 uniformly sampled frames include a flash frame (flash questions only)."""
    out = {}
    for line in (data / "test.jsonl").read_text().splitlines():
        rec = json.loads(line)
        flash = rec["metadata"].get("flash")
        if rec["metadata"]["question_type"] == "flash_colour" and flash:
            out[rec["id"]] = bool(flash["seen"]["8"])
    return out


def ttft(pipe, items: list, clips: int) -> dict:
    """Median time to the first token over ``clips`` test clips (after one warm-up pass)."""
    times = []
    for i, it in enumerate([items[0], *items[:clips]]):
        msgs = [{"role": "user", "content": [{"type": "video", "video": it.image},
                                             {"type": "text", "text": it.question}]}]
        t = time_once(pipe, msgs, 1, {})
        if i:
            times.append(t)
    return {"ttft_s": statistics.median(t["ttft_s"] for t in times),
            "ttft_parts_s": {k: statistics.median(t[k] for t in times)
                             for k in ("preprocess_s", "vision_s", "projector_s", "prefill_s")}}


def measure(arm: str, adapter: Path | None, timing_adapter: Path, items: list, ttft_clips: int,
            report: dict | None) -> dict:
    """Accuracy (``report`` from `nvila eval --json`, else evaluated here; none without an adapter) and TTFT
    (which depends on the frame settings only, so an untrained arm is timed with another arm's weights)."""
    pipe = nvila.load(build(), dtype="float32", lora=adapter or timing_adapter)
    pipe.model.cfg = with_media_settings(pipe.config, SETTINGS[arm])
    pipe = type(pipe)(pipe.checkpoint)                   # a processor for the arm's settings
    cfg = pipe.config
    if adapter is not None and report is None:
        report = evaluate(pipe, items, batch_size=1, progress=True)
    video = [{"role": "user", "content": [{"type": "video", "video": items[0].image}]}]
    tokens = pipe.prepare(video).media[0].num_embeddings
    out = {"trained": adapter is not None, "adapter": str(adapter) if adapter else None,
           "frames": cfg.num_video_frames, "frame_size": cfg.frame_size,
           "pool": [list(p) for p in cfg.video_encoder.pool_sizes], "visual_tokens": tokens,
           **ttft(pipe, items, ttft_clips)}
    if report is not None:
        out |= {"accuracy": report["accuracy"], "n": report["n"],
                "accuracy_by_question_type": report["accuracy_by_question_type"], "predictions": report["predictions"]}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(QUESTION_TYPES)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(results)
    results = {a: r for a, r in results.items() if r["trained"]}
    for k, (arm, r) in enumerate(results.items()):
        acc = [100 * r["accuracy_by_question_type"].get(t, 0) for t in types]
        ax.bar([i + (k - (len(results) - 1) / 2) * width for i in range(len(types))], acc, width,
               label=f"{ARMS[arm]} ({r['visual_tokens']} tokens, TTFT {r['ttft_s']:.2f} s)")
    ax.set_xticks(range(len(types)), [t.replace("_", " ") for t in types])
    ax.set_ylabel("accuracy on held-out clips (%)")
    ax.set_ylim(0, 105)
    ax.set_title("NVILA-Nano video: more frames, then pool (equal tokens: a vs b)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/nano-video-ablation", help="folder holding the arms' run folders")
    p.add_argument("--data", default="data/nano-video")
    p.add_argument("--json", default="docs/perf/nano-video-ablation.json")
    p.add_argument("--plot", default="docs/img/nano-video-ablation.png")
    p.add_argument("--ttft-clips", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="only the first N test clips")
    p.add_argument("--eval-json", action="append", default=[], metavar="ARM=FILE",
                   help="reuse an arm's `nvila eval --json` report on the same test split instead of evaluating")
    args = p.parse_args()
    data, runs = Path(args.data), Path(args.runs)
    items = load_eval("nano-video", "test", data)[: args.limit]
    reports = {}
    for spec in args.eval_json:
        arm, _, file = spec.partition("=")
        reports[arm] = json.loads(Path(file).read_text())
        if reports[arm]["n"] != len(items):
            raise SystemExit(f"{file} scored {reports[arm]['n']} clips, the test split here has {len(items)}")
    trained = {arm: runs / arm / "adapter" for arm in ARMS if (runs / arm / "adapter").is_dir()}
    if not trained:
        raise SystemExit(f"no arm is trained under {runs}: run `make nano-video-ablation`")
    timing_adapter = next(iter(trained.values()))
    seen8 = flash_seen_by_8(data)
    results = {}
    for arm in ARMS:
        r = measure(arm, trained.get(arm), timing_adapter, items, args.ttft_clips, reports.get(arm))
        if r["trained"]:
            flash = [x for x in r["predictions"] if x["id"] in seen8]
            r["flash_accuracy_by_seen_in_8_frames"] = {
                str(s): (sum(x["correct"] for x in flash if seen8[x["id"]] == s) /
                         max(1, sum(1 for x in flash if seen8[x["id"]] == s))) for s in (True, False)}
            r["flash_clips_seen_in_8_frames"] = sum(seen8[x["id"]] for x in flash)
            r["flash_clips"] = len(flash)
        results[arm] = r
        acc = f"accuracy {r['accuracy']:.3f}" if r["trained"] else "not trained"
        print(f"{arm}: {acc}, TTFT {r['ttft_s']:.2f} s, {r['visual_tokens']} visual tokens")
    def pct(r: dict, t: str) -> str:
        return f"{100 * r['accuracy_by_question_type'].get(t, 0):.0f} %" if r["trained"] else "-"

    rows = ["| question type | " + " | ".join(ARMS[a] for a in results) + " |", "|---|" + "---|" * len(results)]
    for t in QUESTION_TYPES:
        rows.append(f"| {t} | " + " | ".join(pct(r, t) for r in results.values()) + " |")
    rows.append("| all | " + " | ".join(f"{100 * r['accuracy']:.1f} %" if r["trained"] else "not trained"
                                         for r in results.values()) + " |")
    rows.append("| visual tokens | " + " | ".join(str(r["visual_tokens"]) for r in results.values()) + " |")
    rows.append("| TTFT | " + " | ".join(f"{r['ttft_s']:.2f} s" for r in results.values()) + " |")
    print("\n".join(rows))
    out = {"arms": {a: {k: v for k, v in r.items() if k != "predictions"} for a, r in results.items()},
           "table_markdown": "\n".join(rows),
           "predictions": {a: r["predictions"] for a, r in results.items() if r["trained"]},
           "provenance": provenance(data=str(data), runs=str(runs), limit=args.limit,
                                    reused_eval_reports=args.eval_json)}
    write_json(args.json, out)
    plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
