"""`nvila bench` plumbing on a fixture checkpoint (its speed is what the benchmark measures, not tested)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHECKPOINTS, MEDIA, OUTPUTS

from nvila.base.errors import NvilaError
from nvila.bench.report import ratios
from nvila.bench.timing import SETUPS, BenchResult
from nvila.cli.main import main


def test_bench_cli_json_and_plots(tmp_path, capsys) -> None:
    ref = json.loads((OUTPUTS / "nvila" / "img_china_800x600.json").read_text())
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(CHECKPOINTS / "nvila"), "--media", str(MEDIA / "china_800x600.png"),
               "--text", ref["inputs"]["prompt"], "--compare", "fp32,fast", "--runs", "2", "--warmup", "0",
               "--new-tokens", "2",
               "--json", str(out), "--plot", str(tmp_path / "plots")])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("ttft_s", "vision_s", "prefill_s", "decode_tokens_per_s", "peak_rss_bytes", "num_visual_tokens"):
        assert key in data and data[key] > 0
    assert data["num_visual_tokens"] == ref["num_visual_tokens"]
    assert data["prompt_length"] == ref["prefill"]["seq_len"]
    assert set(data["setups"]) == {"fp32", "fast"}
    assert set(data["ratios"]["fast_vs_fp32"]) >= {"ttft_s", "decode_tokens_per_s"}
    assert data["read_bandwidth_bytes_per_s"] > 1e8
    assert data["ttft_s"] >= data["prefill_s"] + data["vision_s"]
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"stages.png", "decode.png"}
    assert "time to first token" in capsys.readouterr().out


def test_bench_video_sweep(tmp_path) -> None:
    rc = main(["bench", "--model", str(CHECKPOINTS / "nvila-video"), "--frames", "8", "--runs", "1",
               "--warmup", "0", "--new-tokens", "1", "--sweep", "8,16", "--plot", str(tmp_path),
               "--json", str(tmp_path / "b.json")])
    assert rc == 0
    assert json.loads((tmp_path / "b.json").read_text())["num_visual_tokens"] == 50  # 8 frames -> 1 pooled x 50
    assert (tmp_path / "latency_vs_frames.png").is_file()


def test_ratios_direction() -> None:
    base = BenchResult("a", 0, 2.0, 0, 1.0, 4.0, 2.0, 0, 100, 1, 1, 1, 0)
    fast = BenchResult("b", 0, 1.0, 0, 0.5, 2.0, 6.0, 0, 50, 1, 1, 1, 0)
    r = ratios(base, fast)
    assert r["ttft_s"] == 2.0 and r["decode_tokens_per_s"] == 3.0 and r["peak_rss_bytes"] == 2.0


def test_unknown_setup_is_an_error(capsys) -> None:
    assert {"fp32", "bf16", "fast"} <= set(SETUPS)
    assert main(["bench", "--model", str(CHECKPOINTS / "nvila"), "--compare", "fp32,turbo"]) == 2
    assert "unknown setup" in capsys.readouterr().err
    with pytest.raises(NvilaError, match="runs >= 1"):
        from nvila.bench.timing import bench_setup

        bench_setup("x", lambda: None, "hi", runs=0)


def test_bench_kernels_times_every_path_and_records_the_machine(tmp_path, monkeypatch) -> None:
    from nvila.bench import kernels

    monkeypatch.setattr(kernels, "SHAPES", ((1, 128, 64, "decode"), (24, 128, 40, "prefill")))
    monkeypatch.setattr(kernels, "MIN_TIME_S", 0.0)
    assert main(["bench-kernels", "--runs", "2", "--json", str(tmp_path / "k.json")]) == 0
    data = json.loads((tmp_path / "k.json").read_text())
    one, many = data["kernels"]
    assert set(one["ms"]) == {p.name for p in kernels.PATHS}                # every path runs one row
    assert "bf16 torch.mv" not in many["ms"]                                # a matrix-vector op: one row only
    assert "W4A16 fused g128, bf16 x" not in many["ms"]                     # 40 outputs: not a multiple of 16
    assert "W4A16 fused g128, fp32 x" not in many["ms"]
    assert all(v > 0 for row in data["kernels"] for v in row["ms"].values())
    for row in data["kernels"]:                                             # 2 * rows * in * out / time
        assert row["gflops"].keys() == row["ms"].keys()
        name = "fp32 F.linear"
        assert row["gflops"][name] == pytest.approx(2 * row["rows"] * row["in"] * row["out"] / row["ms"][name] / 1e6)
    assert set(kernels.BACKENDS) <= {p.name for p in kernels.PATHS}
    assert data["provenance"]["cpu"]["name"] and "git_commit" in data["provenance"]


def test_kernel_timing_repeats_fast_calls_for_a_minimum_time(monkeypatch) -> None:
    from nvila.bench import kernels

    calls = []
    monkeypatch.setattr(kernels, "MIN_TIME_S", 0.0)
    kernels._median_ms(lambda: calls.append(1), runs=3, budget_s=10.0)
    assert len(calls) == 1 + 3                                              # one warm-up, then `runs`
    calls.clear()
    monkeypatch.setattr(kernels, "MIN_TIME_S", 60.0)
    monkeypatch.setattr(kernels, "MAX_CALLS", 40)
    kernels._median_ms(lambda: calls.append(1), runs=3, budget_s=10.0)
    assert len(calls) == 1 + 40                                             # a fast call: up to MAX_CALLS
    calls.clear()
    kernels._median_ms(lambda: calls.append(time.sleep(0.02)), runs=50, budget_s=0.1)
    assert 1 + 2 <= len(calls) < 1 + 50                                     # the budget stops a slow path


def test_bench_ab_times_both_versions_in_turns_and_removes_its_worktree(tmp_path) -> None:
    """scripts/bench_ab.py (make bench-ab): the base commit runs from a temporary worktree, the working tree as
    installed; here both are HEAD, on a fixture checkpoint."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ab.json"
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_ab.py"), "--base", "HEAD", "--model",
                           str(CHECKPOINTS / "nvila"), "--compare", "fp32", "--rounds", "2", "--new-tokens", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert set(data["setups"]) == {"fp32"} and data["provenance"]["base"] == "HEAD"
    for row in data["setups"]["fp32"].values():
        assert len(row["values"]["base"]) == len(row["values"]["now"]) == 2
        assert row["now_over_base"] == pytest.approx(row["median"]["now"] / row["median"]["base"])
    worktrees = subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True, text=True).stdout
    assert "nvila-ab-" not in worktrees


def test_bench_ab_names_an_unknown_base_commit() -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_ab.py"), "--base", "no-such-commit",
                           "--model", str(CHECKPOINTS / "nvila")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "'no-such-commit' is not a commit" in done.stderr
