"""Time tokens (NVILA-8B-Video): answers' <tK> written as seconds into the clip, K * duration / (N - 1).

A tiny checkpoint gets ten time tokens (the nvila-video fixture plus <t0>..<t9> in its tokenizer and
``num_time_tokens: 10`` in its config) and an LM head rewired so that every greedy token is <t2> or <t7>;
the clip is the fixture AVI (24 frames at 12 fps: 2.0 s by its container, and as a frame folder at 12 fps).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS, MEDIA

import nvila
from nvila.processing.timestamps import Segment, TimeTokens

N = 10
CLIP, FRAMES, DURATION = MEDIA / "clip_24f_12fps_176x144.avi", MEDIA / "clip_frames_24", 2.0


def seconds(k: int, duration: float = DURATION) -> float:
    return round(min(k, N - 1) * duration / (N - 1), 2)


def test_rendering_rule() -> None:
    tt = TimeTokens(N)
    text, segments = tt.render("from <t0> to <t9>, then <t4> to <t12>", 90.0)
    assert text == "from 0s to 90s, then 40s to 90s"          # 4 * 90 / 9; beyond the last token: the duration
    assert segments == [Segment(0.0, 90.0), Segment(40.0, 90.0)]
    assert TimeTokens(N).render("<t1> alone", 10.0) == ("1.11s alone", [])
    assert TimeTokens(3, "[T{t}]").render("[T1] <t1>", 4.0)[0] == "2s <t1>"


@pytest.fixture(scope="module")
def timed(tmp_path_factory) -> nvila.Pipeline:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("timed") / "nvila-video-t"
    shutil.copytree(CHECKPOINTS / "nvila-video", root)
    tok = AutoTokenizer.from_pretrained(root / "llm")
    tok.add_tokens([f"<t{k}>" for k in range(N)])
    tok.save_pretrained(root / "llm")
    config = json.loads((root / "config.json").read_text())
    config.update(num_time_tokens=N, time_token_ids=tok.convert_tokens_to_ids([f"<t{k}>" for k in range(N)]))
    (root / "config.json").write_text(json.dumps(config))
    pipe = nvila.load(root, dtype="float32")
    llm = pipe.model.llm
    ids = tok.convert_tokens_to_ids(["<t2>", "<t7>"])
    with torch.no_grad():                  # logits = head @ h with h = (x0 / rms(x), 0, ...): <t2> or <t7> wins
        llm.model.norm.weight.zero_()
        llm.model.norm.weight[0] = 1.0
        head = llm.get_output_embeddings().weight
        head.zero_()
        head[ids[0], 0], head[ids[1], 0] = 1.0, -1.0
    return pipe


def _ask(video: str, **part: object) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video, **part},
                                         {"type": "text", "text": "When does the shape move?"}]}]


@pytest.mark.parametrize("source", ["file", "frame folder"])
def test_answers_get_seconds_and_segments(timed: nvila.Pipeline, source: str) -> None:
    messages = _ask(str(CLIP)) if source == "file" else _ask(str(FRAMES), frame_rate=12)
    out = timed.generate(messages, max_new_tokens=6)
    ks = [int(timed.tokenizer.convert_ids_to_tokens(i)[2:-1]) for i in out.output_token_ids]
    assert len(ks) == 6 and set(ks) <= {2, 7}
    assert re.findall(r"<t(\d+)>", out.raw_text) == [str(k) for k in ks]
    assert re.findall(r"[\d.]+s", out.text) == [f"{seconds(k):g}s" for k in ks]
    assert out.segments == [Segment(seconds(a), seconds(b)) for a, b in zip(ks[0::2], ks[1::2])]
    streamed = "".join(timed.stream(messages, max_new_tokens=6))
    assert streamed == out.text
    raw = timed.generate(messages, max_new_tokens=6, time_tokens="raw")
    assert raw.text == out.raw_text and raw.segments == [] and raw.raw_text is None


def test_no_duration_no_rendering(timed: nvila.Pipeline) -> None:
    out = timed.generate(_ask(str(FRAMES)), max_new_tokens=4)        # a frame folder without its frame rate
    assert "<t" in out.text and out.raw_text is None and out.segments == []
    with pytest.raises(nvila.ConfigError, match="time_tokens must be one of"):
        timed.generate(_ask(str(CLIP)), time_tokens="minutes")


def test_config_declaring_missing_tokens_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(CHECKPOINTS / "nvila-video", root)
    config = json.loads((root / "config.json").read_text())
    config["num_time_tokens"] = 4
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(nvila.CheckpointError, match="declares 4 time tokens but the tokenizer lacks"):
        nvila.load(root, dtype="float32")


def test_server_writes_seconds_and_segments(timed: nvila.Pipeline) -> None:
    import base64

    import httpx
    import openai

    from nvila.serve.app import ServerSettings, create_app
    from nvila.serve.loadtest import free_port, start_server

    port = free_port()
    server = start_server(create_app(timed, ServerSettings("timed")), port)
    try:
        url = "data:video/x-msvideo;base64," + base64.b64encode(CLIP.read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                 {"type": "text", "text": "When does the shape move?"}]}]
        want = timed.generate(_ask(str(CLIP)), max_new_tokens=6)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        reply = client.chat.completions.create(model="timed", messages=messages, max_tokens=6, temperature=0)
        assert reply.choices[0].message.content == want.text
        assert reply.choices[0].model_extra["segments"] == [{"start": s.start, "end": s.end} for s in want.segments]
        chunks = client.chat.completions.create(model="timed", messages=messages, max_tokens=6, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        raw = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                         json={"model": "timed", "messages": messages, "max_tokens": 6, "time_tokens": "raw"}).json()
        assert raw["choices"][0]["message"]["content"] == want.raw_text and "segments" not in raw["choices"][0]
    finally:
        server.should_exit = True
