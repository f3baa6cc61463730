"""``nvila prune``: answer log-probabilities against a direct computation, batching, top-K per file, resume,
the scorer registry, the CLI and its errors.

One deltaloss run over three small files (``full_run``) is shared by the tests that only read its outputs;
models come from conftest's per-session cache except in the CLI test, which loads them itself.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS, MEDIA, fixture_pipeline

import nvila.prune as P
from nvila.base.errors import ConfigError
from nvila.cli.main import main
from nvila.processing.processor import IGNORE_INDEX

SMALL, LARGE = CHECKPOINTS / "nvila-lite", CHECKPOINTS / "nvila-video"


# ---- data and helpers ----------------------------------------------------------------------------


def _llava(i: int, question: str, answer: str, image: bool) -> dict:
    rec = {"id": f"q{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                            {"from": "gpt", "value": answer}]}
    return {**rec, "image": "hopper_64x64.png"} if image else rec


def write_data(root: Path) -> list[Path]:
    """a.jsonl: 6 LLaVA records (3 with a relative image path, compact JSON, a blank line); b.jsonl: 6 text
    records, one with two answers; c.json: a JSON list of 4 OpenAI-style records."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(MEDIA / "hopper_64x64.png", root)
    a = [_llava(i, f"What is shown here{'?' * (i + 1)}", "A face" + " in grey" * i + ".", i % 2 == 0) for i in range(6)]
    lines = [json.dumps(r, separators=(",", ":")) for r in a]
    (root / "a.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    b = [_llava(i, f"Count to {i}.", " ".join(str(k) for k in range(i + 1)), False) for i in range(6)]
    b[2]["conversations"] += [{"from": "human", "value": "And backwards?"}, {"from": "gpt", "value": "2 1 0"}]
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    c = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Name colour number {i}."},
                                      {"role": "assistant", "content": ["red", "green", "deep blue", "off-white"][i]}]}
         for i in range(4)]
    (root / "c.json").write_text(json.dumps(c, indent=1))
    return [root / "a.jsonl", root / "b.jsonl", root / "c.json"]


def job(data: list[Path], out: Path, **kw) -> P.PruneJob:
    base = dict(keep=0.5, small=str(SMALL), large=str(LARGE), dtype="float32", device="cpu", batch_size=4,
                progress=False)
    return P.PruneJob(data=tuple(data), out=out, **(base | kw))


@pytest.fixture(autouse=True)
def cached_models(monkeypatch):
    """Models from the per-session cache (float32, CPU); records which roles were asked for."""
    asked: list[tuple[str, ...]] = []

    def load(j: P.PruneJob, roles):
        asked.append(tuple(roles))
        return {r: fixture_pipeline(Path(getattr(j, r)).name) for r in roles}

    monkeypatch.setattr(P, "load_models", load)
    return asked


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[list[Path], Path, dict]:
    root = tmp_path_factory.mktemp("prune")
    data = write_data(root / "data")
    mp = pytest.MonkeyPatch()
    mp.setattr(P, "load_models", lambda j, roles: {r: fixture_pipeline(Path(getattr(j, r)).name) for r in roles})
    try:
        summary = P.prune(job(data, root / "out"))
    finally:
        mp.undo()
    return data, root / "out", summary


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def direct_logprob(pipe, messages: list[dict]) -> tuple[float, int]:
    """Summed log p of the answer tokens from one unpadded full forward of the LLM (no collate, no head trick)."""
    prompt = pipe.processor(messages, training=True)
    model = pipe.model
    with torch.no_grad():
        blocks = model.embed_media(prompt.media)
        logp = model.llm(inputs_embeds=model.fuse(prompt.input_ids, blocks)[None]).logits[0].float().log_softmax(-1)
    labels, sizes = [], iter(b.shape[0] for b in blocks)
    for token, label in zip(prompt.input_ids, prompt.labels):
        labels += [IGNORE_INDEX] * next(sizes) if token in model.media_token_ids.values() else [label]
    picked = [float(logp[t - 1, y]) for t, y in enumerate(labels) if t > 0 and y != IGNORE_INDEX]
    return sum(picked), len(picked)


# ---- scoring -------------------------------------------------------------------------------------


def test_logprobs_match_a_direct_forward(full_run, tmp_path) -> None:
    data, out, _ = full_run
    rows = {(r["dataset"], r["index"]): r for r in rows_of(out)}
    samples = {d.name: d.samples for d in P.read_inputs(data)}
    for key in [("a", 2), ("b", 2)]:                        # an image example; a two-answer conversation
        row, messages = rows[key], samples[key[0]][key[1]].messages
        for role, path in (("small", SMALL), ("large", LARGE)):
            total, n = direct_logprob(fixture_pipeline(path.name), messages)
            assert row[f"n_tokens_{role}"] == n > 0
            assert row[f"logp_{role}"] == pytest.approx(total / n, abs=1e-4)            # mean (the default)
        assert row["score"] == pytest.approx(row["logp_large"] - row["logp_small"], abs=1e-9)
    # --normalize sum over a one-example file
    one = tmp_path / "one.jsonl"
    one.write_text((data[0].parent / "a.jsonl").read_text().splitlines()[0] + "\n")
    shutil.copy(MEDIA / "hopper_64x64.png", tmp_path)
    P.prune(job([one], tmp_path / "out", normalize="sum"))
    row = rows_of(tmp_path / "out")[0]
    for role, path in (("small", SMALL), ("large", LARGE)):
        total, _ = direct_logprob(fixture_pipeline(path.name), samples["a"][0].messages)
        assert row[f"logp_{role}"] == pytest.approx(total, abs=1e-4)
    assert row["score"] == pytest.approx(row["logp_large"] - row["logp_small"], abs=1e-9)


def test_batched_scores_equal_one_at_a_time(full_run) -> None:
    data, _, _ = full_run
    pipe = fixture_pipeline(SMALL.name)
    samples = P.read_inputs(data[:1])[0].samples                # different lengths: padding in the batch
    prompts = [pipe.processor(s.messages, training=True) for s in samples]
    assert len({p.fused_length for p in prompts}) > 1
    batched = P.answer_logprobs(pipe.model, prompts)
    for prompt, (total, n) in zip(prompts, batched):
        alone_total, alone_n = P.answer_logprobs(pipe.model, [prompt])[0]
        assert n == alone_n and total == pytest.approx(alone_total, abs=1e-4)


# ---- selection and outputs -----------------------------------------------------------------------


def _kept_indices(source: Path, pruned: Path) -> list[int]:
    if source.suffix == ".jsonl":
        lines = [line for line in source.read_text().splitlines() if line.strip()]
        return [lines.index(line) for line in pruned.read_text().splitlines()]   # verbatim lines
    records = json.loads(source.read_text())
    return [records.index(r) for r in json.loads(pruned.read_text())]


def test_top_k_per_file_in_input_format_and_order(full_run) -> None:
    data, out, summary = full_run
    rows = rows_of(out)
    assert len(rows) == 16 and {(r["dataset"], r["index"]) for r in rows} == {
        (n, i) for n, size in (("a", 6), ("b", 6), ("c", 4)) for i in range(size)}
    for source in data:
        name = source.stem
        scores = {r["index"]: r["score"] for r in rows if r["dataset"] == name}
        kept = _kept_indices(source, out / source.name)
        assert kept == sorted(kept) and len(kept) == round(0.5 * len(scores))
        dropped = set(scores) - set(kept)
        assert min(scores[i] for i in kept) >= max(scores[i] for i in dropped)
        info = summary["datasets"][name]
        assert (info["n"], info["kept"]) == (len(scores), len(kept))
        assert info["threshold"] == min(scores[i] for i in kept)
        assert info["media_root"] == str(source.parent.resolve())
    assert json.loads((out / "c.json").read_text())[0]["messages"]        # still a JSON list of the records
    assert json.loads((out / "summary.json").read_text())["datasets"] == summary["datasets"]


def test_select_rounds_half_up_and_breaks_ties_by_position() -> None:
    d = P.SubDataset("t", Path("t.jsonl"), [None] * 5, [], "")           # samples only counted
    rows = {("t", i): {"score": s} for i, s in enumerate([1.0, 3.0, 1.0, 3.0, 1.0])}
    assert P.select(d, rows, 0.5) == [0, 1, 3]                            # 2.5 -> 3; of the 1.0s the first
    assert P.select(d, rows, 0.2) == [1]
    assert P.select(d, rows, 1.0) == [0, 1, 2, 3, 4]


def test_other_keep_reselects_without_scoring(full_run, tmp_path, monkeypatch, cached_models) -> None:
    data, out, _ = full_run
    shutil.copytree(out, tmp_path / "out")
    monkeypatch.setattr(P, "answer_logprobs", lambda *a: pytest.fail("nothing should be rescored"))
    summary = P.prune(job(data, tmp_path / "out", keep=0.25))
    assert cached_models == [] and summary["scored"] == 0 and summary["reused"] == 16
    assert {k: v["kept"] for k, v in summary["datasets"].items()} == {"a": 2, "b": 2, "c": 1}


# ---- resume --------------------------------------------------------------------------------------


def test_resume_scores_only_the_rest(full_run, tmp_path, monkeypatch) -> None:
    data, full, _ = full_run
    out = tmp_path / "out"
    shutil.copytree(full, out)
    lines = (out / "scores.jsonl").read_text().splitlines(keepends=True)
    (out / "scores.jsonl").write_text("".join(lines[:5]) + lines[5][:20])          # killed mid-write
    for name in ("a.jsonl", "b.jsonl", "c.json", "summary.json", "scores.png"):
        (out / name).unlink()
    scored: list[int] = []
    real = P.answer_logprobs
    monkeypatch.setattr(P, "answer_logprobs",
                        lambda model, prompts: scored.append(len(prompts)) or real(model, prompts))
    summary = P.prune(job(data, out))
    assert sum(scored) == 2 * 11 and (summary["scored"], summary["reused"]) == (11, 5)  # two models, 11 left
    for source in data:
        assert (out / source.name).read_bytes() == (full / source.name).read_bytes()
    again, before = rows_of(out), rows_of(full)
    assert [(r["dataset"], r["index"]) for r in again] == [(r["dataset"], r["index"]) for r in before]
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in before], abs=1e-4)
    assert (out / "scores.png").stat().st_size > 0


def test_resume_with_other_settings_is_refused(full_run, tmp_path) -> None:
    data, full, _ = full_run
    shutil.copytree(full, tmp_path / "out")
    with pytest.raises(ConfigError, match="normalize: 'mean' there, 'sum' now"):
        P.prune(job(data, tmp_path / "out", normalize="sum"))
    with pytest.raises(ConfigError, match="models.large.model"):
        P.prune(job(data, tmp_path / "out", large=str(CHECKPOINTS / "nvila")))
    with pytest.raises(ConfigError, match="scorer"):
        P.prune(job(data, tmp_path / "out", scorer="large-loss", small=None))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no prune_config.json"):
        P.prune(job(data, tmp_path / "busy"))


# ---- scorers -------------------------------------------------------------------------------------


def test_every_scorer_keeps_what_it_says() -> None:
    lp = {"small": -1.0, "large": -3.0}
    assert P.SCORERS["deltaloss"].combine(lp, 0.5) == -2.0          # the small model does better: distracting
    assert P.SCORERS["small-loss"].combine(lp, 0.5) == 1.0          # loss: higher is harder
    assert P.SCORERS["large-loss"].combine(lp, 0.5) == 3.0
    assert P.SCORERS["random"].combine({}, 0.25) == 0.25
    assert {k: v.needs for k, v in P.SCORERS.items()} == {
        "deltaloss": ("small", "large"), "small-loss": ("small",), "large-loss": ("large",), "random": ()}


def test_unknown_scorer_names_the_known_ones(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown scorer 'delta'; known: deltaloss, large-loss, random, small-loss"):
        P.prune(job(write_data(tmp_path / "d"), tmp_path / "out", scorer="delta"))


def test_random_needs_no_model_and_is_seeded(tmp_path, cached_models) -> None:
    data = write_data(tmp_path / "d")

    def kept(seed: int, name: str) -> dict[str, list[int]]:
        P.prune(job(data, tmp_path / name, scorer="random", small=None, large=None, seed=seed))
        return {s.name: _kept_indices(s, tmp_path / name / s.name) for s in data}

    first = kept(0, "r0")
    assert cached_models == []
    assert all(r["logp_small"] is None and r["logp_large"] is None for r in rows_of(tmp_path / "r0"))
    assert kept(0, "r0-again") == first and kept(1, "r1") != first


def test_small_loss_needs_and_loads_only_the_small_model(tmp_path, cached_models) -> None:
    data = write_data(tmp_path / "d")[2:]
    with pytest.raises(ConfigError, match="scorer small-loss needs --small"):
        P.prune(job(data, tmp_path / "x", scorer="small-loss", small=None, large=None))
    with pytest.raises(ConfigError, match="does not use a large model; drop --large"):
        P.prune(job(data, tmp_path / "x", scorer="small-loss"))
    assert not (tmp_path / "x").exists()
    P.prune(job(data, tmp_path / "out", scorer="small-loss", large=None))
    assert cached_models == [("small",)]
    rows = rows_of(tmp_path / "out")
    assert all(r["score"] == -r["logp_small"] and r["logp_large"] is None for r in rows)
    kept = _kept_indices(data[0], tmp_path / "out" / "c.json")
    assert sorted(kept) == sorted(sorted(range(4), key=lambda i: rows[i]["logp_small"])[:2])   # the hardest


# ---- the command line ----------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.undo()                                       # real model loading, as a user runs it
    data = write_data(tmp_path / "d")[1:]
    out = tmp_path / "out"
    rc = main(["prune", "--data", str(data[0]), "--data", str(data[1]), "--small", str(SMALL), "--large", str(LARGE),
               "--keep", "0.5", "--out", str(out), "--dtype", "float32", "--device", "cpu", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scorer"] == "deltaloss" and summary["normalize"] == "mean" and summary["scored"] == 10
    assert {k: v["kept"] for k, v in summary["datasets"].items()} == {"b": 3, "c": 2}
    for name in ("b.jsonl", "c.json", "scores.jsonl", "summary.json", "prune_config.json"):
        assert (out / name).is_file(), name
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "scores.png").stat().st_size > 1000
    assert math.isfinite(json.loads((out / "summary.json").read_text())["datasets"]["b"]["threshold"])


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl", "--keep", "0.5"], "dataset file missing.jsonl does not exist"),
    (["--keep", "0"], "--keep is the fraction of each file to keep, in (0, 1]; got 0.0"),
    (["--keep", "1.5"], "--keep is the fraction of each file to keep, in (0, 1]; got 1.5"),
])
def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message) -> None:
    data = write_data(tmp_path / "d")
    given = args if "--data" in args else ["--data", str(data[0]), *args]
    rc = main(["prune", *given, "--scorer", "random", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_independent_turns_score_each_question_alone(tmp_path) -> None:
    """--independent-turns: a multi-question record's summed log-probability is that of its single-turn
    prompts scored one by one (nvila.train.branches), and the setting is part of the resume config."""
    from nvila.train.branches import single_turns
    from nvila.train.data import load_dataset

    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(MEDIA / "hopper_64x64.png", root)
    rec = {"id": "multi", "image": "hopper_64x64.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A face."},
        {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Grey."},
        {"from": "human", "value": "Is it a cat?"}, {"from": "gpt", "value": "No."}]}
    (root / "m.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "id": "again"}) + "\n")
    P.prune(job([root / "m.jsonl"], tmp_path / "out", normalize="sum", independent_turns=True))
    row = rows_of(tmp_path / "out")[0]
    messages = load_dataset(root / "m.jsonl")[0].messages
    for role, path in (("small", SMALL), ("large", LARGE)):
        pipe = fixture_pipeline(path.name)
        parts = [direct_logprob(pipe, turn) for turn in single_turns(messages)]
        assert row[f"n_tokens_{role}"] == sum(n for _, n in parts)
        assert math.isclose(row[f"logp_{role}"], sum(lp for lp, _ in parts), rel_tol=1e-4, abs_tol=1e-3)
    with pytest.raises(ConfigError, match="independent_turns"):
        P.prune(job([root / "m.jsonl"], tmp_path / "out", normalize="sum"))
