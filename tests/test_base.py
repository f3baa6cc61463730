"""The base layer: atomic folders, JSON files, hardware rules per CPU class (faked feature sets), provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from nvila.base import hardware
from nvila.base.errors import CheckpointError, ConfigError, NvilaError
from nvila.base.files import atomic_dir, read_json, write_json
from nvila.base.provenance import provenance


def test_atomic_dir_appears_only_when_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("writer failed")
    assert not out.exists() and list(tmp_path.iterdir()) == []            # nothing left, not even the temp
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(NvilaError, match="not empty"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(NvilaError, match="is a file"):
        with atomic_dir(tmp_path / "file"):
            pass


def test_json_files(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sub" / "a.json", {"x": [1, 2]})
    assert path.read_text() == '{\n  "x": [\n    1,\n    2\n  ]\n}\n' and read_json(path) == {"x": [1, 2]}
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CheckpointError, match="does not hold a JSON object"):
        read_json(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="cannot read"):
        read_json(tmp_path / "bad.json", error=ConfigError)


CLASSES = {"amx": ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"),
           "avx512_bf16": ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"),
           "avx2": ("avx2", "fma"), "arm": ("fp", "asimd", "sve"), "generic": ("sse4_2",)}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_rules_per_cpu_class(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(CLASSES[name]))
    native_bf16 = name in ("amx", "avx512_bf16")
    assert hardware.cpu_class() == name
    assert hardware.resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert hardware.decode_kernel_wins() is (name == "amx")
    int8_dot = name in ("amx", "avx512_bf16")
    # W8A8: oneDNN's int8 GEMM with VNNI/AMX, FBGEMM's int8 linear on AVX2 (torch._int_mm has no fast path
    # there), the dequantized reference elsewhere; the 4-bit/8-bit weight-only ops take bf16 rows on AVX2
    assert hardware.cpu_int8_gemm() == ("int_mm" if int8_dot else "fbgemm" if name == "avx2" else "reference")
    assert hardware.cpu_max_rows("w8a8", torch.float32) == (hardware.CPU_INT8_DOT_MAX_ROWS if int8_dot else 0)
    assert hardware.cpu_rules().weight_only_bf16_rows == (1 if name == "avx2" else 0)
    assert hardware.cpu_rules().quant_llm == ("w8a8" if name == "avx2" else "w4a16")
    assert hardware.cpu_rules().int8_gemm in hardware.INT8_GEMMS
    assert hardware.cpu_max_rows("w4a16", torch.bfloat16) == (16 if native_bf16 else 1)
    assert hardware.cpu_max_rows("w4a16", torch.float32) == 1


def test_dtype_and_device_choices() -> None:
    assert hardware.resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert hardware.resolve_dtype(torch.float16, torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError, match="not a floating-point"):
        hardware.resolve_dtype(torch.int8, torch.device("cpu"))
    with pytest.raises(ConfigError, match="int3"):
        hardware.resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(ConfigError, match="not a valid device"):
        hardware.resolve_device("gpu7")


def test_provenance_names_code_machine_and_inputs() -> None:
    record = provenance(model="m", adapter=Path("a"))
    assert record["model"] == "m" and record["adapter"] == "a"
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert set(record["cpu"]) == {"name", "flags", "class", "rules", "cores", "torch_threads", "emulated",
                                  "torch_capability"}
    assert record["cpu"]["class"] == hardware.cpu_class()
    assert set(record["cpu"]["flags"]) <= hardware.cpu_flags()
    json.dumps(record)                                                    # JSON-able as is


def test_avx2_emulation_drops_flags_and_needs_capped_kernels(monkeypatch) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", hardware.cpu_flags.__wrapped__)      # uncached: reads the env
    real = hardware.cpu_flags()
    monkeypatch.setenv(hardware.EMULATE_ENV, "avx2")
    with pytest.raises(ConfigError, match="ATEN_CPU_CAPABILITY"):
        hardware.cpu_flags()
    for k, v in hardware.EMULATION_CAPS["avx2"].items():
        monkeypatch.setenv(k, v)
    flags = hardware.cpu_flags()
    assert flags <= real and not any(f.startswith(("avx512", "amx", "avx_vnni")) for f in flags)
    if {"avx2", "fma"} <= real:
        assert hardware.cpu_class() == "avx2" and hardware.emulated_cpu() == "avx2"
    monkeypatch.setenv(hardware.EMULATE_ENV, "avx1")
    with pytest.raises(ConfigError, match="only"):
        hardware.emulated_cpu()


def test_avx2_emulation_caps_torch_kernels(tmp_path) -> None:
    """In a fresh process with the caps, torch's ATen dispatch runs AVX2 code and provenance says so."""
    import subprocess
    import sys

    env = {**os.environ, **hardware.EMULATION_CAPS["avx2"], hardware.EMULATE_ENV: "avx2"}
    code = ("import json, torch; from nvila.base.provenance import provenance; "
            "c = provenance()['cpu']; print(json.dumps([c['class'], c['emulated'], c['torch_capability']]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    cls, emulated, capability = json.loads(out.strip().splitlines()[-1])
    assert emulated == "avx2" and capability in ("AVX2", "DEFAULT")
    assert cls in ("avx2", "generic")
