"""The `nvila` command line: infer (--json, --stream), chat, and clean errors (no tracebacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHECKPOINTS, MEDIA, OUTPUTS

from nvila.cli.main import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvila", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_registry_lists_the_verbs() -> None:
    assert {"infer", "chat"} <= set(COMMANDS)


def test_infer_json_matches_reference(capsys) -> None:
    ref = json.loads((OUTPUTS / "nvila" / "two_images.json").read_text())
    rc = main(["infer", "--model", str(CHECKPOINTS / "nvila"), "--dtype", "float32",
               "--media", str(MEDIA / "flower_300x900.png"), str(MEDIA / "china_1000x250.png"),
               "--text", "What is different between these two pictures?", "--max-new-tokens", "16", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == ref["prompt"]["input_ids"]
    assert out["num_media_embeddings"] == ref["num_visual_tokens"]
    assert out["output_token_ids"] == ref["generation"]["output_ids"]
    assert out["text"] == ref["generation"]["response"]


def test_infer_video_folder_stream(capsys) -> None:
    ref = json.loads((OUTPUTS / "nvila-video" / "video_frames_dir.json").read_text())
    rc = main(["infer", "--model", str(CHECKPOINTS / "nvila-video"), "--dtype", "float32",
               "--media", str(MEDIA / "clip_frames_24"),
               "--text", "Describe the motion in this clip.", "--max-new-tokens", "16", "--stream"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == ref["generation"]["response"]


def test_chat_repl_multi_turn_with_media() -> None:
    script = "\n".join([
        f"/image {MEDIA / 'hopper_64x64.png'}",
        "What is shown in this picture?",
        "/image /definitely/missing.png",
        "And now?",
        "/exit",
    ])
    res = run_cli("chat", "--model", str(CHECKPOINTS / "nvila-lite"), "--max-new-tokens", "4", stdin=script)
    assert res.returncode == 0, res.stderr
    assert "image attached" in res.stderr
    assert "does not exist" in res.stderr          # the bad path is reported, the session goes on
    assert len([ln for ln in res.stdout.splitlines() if ln.strip()]) == 2  # two answers
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["infer", "--model", "/no/such/folder", "--text", "hi"], "does not exist"),
        (["infer", "--model", str(CHECKPOINTS / "nvila"), "--media", str(ROOT / "pyproject.toml"), "--text", "hi"],
         "unsupported extension"),
        (["infer", "--model", str(CHECKPOINTS / "nvila"), "--media", str(MEDIA / "missing.png"), "--text", "hi"],
         "does not exist"),
        (["infer", "--model", str(CHECKPOINTS / "nvila"), "--text", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["infer", "--model", str(CHECKPOINTS / "nvila"), "--text", "hi", "--dtype", "int3"], "dtype"),
        (["infer", "--model", str(CHECKPOINTS / "nvila"), "--text", "hi", "--json", "--stream"], "cannot be combined"),
    ],
)
def test_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ")
    assert message in res.stderr
    assert "Traceback" not in res.stderr

