"""A virtual environment without nvila, on transformers 4.57, for the "-hf" processor's compatibility test.

Two roles in one file:
* imported by tests/test_hf_processor.py: :func:`processor_venv` creates the environment once (cached under
  ``~/.cache/nvila/hf-processor-venv-<hash of the requirements>``) and :func:`run_cases` runs this file in it;
* run as a script in that environment (``python hf_processor_venv.py CASES.json OUT_DIR``): it loads each case's
  folder with ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``, renders and processes the
  case, and writes what came out. Only the standard library, numpy and transformers are imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# torch resolves to the local CPU wheel here; the 4.5x line of transformers is the one under test.
REQUIREMENTS = ("torch==2.13.0", "numpy", "pillow", "transformers==4.57.*")
STAMP = ".nvila-ready"
# pip's messages when the package index cannot be reached (the only reason to skip instead of failing).
_OFFLINE = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                      r"Network is unreachable|No matching distribution found|Could not find a version")


class IndexUnreachable(RuntimeError):
    """pip could not reach the package index while creating the environment."""


def venv_dir() -> Path:
    key = "\n".join((*REQUIREMENTS, f"python{sys.version_info[0]}.{sys.version_info[1]}"))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "nvila" / f"hf-processor-venv-{digest}"


def processor_venv() -> Path:
    """The environment's python, created on first use (about half a minute from a local index)."""
    import fcntl
    import shutil

    root = venv_dir()
    python = root / "bin" / "python"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)              # one creator at a time; the others wait for it
        if (root / STAMP).exists():
            return python
        shutil.rmtree(root, ignore_errors=True)         # a half-made environment from an interrupted run
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              *REQUIREMENTS], check=False, capture_output=True, text=True)
        if pip.returncode:
            shutil.rmtree(root, ignore_errors=True)
            tail = pip.stderr[-2000:]
            if _OFFLINE.search(pip.stderr):
                raise IndexUnreachable(tail)
            raise RuntimeError(f"pip install {' '.join(REQUIREMENTS)} failed:\n{tail}")
        (root / STAMP).write_text("\n".join(REQUIREMENTS) + "\n")
    return python


def run_cases(python: Path, cases: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Run this file under ``python`` on ``cases``; returns its report (outputs are under ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(out / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(python), str(Path(__file__).resolve()), str(out / "cases.json"), str(out)],
                          check=False, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
                          timeout=300)
    if done.returncode:
        raise RuntimeError(f"the transformers 4.57 run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads((out / "report.json").read_text())


# ---- the script side (runs in the other environment) ------------------------------------------------------
def _main(cases_file: str, out_dir: str) -> None:
    import importlib.util

    import numpy as np
    import transformers
    from transformers import AutoProcessor

    cases = json.loads(Path(cases_file).read_text())
    report: dict[str, Any] = {"transformers": transformers.__version__,
                              "nvila_importable": importlib.util.find_spec("nvila") is not None, "cases": {}}
    processors: dict[str, Any] = {}
    for case in cases:
        folder = case["folder"]
        if folder not in processors:
            processors[folder] = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        proc = processors[folder]
        tok = proc.tokenizer
        text = proc.apply_chat_template(case["messages"], add_generation_prompt=True)
        videos = [list(np.load(v)["frames"]) if v.endswith(".npz") else v for v in case["videos"]] or None
        out = proc(text=text, images=case["images"] or None, videos=videos, **case["kwargs"])
        arrays = {k: out[k].numpy() for k in ("input_ids", "pixel_values", "pixel_values_videos", "video_num_frames")
                  if k in out}
        np.savez(Path(out_dir) / f"{case['name']}.npz", **arrays)
        report["cases"][case["name"]] = {
            "text": text, "block_sizes": out.get("block_sizes"), "class": type(proc).__name__,
            "tokens": [tok.image_token, tok.image_token_id, tok.video_token, tok.video_token_id]}
    (Path(out_dir) / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    _main(*sys.argv[1:])
