"""DeltaLoss data pruning: score every training example with a small and a large model, keep the top-K per file.

NVILA prunes its SFT mixture by DeltaLoss. An example's score is ``log p_large(a | x) - log p_small(a | x)``
over its answer tokens ``a``: near zero, both models agree (too easy for both, or too hard for both);
negative, the small model does better than the large one (distracting or noisy data); positive, the large
model has learnt something the small one has not (helpful). Keeping the highest scores of every input file
keeps the helpful examples and the mixture's proportions (each file is one sub-dataset).

Design:

- An example's log-probability is the one the training loss sees: the training prompt
  (:func:`nvila.train.data.training_prompt`) and :func:`nvila.train.loss.answer_logprobs`, the computation
  behind the training loss. Right padding never changes a sequence's scores, so the batch size is only a
  speed knob.
- Normalisation (``normalize``): ``mean`` (default) is the average log-probability per answer token, ``sum``
  the total. A sum grows with the answer's length, so summed deltas push long answers to both ends of the
  ranking whatever their value; the mean puts short and long answers on one scale.
- Scorers (:data:`SCORERS`) turn the per-model log-probabilities into one number where higher means keep,
  and declare the models they read: ``random`` loads none, ``small-loss`` only the small one.
- Per file, the ``round(keep * n)`` highest scores are kept (halves round up); equal scores keep the
  earlier example. Kept records are written verbatim, in input order, in the input's format.
- Resumable: scores are appended to ``scores.jsonl`` and flushed after every batch; rerunning the same
  command reads them and scores only the rest. ``prune_config.json`` records what scores depend on
  (scorer, normalisation, models, adapters, dtype, seed of ``random``, a hash of every data file), and a
  rerun that differs in any of them is refused. ``keep`` is not among them: rerunning with another
  fraction re-selects without loading a model.

Output folder::

    prune_config.json   what the scores depend on (checked on resume)
    scores.jsonl        one line per example: dataset, index (position in its file), id, score,
                        logp_small, logp_large, n_tokens_small, n_tokens_large (null: model not used)
    <input file name>   the kept records of each input file
    scores.png          score histogram per sub-dataset, with the keep threshold
    summary.json        scorer, normalisation, keep, and per sub-dataset: n, kept, threshold, media_root

Kept records keep their media paths as written; relative ones still resolve against the input file's
folder, which summary.json lists as ``media_root`` (the training recipe's ``media_root`` of that dataset).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from nvila.api import load
from nvila.base.errors import ConfigError, NvilaError, PromptError
from nvila.base.hardware import resolve_device, resolve_dtype
from nvila.base.progress import ProgressBar
from nvila.base.provenance import provenance
from nvila.train.data import Sample, load_dataset, read_records, training_prompt
from nvila.train.loss import answer_logprobs

ROLES = ("small", "large")
NORMALIZATIONS = ("mean", "sum")
CONFIG, SCORES, SUMMARY, PLOT = "prune_config.json", "scores.jsonl", "summary.json", "scores.png"


# ---- scorers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scorer:
    """Per-example log-probabilities -> one score; the highest scores are kept."""

    needs: tuple[str, ...]                                  # models it reads, from ROLES
    combine: Callable[[dict[str, float], float], float]     # (log-prob by model, seeded uniform draw) -> score
    help: str
    seeded: bool = False                                    # reads the draw (so the seed is part of its scores)


SCORERS: dict[str, Scorer] = {
    "deltaloss": Scorer(("small", "large"), lambda lp, u: lp["large"] - lp["small"],
                        "log p_large - log p_small: keeps what the large model learnt and the small one did not"),
    "small-loss": Scorer(("small",), lambda lp, u: -lp["small"],
                         "-log p_small, the small model's loss: keeps the hardest examples for the small model"),
    "large-loss": Scorer(("large",), lambda lp, u: -lp["large"],
                         "-log p_large, the large model's loss: keeps the hardest examples for the large model"),
    "random": Scorer((), lambda lp, u: u, "a uniform draw per example from (seed, dataset, index): a random "
                     "subset of each file", seeded=True),
}


def draw(seed: int, dataset: str, index: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, dataset, index), so resumed runs agree."""
    return random.Random(f"{seed}:{dataset}:{index}").random()


# ---- log-probabilities of answers ------------------------------------------------------------------


def normalized(logp_sum: float, n_tokens: int, how: str) -> float:
    """An example's log-probability under ``how``: ``sum`` as is, ``mean`` per answer token."""
    return logp_sum / n_tokens if how == "mean" else logp_sum


# ---- inputs and settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneJob:
    """One pruning run: what the ``nvila prune`` flags say."""

    data: tuple[str | Path, ...]
    out: str | Path
    keep: float
    scorer: str = "deltaloss"
    normalize: str = "mean"
    small: str | None = None
    large: str | None = None
    small_lora: str | None = None
    large_lora: str | None = None
    batch_size: int = 8
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True
    independent_turns: bool = False      # score as training with data.independent_turns does (nvila.train.branches)


@dataclass(frozen=True)
class SubDataset:
    """One input file: its samples, and its records as read (JSONL lines verbatim, or JSON-list objects)."""

    name: str
    path: Path
    samples: list[Sample]
    records: list[Any]
    digest: str


def check_job(job: PruneJob) -> Scorer:
    """Refuse bad settings before anything is read or loaded; returns the scorer."""
    if job.scorer not in SCORERS:
        raise ConfigError(f"unknown scorer {job.scorer!r}; known: {', '.join(sorted(SCORERS))}")
    if job.normalize not in NORMALIZATIONS:
        raise ConfigError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {job.normalize!r}")
    if isinstance(job.keep, bool) or not isinstance(job.keep, (int, float)) or not 0 < job.keep <= 1:
        raise ConfigError(f"--keep is the fraction of each file to keep, in (0, 1]; got {job.keep!r}")
    if job.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {job.batch_size}")
    if not job.data:
        raise ConfigError("no data: pass --data FILE (once per sub-dataset)")
    scorer = SCORERS[job.scorer]
    for role in ROLES:
        model, lora = getattr(job, role), getattr(job, f"{role}_lora")
        if role in scorer.needs and model is None:
            raise ConfigError(f"scorer {job.scorer} needs --{role} (the {role} model's checkpoint)")
        if role not in scorer.needs and model is not None:
            raise ConfigError(f"scorer {job.scorer} does not use a {role} model; drop --{role}")
        if lora is not None and model is None:
            raise ConfigError(f"--{role}-lora needs --{role} (the base the adapter was trained on)")
    return scorer


def read_inputs(paths: Sequence[str | Path]) -> list[SubDataset]:
    """Every input file as a sub-dataset named by its file stem; names and output names must be unique."""
    out: list[SubDataset] = []
    for p in map(Path, paths):
        samples = load_dataset(p)
        if not samples:
            raise NvilaError(f"dataset file {p} holds no records")
        if p.suffix == ".jsonl":
            records: list[Any] = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            records = read_records(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        out.append(SubDataset(p.stem, p, samples, records, digest))
    names = [d.name for d in out]
    files = [d.path.name for d in out]
    if len(set(names)) < len(names) or len(set(files)) < len(files):
        raise ConfigError(f"the --data files {files} must have distinct names (each names a sub-dataset and its "
                          "pruned output file); rename or copy one")
    reserved = sorted({CONFIG, SCORES, SUMMARY, PLOT} & set(files))
    if reserved:
        raise ConfigError(f"a --data file may not be called {reserved[0]}: the output folder uses that name")
    return out


def run_config(job: PruneJob, scorer: Scorer, datasets: Sequence[SubDataset]) -> dict[str, Any]:
    """What the scores depend on: a rerun in the same folder must match it to reuse them."""
    dtype = str(resolve_dtype(job.dtype, resolve_device(job.device))).removeprefix("torch.")
    models = {role: {"model": _source(getattr(job, role)), "lora": _source(getattr(job, f"{role}_lora"))}
              for role in scorer.needs}
    return {"scorer": job.scorer, "normalize": job.normalize, "independent_turns": job.independent_turns,
            "models": models,
            "dtype": dtype if scorer.needs else None, "seed": job.seed if scorer.seeded else None,
            "data": {d.name: d.digest for d in datasets}}


def _source(path: str | Path | None) -> str | None:
    """A local folder as an absolute path (the same folder however it is spelt); a Hub id as given."""
    if path is None:
        return None
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


# ---- the output folder and resuming ----------------------------------------------------------------


def existing_scores(out: Path, config: dict[str, Any], datasets: Sequence[SubDataset]) -> dict[tuple[str, int], dict]:
    """Scores a previous run of the same settings left in ``out`` (read only); refuses other settings."""
    if not (out / CONFIG).is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"{out} is not empty and holds no {CONFIG}; choose a new or empty --out folder")
        return {}
    saved = json.loads((out / CONFIG).read_text(encoding="utf-8"))
    diffs = [f"{k}: {a!r} there, {b!r} now" for k, a, b in _differences(saved, config)]
    if diffs:
        raise ConfigError(f"{out} holds scores made with other settings ({'; '.join(diffs)}); rerun with the same "
                          "settings to resume, or choose another --out folder")
    return read_scores(out / SCORES, datasets)


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) wherever two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def read_scores(path: Path, datasets: Sequence[SubDataset]) -> dict[tuple[str, int], dict]:
    """Rows of ``scores.jsonl`` by (dataset, index); a partly written last line (a killed run) is cut off."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        os.truncate(path, len(complete))
    sizes = {d.name: len(d.samples) for d in datasets}
    rows: dict[tuple[str, int], dict] = {}
    for n, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            key = (row["dataset"], row["index"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NvilaError(f"{path} line {n} is not a score row; delete that line to rescore it") from None
        if key[0] not in sizes or not isinstance(key[1], int) or not 0 <= key[1] < sizes[key[0]]:
            raise NvilaError(f"{path} line {n} scores example {key}, which the data does not have")
        rows[key] = row
    return rows


# ---- scoring ---------------------------------------------------------------------------------------


def load_models(job: PruneJob, roles: Sequence[str]) -> dict[str, Any]:
    """A Pipeline per model role (its processor builds the prompts: templates may differ between models)."""
    return {role: load(getattr(job, role), dtype=job.dtype, device=job.device, fast=False,
                             lora=getattr(job, f"{role}_lora")) for role in roles}


def score_batch(items: Sequence[tuple[SubDataset, int]], job: PruneJob, models: dict[str, Any]) -> list[dict]:
    """Score rows of ``items`` ((sub-dataset, index) pairs), in order."""
    scorer = SCORERS[job.scorer]
    per_model = {role: answer_logprobs(pipe.model, [training_prompt(pipe.processor, d.samples[i],
                                                                    job.independent_turns) for d, i in items])
                 for role, pipe in models.items()}
    rows = []
    for k, (d, i) in enumerate(items):
        sample = d.samples[i]
        if any(per_model[role][k][1] == 0 for role in per_model):
            raise PromptError(f"sample {sample.id} of {d.name} has no answer tokens to score")
        lp = {role: normalized(*per_model[role][k], job.normalize) for role in per_model}
        score = scorer.combine(lp, draw(job.seed, d.name, i) if scorer.seeded else 0.0)
        if not math.isfinite(score):
            raise NvilaError(f"sample {sample.id} of {d.name} scored {score}; non-finite log-probabilities "
                             "(try --dtype float32)")
        rows.append({"dataset": d.name, "index": i, "id": sample.id, "score": score,
                     **{f"logp_{r}": lp.get(r) for r in ROLES},
                     **{f"n_tokens_{r}": per_model[r][k][1] if r in per_model else None for r in ROLES}})
    return rows


def score_missing(job: PruneJob, datasets: Sequence[SubDataset], rows: dict[tuple[str, int], dict],
                  models: dict[str, Any], path: Path) -> int:
    """Score every example without a row, appending rows to ``path`` batch by batch; returns how many."""
    todo = [(d, i) for d in datasets for i in range(len(d.samples)) if (d.name, i) not in rows]
    total = sum(len(d.samples) for d in datasets)
    bar = ProgressBar("scoring", total, "examples", total - len(todo), job.progress, stderr=True)
    with bar, open(path, "a", encoding="utf-8") as f:
        for s in range(0, len(todo), job.batch_size):
            batch = score_batch(todo[s : s + job.batch_size], job, models)
            f.write("".join(json.dumps(r) + "\n" for r in batch))
            f.flush()
            rows.update({(r["dataset"], r["index"]): r for r in batch})
            bar.advance(len(batch))
    return len(todo)


# ---- selection and outputs -------------------------------------------------------------------------


def select(d: SubDataset, rows: dict[tuple[str, int], dict], keep: float) -> list[int]:
    """Indices of the ``round(keep * n)`` highest scores of ``d`` (earlier first on ties), in file order."""
    n = len(d.samples)
    order = sorted(range(n), key=lambda i: (-rows[(d.name, i)]["score"], i))
    return sorted(order[: math.floor(keep * n + 0.5)])


def write_pruned(d: SubDataset, kept: Sequence[int], out: Path) -> Path:
    """The kept records of ``d`` in its own format: JSONL lines verbatim, or a JSON list of the objects."""
    path = out / d.path.name
    if d.path.suffix == ".jsonl":
        path.write_text("".join(d.records[i] + "\n" for i in kept), encoding="utf-8")
    else:
        path.write_text(json.dumps([d.records[i] for i in kept], ensure_ascii=False, indent=2) + "\n",
                        encoding="utf-8")
    return path


def plot_scores(datasets: Sequence[SubDataset], rows: dict[tuple[str, int], dict], summary: dict[str, Any],
                path: Path) -> None:
    """One score histogram per sub-dataset, with the lowest kept score marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 2.4 * len(datasets)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, d in zip(axes, datasets):
        info = summary["datasets"][d.name]
        scores = [rows[(d.name, i)]["score"] for i in range(len(d.samples))]
        ax.hist(scores, bins=max(5, min(60, len(scores) // 5)), color="tab:blue", alpha=0.8)
        if info["threshold"] is not None:
            ax.axvline(info["threshold"], color="tab:red", linestyle="--", label=f"kept >= {info['threshold']:.4g}")
            ax.legend(fontsize=8)
        ax.set_title(f"{d.name}: kept {info['kept']} of {info['n']}", fontsize=10)
        ax.set_ylabel("examples")
    axes[-1].set_xlabel(f"{summary['scorer']} score ({summary['normalize']} log-probability)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NvilaError("the score histogram needs matplotlib; pip install 'nvila[bench]'") from None


# ---- the run ---------------------------------------------------------------------------------------


def prune(job: PruneJob) -> dict[str, Any]:
    """Score (or resume scoring) every example, keep the top-K of each file, write the output folder.

    Returns the summary (as written to summary.json) plus this run's ``scored``/``reused`` counts and seconds.
    """
    start = time.perf_counter()
    scorer = check_job(job)
    _require_matplotlib()
    out = Path(job.out)
    datasets = read_inputs(job.data)
    config = run_config(job, scorer, datasets)
    rows = existing_scores(out, config, datasets)
    reused = len(rows)
    missing = sum(len(d.samples) for d in datasets) - reused
    models = load_models(job, scorer.needs) if missing and scorer.needs else {}
    out.mkdir(parents=True, exist_ok=True)   # only once the settings and models are known to be good
    if not (out / CONFIG).is_file():
        (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    scored = score_missing(job, datasets, rows, models, out / SCORES)
    summary: dict[str, Any] = {"scorer": job.scorer, "normalize": job.normalize, "keep": job.keep,
                               "models": config["models"], "datasets": {},
                               "provenance": provenance(models=config["models"])}
    for d in datasets:
        kept = select(d, rows, job.keep)
        summary["datasets"][d.name] = {
            "source": str(d.path), "file": str(write_pruned(d, kept, out)), "media_root": str(d.path.parent.resolve()),
            "n": len(d.samples), "kept": len(kept),
            "threshold": min((rows[(d.name, i)]["score"] for i in kept), default=None)}
    summary["total"] = {"n": sum(len(d.samples) for d in datasets),
                        "kept": sum(v["kept"] for v in summary["datasets"].values())}
    plot_scores(datasets, rows, summary, out / PLOT)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {**summary, "out": str(out), "scored": scored, "reused": reused,
            "seconds": round(time.perf_counter() - start, 3)}
