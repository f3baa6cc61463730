"""The "-hf" folder's processor (nvila/hf_remote/processing_nvila.py) reproduces nvila's own processing.

For every fixture checkpoint the processor files are written with ``processor_files`` and loaded back with
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``; each case's expanded ids, pixels and
``block_sizes`` must equal what nvila's ``Pipeline.prepare`` gives, the expansion being computed here from
nvila's Prompt, plans and config. The same cases run once more on transformers 4.57 in a separate environment
without nvila (tests/hf_processor_venv.py); this one is transformers 5.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import MEDIA, fixture_pipeline
from hf_processor_venv import IndexUnreachable, processor_venv, run_cases

from nvila.checkpoint.save import tokenizer_files
from nvila.formats.hf import HF_TYPES
from nvila.formats.hf_processor import hf_chat_template, processor_files, processor_settings
from nvila.formats.tokens import IMAGE_TOKEN, VIDEO_TOKEN
from nvila.formats.plans import Prompt
from nvila.processing import chat
from nvila.processing.media import load_video

PNGS = sorted(p.name for p in MEDIA.glob("*.png"))
AVI = MEDIA / "clip_24f_12fps_176x144.avi"
FRAME_FOLDER = MEDIA / "clip_frames_24"
LITE = "nvila-lite"


def _image(name: str) -> dict[str, str]:
    return {"type": "image", "image": str(MEDIA / name)}


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _cases() -> list[tuple[str, str, list[dict[str, Any]], str | None]]:
    """(variant, name, user parts, video: "avi" | "folder" | None)."""
    cases = []
    for variant in ("nvila", LITE, "nvila-video"):
        for png in PNGS:
            cases.append((variant, f"single-{png[:-4]}", [_image(png), _text("Describe the image.")], None))
        cases += [
            (variant, "image-last", [_text("What is this? "), _image("china_1000x250.png")], None),
            (variant, "typed-placeholders", [_text(f" {IMAGE_TOKEN}Look{VIDEO_TOKEN}: "), _image("flower_300x900.png"),
                                             _text("\n and tell.  ")], None),
            (variant, "two-images", [_image("china_800x600.png"), _text("Compare with"),
                                     _image("hopper_277x277.png")], None),
            (variant, "text-only", [_text("What is the capital of France?")], None),
            (variant, "video", [{"type": "video", "video": str(AVI)}, _text("What happens?")], "avi"),
        ]
    cases += [
        ("nvila", "image-and-video", [_image("hopper_gray_320x480.png"), {"type": "video", "video": str(AVI)},
                                      _text("Same scene?")], "avi"),
        ("nvila-video", "frame-folder", [{"type": "video", "video": str(FRAME_FOLDER)}, _text("Describe.")], "folder"),
    ]
    return cases


CASES = _cases()


def _messages(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """variant -> an "-hf" folder holding only the processor files."""
    out = {}
    for variant in ("nvila", LITE, "nvila-video"):
        pipe = fixture_pipeline(variant)
        folder = tmp_path_factory.mktemp(variant.replace("-", "_"))
        for name, data in processor_files(pipe.config, tokenizer_files(pipe.tokenizer), pipe.checkpoint.chat_template,
                                          lite=variant == LITE).items():
            (folder / name).write_bytes(data)
        out[variant] = folder
    return out


@pytest.fixture(scope="module")
def processors(folders: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoProcessor

    return {v: AutoProcessor.from_pretrained(f, trust_remote_code=True) for v, f in folders.items()}


@pytest.fixture(scope="module")
def clip_frames() -> list:
    total = load_video(AVI, num_frames=1).num_total_frames
    return load_video(AVI, num_frames=total).frames       # every frame, as nvila decodes them


# ---- what nvila says ---------------------------------------------------------------------------------------
def expected_ids(variant: str, prompt: Prompt) -> list[int]:
    """nvila's prompt ids with every placeholder replaced by its blocks: visual-token count x the media id +
    the end ids, counts taken from the plans (videos: frames and the config's pooling)."""
    pipe = fixture_pipeline(variant)
    cfg, tok = pipe.config, pipe.tokenizer
    image_id, video_id = tok.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    end = tok("\n", add_special_tokens=False)["input_ids"]
    blocks: list[tuple[int, list[int]]] = []
    for item in prompt.media:
        if item.kind == "image":
            blocks += [(image_id, [item.plan.embeds_per_placeholder - len(end)])] * item.plan.placeholders
            continue
        frames, enc = item.plan.num_frames, cfg.video_encoder
        if enc.kind == "basic":
            counts = [cfg.tokens_per_tile] * frames
        else:
            side = -(-cfg.grid_size // cfg.downsample)
            counts = [(side // h) * (side // w) for t, h, w in enc.pool_sizes for _ in range(frames // t)]
        assert sum(counts) + len(counts) * len(end) == item.plan.num_embeddings
        blocks.append((video_id, counts))
    out, queue = [], iter(blocks)
    for i in prompt.input_ids:
        if i not in (image_id, video_id):
            out.append(i)
            continue
        kind, counts = next(queue)
        assert kind == i
        for n in counts:
            out += [i] * n + end
    assert next(queue, None) is None
    assert len(out) == prompt.fused_length
    return out


def collapse_tiles(text: str) -> str:
    """nvila's NVILA-Lite prompt text with each run of tile placeholders written as the one placeholder that
    apply_chat_template writes (the processor expands it back from the image size)."""
    return re.sub(rf"(?:{re.escape(IMAGE_TOKEN)}\n)+(?={re.escape(IMAGE_TOKEN)})", "", text)


def check_against_nvila(variant: str, prompt: Prompt, text: str, ids: list[int], pixels: Any, videos: Any,
                        block_sizes: Any) -> None:
    want_text = collapse_tiles(prompt.text) if variant == LITE else prompt.text
    assert text == want_text
    assert ids == expected_ids(variant, prompt)
    images = [m for m in prompt.media if m.kind == "image"]
    clips = [m for m in prompt.media if m.kind == "video"]
    if images:
        assert torch.equal(torch.as_tensor(pixels), torch.cat([m.pixels for m in images]))
        assert block_sizes == [list(m.plan.block) if m.plan.block else None for m in images]
    else:
        assert pixels is None and block_sizes is None
    if clips:
        assert torch.equal(torch.as_tensor(videos), torch.cat([m.pixels for m in clips]))
    else:
        assert videos is None


def _processor_media(case: tuple, clip_frames: list) -> tuple[list[str], list[Any], dict[str, Any]]:
    _, _, parts, video = case
    images = [p["image"] for p in parts if p["type"] == "image"]
    videos = {"avi": [clip_frames], "folder": [str(FRAME_FOLDER)], None: []}[video]
    return images, videos, ({"do_sample_frames": True} if video else {})


# ---- transformers 5 (this environment) ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_processor_equals_nvila(case: tuple, processors: dict[str, Any], clip_frames: list) -> None:
    variant, _, parts, _ = case
    proc, messages = processors[variant], _messages(parts)
    prompt = fixture_pipeline(variant).prepare(messages)
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    images, videos, kwargs = _processor_media(case, clip_frames)
    out = proc(text=text, images=images or None, videos=videos or None, **kwargs)
    assert out["input_ids"].shape == out["attention_mask"].shape == (1, prompt.fused_length)
    assert out.get("pixel_values") is None or out["pixel_values"].dtype == torch.float32
    if videos:
        assert out["video_num_frames"].tolist() == [m.plan.num_frames for m in prompt.media if m.kind == "video"]
    check_against_nvila(variant, prompt, text, out["input_ids"][0].tolist(), out.get("pixel_values"),
                        out.get("pixel_values_videos"), out.get("block_sizes"))


def _openai_parts(messages: list[dict]) -> list[dict]:
    """The messages as SGLang's server hands them to a content-looping template: media parts reduced to their
    type, text parts kept."""
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            content = [{"type": p["type"]} if p["type"] in ("image", "video") else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sglang_style_prompt_equals_nvila(case: tuple, processors: dict[str, Any], clip_frames: list) -> None:
    """SGLang renders OpenAI messages with the folder's chat template, then calls the processor on the text."""
    import jinja2

    variant, _, parts, _ = case
    proc, messages = processors[variant], _messages(parts)
    template = proc.tokenizer.chat_template or proc.chat_template
    loops = [n.iter for n in jinja2.Environment().parse(template).find_all(jinja2.nodes.For)]
    assert any(isinstance(i, jinja2.nodes.Getitem) and getattr(i.node, "name", None) == "message"
               and getattr(i.arg, "value", None) == "content" for i in loops)   # SGLang's "openai" format test
    text = proc.tokenizer.apply_chat_template(_openai_parts(messages), chat_template=template, tokenize=False,
                                              add_generation_prompt=True)
    prompt = fixture_pipeline(variant).prepare(messages)
    images, videos, kwargs = _processor_media(case, clip_frames)
    out = proc(text=text, images=images or None, videos=videos or None, **kwargs)
    check_against_nvila(variant, prompt, text, out["input_ids"][0].tolist(), out.get("pixel_values"),
                        out.get("pixel_values_videos"), out.get("block_sizes"))


def test_folder_files_and_tokenizer(folders: dict[str, Path], processors: dict[str, Any]) -> None:
    for variant, folder in folders.items():
        kind = HF_TYPES["nvila_lite" if variant == LITE else "nvila"]
        module, cls = kind.processor_module + ".py", kind.processor_class
        config = json.loads((folder / "processor_config.json").read_text())
        pipe = fixture_pipeline(variant)
        assert config == {"auto_map": {"AutoProcessor": f"{module[:-3]}.{cls}"}, "processor_class": cls,
                          **json.loads(json.dumps(processor_settings(pipe.config)))}
        assert (folder / module).is_file() and type(processors[variant]).__name__ == cls
        assert (folder / "chat_template.jinja").read_text() == hf_chat_template(pipe.checkpoint.chat_template,
                                                                               lite=variant == LITE)
        assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
        tok = processors[variant].tokenizer
        assert (tok.image_token, tok.video_token) == (chat.IMAGE_TOKEN, chat.VIDEO_TOKEN)
        assert [tok.image_token_id, tok.video_token_id] == pipe.tokenizer.convert_tokens_to_ids(
            [chat.IMAGE_TOKEN, chat.VIDEO_TOKEN])
        assert "<|im_start|>" in tok.all_special_tokens   # the additional special tokens survive the patch


def test_batch_padding_and_inputs(processors: dict[str, Any]) -> None:
    proc = processors[LITE]
    a = [_image("china_800x600.png"), _text("Describe.")]
    b = [_text("Hi")]
    texts = [proc.apply_chat_template(_messages(p), add_generation_prompt=True) for p in (a, b)]
    image = str(MEDIA / "china_800x600.png")
    one = [proc(text=t, images=i) for t, i in ((texts[0], [image]), (texts[1], None))]
    both = proc(text=texts, images=[[image], []], padding=True)
    for k, single in enumerate(one):
        n = single["input_ids"].shape[1]
        mask = both["attention_mask"][k].bool()
        assert both["input_ids"][k][mask].tolist() == single["input_ids"][0].tolist() and int(mask.sum()) == n
    assert torch.equal(both["pixel_values"], one[0]["pixel_values"])
    direct = proc.apply_chat_template(_messages(a), add_generation_prompt=True, tokenize=True, return_dict=True)
    assert direct["input_ids"].tolist() == one[0]["input_ids"].tolist()
    assert torch.equal(direct["pixel_values"], one[0]["pixel_values"])
    from PIL import Image

    with Image.open(image) as im:               # a uint8 array gives the same pixels as the file
        arr = np.asarray(im.convert("RGB"))
    assert torch.equal(proc(text=texts[0], images=arr)["pixel_values"], one[0]["pixel_values"])
    np_out = proc(text=texts[0], images=[image], return_tensors="np")
    assert isinstance(np_out["pixel_values"], np.ndarray)
    assert np_out["input_ids"].tolist() == one[0]["input_ids"].tolist()


def test_clear_errors(processors: dict[str, Any], clip_frames: list) -> None:
    proc = processors["nvila-video"]
    text = proc.apply_chat_template(_messages([_image("hopper_64x64.png"), _text("x")]), add_generation_prompt=True)
    with pytest.raises(ValueError, match="1 '<image>' and 0 '<vila/video>' placeholders but 2 images"):
        proc(text=text, images=[str(MEDIA / "hopper_64x64.png")] * 2)
    with pytest.raises(ValueError, match="but 0 images"):
        proc(text=text)
    video_text = proc.apply_chat_template(_messages([{"type": "video", "video": "v"}]), add_generation_prompt=True)
    with pytest.raises(ValueError, match="divisible by 8, got 12 frames"):
        proc(text=video_text, videos=[clip_frames[:12]])
    with pytest.raises(ValueError, match="neither a video file nor a folder"):
        proc(text=video_text, videos=[str(AVI) + ".missing"])
    with pytest.raises(TypeError, match="unexpected arguments"):
        proc(text="hi", fps=2)


@pytest.mark.parametrize("variant", ["nvila", LITE, "nvila-video"])
def test_video_file_is_decoded_as_nvila_decodes_it(variant: str, processors: dict[str, Any]) -> None:
    """A video file path (PyAV, optional) gives nvila's frames: same count rule, same pixels."""
    proc = processors[variant]
    messages = _messages([{"type": "video", "video": str(AVI)}, _text("What happens?")])
    prompt = fixture_pipeline(variant).prepare(messages)
    out = proc(text=proc.apply_chat_template(messages, add_generation_prompt=True), videos=[str(AVI)])
    assert torch.equal(out["pixel_values_videos"], prompt.media[0].pixels)
    assert out["input_ids"][0].tolist() == expected_ids(variant, prompt)


# ---- transformers 4.57, without nvila ----------------------------------------------------------------------
@pytest.mark.slow
def test_processor_on_transformers_4_57(folders: dict[str, Path], tmp_path: Path, clip_frames: list) -> None:
    """Creating the environment takes ~30 s the first time (cached afterwards)."""
    try:
        python = processor_venv()
    except IndexUnreachable as e:
        pytest.skip(f"the package index cannot be reached to create the transformers 4.57 environment: {e}")
    np.savez(tmp_path / "clip.npz", frames=np.stack([np.asarray(f) for f in clip_frames]))
    videos = {"avi": [str(tmp_path / "clip.npz")], "folder": [str(FRAME_FOLDER)], None: []}
    cases = []
    for i, case in enumerate(CASES):
        variant, name, parts, video = case
        images, _, kwargs = _processor_media(case, clip_frames)
        cases.append({"name": f"{i}-{variant}-{name}", "folder": str(folders[variant]), "messages": _messages(parts),
                      "images": images, "videos": videos[video], "kwargs": kwargs})
    report = run_cases(python, cases, tmp_path / "out")
    assert report["transformers"].startswith("4.57.") and report["nvila_importable"] is False
    for c, (variant, _, parts, _) in zip(cases, CASES):
        got = report["cases"][c["name"]]
        arrays = np.load(tmp_path / "out" / f"{c['name']}.npz")
        prompt = fixture_pipeline(variant).prepare(_messages(parts))
        assert got["class"] == HF_TYPES["nvila_lite" if variant == LITE else "nvila"].processor_class
        assert got["tokens"][0::2] == [IMAGE_TOKEN, VIDEO_TOKEN]
        check_against_nvila(variant, prompt, got["text"], arrays["input_ids"][0].tolist(),
                            arrays.get("pixel_values"), arrays.get("pixel_values_videos"),
                            got["block_sizes"])

