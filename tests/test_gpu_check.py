"""scripts/gpu_check.py (make gpu-check) runs on a machine without CUDA: the CPU-checkable stages run and pass,
the CUDA ones are skipped with the reason, and the report is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run `make gpu-check` itself")
def test_gpu_check_on_cpu_runs_what_it_can_and_says_what_it_skipped(tmp_path: Path, capsys) -> None:
    gpu_check = load_script()
    out = tmp_path / "report.json"
    assert gpu_check.main(["--quick", "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    assert report["device"] == "cpu" and "git_commit" in report["provenance"]
    assert stages["parity_fp32"]["status"] == "ok" and stages["parity_fp32"]["cases"] == 3
    assert stages["parity_fp32"]["max_logit_error"] < 1e-4
    assert stages["bf16"]["status"] == "ok" and stages["bf16"]["max_logit_error"] < gpu_check.BF16_LOGIT_BOUND
    for name in ("quant_kernels", "bench", "train", "sglang"):
        assert stages[name] == {"status": "skipped", "reason": "needs CUDA (no GPU visible to torch)",
                                "seconds": stages[name]["seconds"]}
    assert "skipped" in capsys.readouterr().out


def test_a_failing_stage_fails_the_run_and_the_others_still_run(tmp_path: Path, monkeypatch) -> None:
    gpu_check = load_script()

    def broken(args):
        raise RuntimeError("kernel mismatch")

    monkeypatch.setitem(gpu_check.RUNNERS, "parity_fp32", broken)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--quick", "--stages", "parity_fp32,quant_kernels", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")]) == 1
    stages = json.loads(out.read_text())["stages"]
    assert stages["parity_fp32"]["status"] == "failed" and "kernel mismatch" in stages["parity_fp32"]["reason"]
    assert set(stages) == {"parity_fp32", "quant_kernels"}


def test_unknown_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        load_script().main(["--stages", "parity,nope", "--work-dir", str(tmp_path)])
