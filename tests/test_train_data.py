"""Training data: LLaVA/OpenAI records -> messages -> token ids with loss only on assistant answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import MEDIA, fixture_pipeline

from nvila.base.errors import MediaError, NvilaError, PromptError
from nvila.processing.processor import IGNORE_INDEX
from nvila.train.data import load_dataset


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    shutil.copy(MEDIA / "hopper_64x64.png", tmp_path / "img" / "a.png")
    shutil.copy(MEDIA / "china_palette_330x200.png", tmp_path / "img" / "b.png")
    return tmp_path


def _write(path: Path, records: list[dict], jsonl: bool = False) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def _supervised_text(pipe, prompt) -> str:
    return pipe.tokenizer.decode([t for t in prompt.labels if t != IGNORE_INDEX])


def test_llava_record_with_marker_multi_turn(data_dir: Path) -> None:
    path = _write(data_dir / "d.json", [{"id": "x", "image": "img/a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A face."},
        {"from": "human", "value": "Colours?"}, {"from": "gpt", "value": "Grey."}]}])
    [sample] = load_dataset(path)
    assert sample.id == "x" and sample.dataset == "d"
    first = sample.messages[0]["content"]
    assert first[0] == {"type": "image", "image": str(data_dir / "img" / "a.png")}
    assert first[1] == {"type": "text", "text": "What is shown?"}
    pipe = fixture_pipeline("nvila-lite")
    prompt = pipe.processor(sample.messages, training=True)
    assert len(prompt.labels) == len(prompt.input_ids)
    # exactly the answers (and their end token) carry loss, in order
    assert _supervised_text(pipe, prompt) == "A face.<|im_end|>Grey.<|im_end|>"
    # the same conversation without the last answer is the inference prompt of the last turn
    infer = pipe.prepare(sample.messages[:-1])
    assert prompt.input_ids[: len(infer.input_ids)] == infer.input_ids


def test_media_without_markers_go_first_and_jsonl(data_dir: Path) -> None:
    path = _write(data_dir / "d.jsonl", [{"images": ["img/a.png", "img/b.png"], "conversations": [
        {"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Different."}]}], jsonl=True)
    [sample] = load_dataset(path)
    kinds = [p["type"] for p in sample.messages[0]["content"]]
    assert kinds == ["image", "image", "text"]
    prompt = fixture_pipeline("nvila").processor(sample.messages, training=True)
    assert len(prompt.media) == 2


def test_openai_form_and_media_root(data_dir: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "o.json", [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A face."}]}])
    [sample] = load_dataset(path, media_root=data_dir / "img")
    assert sample.messages[1]["content"][0]["image"] == str(data_dir / "img" / "a.png")
    pipe = fixture_pipeline("nvila-video")
    prompt = pipe.processor(sample.messages, training=True)
    assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert _supervised_text(pipe, prompt) == "A face.<|im_end|>"


@pytest.mark.parametrize("record, error, message", [
    ({"image": "img/a.png", "conversations": [{"from": "human", "value": "<image><image>x"},
                                              {"from": "gpt", "value": "y"}]}, PromptError, "2 <image>/<video> markers"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, PromptError, "needs 'from'"),
    ({"conversations": []}, PromptError, "non-empty 'conversations'"),
])
def test_bad_records(data_dir: Path, record: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        load_dataset(_write(data_dir / "bad.json", [record]))
    assert "record 0" in str(info.value)


def test_bad_files_and_training_rules(data_dir: Path) -> None:
    with pytest.raises(NvilaError, match="does not exist"):
        load_dataset(data_dir / "missing.json")
    (data_dir / "broken.jsonl").write_text('{"a": 1}\n{oops')
    with pytest.raises(NvilaError, match="not valid JSON lines"):
        load_dataset(data_dir / "broken.jsonl")
    [sample] = load_dataset(_write(data_dir / "m.json", [{"image": "img/nope.png", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    pipe = fixture_pipeline("nvila")
    with pytest.raises(MediaError, match="does not exist"):
        pipe.processor(sample.messages, training=True)
    with pytest.raises(PromptError, match="must end with an assistant"):
        pipe.processor([{"role": "user", "content": "hi"}], training=True)
