"""Bad input through the public API: every case must raise the specific NvilaError subclass with a message
that names the problem, never a bare torch / PIL / PyAV / safetensors exception."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import CHECKPOINTS, MEDIA, fixture_pipeline, png_claiming
from safetensors.torch import load_file, save_file

import nvila
from nvila.base.errors import CheckpointError, ConfigError, MediaError, NvilaError, PromptError

PNG = MEDIA / "hopper_64x64.png"
AVI = MEDIA / "clip_24f_12fps_176x144.avi"


# ---------------------------------------------------------------------------------------------- helpers


def _copy(tmp_path: Path, variant: str = "nvila") -> Path:
    """A writable copy of a fixture checkpoint (the fixture files may be read-only)."""
    dest = tmp_path / variant
    shutil.copytree(CHECKPOINTS / variant, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dest


def _load(path: Path) -> Any:
    return nvila.load(path, dtype="float32", device="cpu")


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _image_msg(source: Any) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": source}, {"type": "text", "text": "What?"}]}]


def _video_msg(source: Any, **options: Any) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": str(source), **options},
                                         {"type": "text", "text": "What happens?"}]}]




def test_fixture_checkpoint_loads_unmodified(tmp_path: Path) -> None:
    """Control: the untouched copy loads, so every failure below comes from the breakage alone."""
    pipe = _load(_copy(tmp_path))
    assert len(pipe.tokenizer) > 0


# ---------------------------------------------------------------------------------- checkpoint layouts


@pytest.mark.parametrize(
    "remove, named",
    [
        ("llm", "llm/"),
        ("mm_projector/model.safetensors", "mm_projector/model.safetensors"),
        ("vision_tower/config.json", "vision_tower/config.json"),
        ("config.json", "config.json"),
    ],
)
def test_missing_piece_is_named(tmp_path: Path, remove: str, named: str) -> None:
    ckpt = _copy(tmp_path)
    target = ckpt / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError) as info:
        _load(ckpt)
    message = str(info.value)
    assert f"missing {named} (" in message  # the missing list is exactly this one piece
    assert "not an NVILA checkpoint folder" in message


def test_every_missing_piece_is_named_at_once(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    shutil.rmtree(ckpt / "vision_tower")
    (ckpt / "llm" / "config.json").unlink()
    with pytest.raises(CheckpointError) as info:
        _load(ckpt)
    missing = str(info.value).split("missing ", 1)[1].split(" (expected", 1)[0]
    assert sorted(missing.split(", ")) == ["llm/config.json", "vision_tower/"]


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: b"this is not a safetensors file" * 50, id="garbage"),
        pytest.param(lambda data: data[: len(data) // 2], id="truncated-half"),
        pytest.param(lambda data: data[:-1], id="truncated-one-byte"),
        pytest.param(lambda data: data[:64], id="truncated-header"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_corrupt_safetensors(tmp_path: Path, corrupt: Callable[[bytes], bytes]) -> None:
    ckpt = _copy(tmp_path)
    weights = ckpt / "llm" / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(CheckpointError, match="not readable safetensors") as info:
        _load(ckpt)
    assert str(ckpt / "llm") in str(info.value)


def test_pytorch_bin_weights_are_refused(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    (ckpt / "llm" / "model.safetensors").rename(ckpt / "llm" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        _load(ckpt)


def _rewrite_projector(ckpt: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = ckpt / "mm_projector" / "model.safetensors"
    tensors = load_file(path)
    assert "layers.1.weight" in tensors and "layers.1.bias" in tensors
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tensor_with_wrong_shape(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)

    def edit(t: dict[str, torch.Tensor]) -> None:
        t["layers.2.weight"] = torch.zeros(3, 5, dtype=torch.bfloat16)

    _rewrite_projector(ckpt, edit)
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        _load(ckpt)
    message = str(info.value)
    assert "layers.2.weight" in message and "(3, 5)" in message
    assert "mm_projector" in message
    assert "missing tensors" not in message and "unexpected tensors" not in message


def test_unexpected_tensor(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)

    def edit(t: dict[str, torch.Tensor]) -> None:
        t["layers.99.weight"] = torch.zeros(4, dtype=torch.bfloat16)

    _rewrite_projector(ckpt, edit)
    with pytest.raises(CheckpointError, match="unexpected tensors: layers.99.weight") as info:
        _load(ckpt)
    assert "missing tensors" not in str(info.value)


def test_missing_tensor(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    _rewrite_projector(ckpt, lambda t: t.pop("layers.1.bias"))
    with pytest.raises(CheckpointError, match="missing tensors: layers.1.bias") as info:
        _load(ckpt)
    assert "unexpected tensors" not in str(info.value)


def test_vision_tower_tensor_with_wrong_shape_names_the_official_key(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    path = ckpt / "vision_tower" / "model.safetensors"
    tensors = load_file(path)
    key = "vision_model.embeddings.patch_embedding.bias"
    tensors[key] = torch.zeros(1, dtype=tensors[key].dtype)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        _load(ckpt)
    assert key in str(info.value)


# ------------------------------------------------------------------------------------------- configs


def test_unknown_projector_type_lists_the_known_ones(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    _edit_json(ckpt / "mm_projector" / "config.json", lambda c: c.update(mm_projector_type="mlp_bogus"))
    with pytest.raises(ConfigError) as info:
        _load(ckpt)
    assert isinstance(info.value, NvilaError)
    message = str(info.value)
    assert "mlp_bogus" in message
    for known in ("mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix"):
        assert known in message


def test_pad_aspect_ratio_without_dynamic_s2(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    _edit_json(ckpt / "config.json", lambda c: c.update(image_aspect_ratio="pad", dynamic_s2=False))
    with pytest.raises(ConfigError, match="image_aspect_ratio='pad' is not supported"):
        _load(ckpt)


@pytest.mark.parametrize("name", ["config.json", "llm/config.json", "vision_tower/preprocessor_config.json"])
def test_broken_json(tmp_path: Path, name: str) -> None:
    ckpt = _copy(tmp_path)
    (ckpt / name).write_text('{"dynamic_s2": true,')
    with pytest.raises(CheckpointError, match="cannot read") as info:
        _load(ckpt)
    assert str(ckpt / name) in str(info.value)


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    (ckpt / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="does not hold a JSON object"):
        _load(ckpt)


def test_unknown_chat_template_name(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    _edit_json(ckpt / "config.json", lambda c: c.update(chat_template="vicuna_v9"))
    with pytest.raises(CheckpointError, match="chat_template 'vicuna_v9'.*known"):
        _load(ckpt)


def test_unsupported_vision_architecture(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    _edit_json(ckpt / "vision_tower" / "config.json", lambda c: c.update(architectures=["ClipVisionModel"]))
    with pytest.raises(CheckpointError, match="'ClipVisionModel' is not supported"):
        _load(ckpt)


def test_non_numeric_config_value_is_a_config_error(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    _edit_json(ckpt / "config.json", lambda c: c.update(mm_hidden_size="wide"))
    with pytest.raises(ConfigError, match="mm_hidden_size"):
        _load(ckpt)


def test_out_of_range_select_layer_is_a_config_error(tmp_path: Path) -> None:
    ckpt = _copy(tmp_path)
    _edit_json(ckpt / "config.json", lambda c: c.update(mm_vision_select_layer=-10))
    with pytest.raises(ConfigError, match="select_layer"):
        _load(ckpt)


# ------------------------------------------------------------------------------------------- images


def test_missing_image_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(MediaError, match="does not exist") as info:
        fixture_pipeline("nvila").generate(_image_msg(str(path)), max_new_tokens=1)
    assert str(path) in str(info.value)


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("just some text, not an image\n")
    with pytest.raises(MediaError, match="not a recognised image") as info:
        fixture_pipeline("nvila").generate(_image_msg(str(path)), max_new_tokens=1)
    assert "notes.png" in str(info.value)


def test_image_part_is_decoded_by_content_not_extension(tmp_path: Path) -> None:
    # Control for the case above: a real PNG under an unknown extension is still an image part.
    path = tmp_path / "picture.xyz"
    path.write_bytes(PNG.read_bytes())
    prompt = fixture_pipeline("nvila").prepare(_image_msg(str(path)))
    assert [m.kind for m in prompt.media] == ["image"]


def test_truncated_png(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    data = PNG.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated or corrupt"):
        fixture_pipeline("nvila").prepare(_image_msg(str(path)))


def test_png_header_claiming_huge_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(MediaError) as info:
        fixture_pipeline("nvila").prepare(_image_msg(str(path)))
    message = str(info.value)
    assert "pixels" in message and "limit" in message
    assert "bomb.png" in message


def test_png_with_zero_dimension(tmp_path: Path) -> None:
    path = tmp_path / "zero.png"
    path.write_bytes(png_claiming(0, 32))
    with pytest.raises(MediaError, match="zero width or height"):
        fixture_pipeline("nvila").prepare(_image_msg(str(path)))


def test_image_part_of_wrong_type(tmp_path: Path) -> None:
    with pytest.raises((PromptError, MediaError)):
        fixture_pipeline("nvila").prepare(_image_msg(12345))


# ------------------------------------------------------------------------------------------- videos


def test_garbage_mp4(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x01garbage" * 500)
    with pytest.raises(MediaError, match="not a video or cannot be opened") as info:
        fixture_pipeline("nvila-video").prepare(_video_msg(path))
    assert "clip.mp4" in str(info.value)


def test_truncated_video_without_decodable_frames(tmp_path: Path) -> None:
    data = AVI.read_bytes()
    first_chunk = data.index(b"00dc", data.index(b"movi"))
    path = tmp_path / "headers_only.avi"
    path.write_bytes(data[: first_chunk + 18])
    with pytest.raises(MediaError, match="no decodable video frames"):
        fixture_pipeline("nvila-video").generate(_video_msg(path), max_new_tokens=1)


def test_empty_frame_folder(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    with pytest.raises(MediaError, match="is empty"):
        fixture_pipeline("nvila-video").prepare(_video_msg(folder))


def test_missing_video(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="does not exist"):
        fixture_pipeline("nvila-video").prepare(_video_msg(tmp_path / "nope.mp4"))


@pytest.mark.parametrize("where", ["option", "part"])
def test_video_frames_must_be_a_multiple_of_the_temporal_pool(where: str) -> None:
    pipe = fixture_pipeline("nvila-video")
    assert pipe.config.video_encoder.frame_multiple == 8
    msg = _video_msg(AVI, num_frames=12) if where == "part" else _video_msg(AVI)
    options = {"num_frames": 12} if where == "option" else {}
    with pytest.raises(PromptError, match="multiple of 8") as info:
        pipe.generate(msg, max_new_tokens=1, **options)
    assert "12" in str(info.value)
    # Control: a multiple of 8 is accepted.
    assert pipe.prepare(_video_msg(AVI), num_frames=16).media[0].kind == "video"


def test_fps_sampling_is_refused_for_temporal_pooling() -> None:
    with pytest.raises(PromptError, match="multiple of 8"):
        fixture_pipeline("nvila-video").prepare(_video_msg(AVI), fps=2.0)


def test_negative_num_frames() -> None:
    with pytest.raises(PromptError, match="num_frames must be >= 1"):
        fixture_pipeline("nvila-video").prepare(_video_msg(AVI, num_frames=-8))


def test_zero_num_frames_is_rejected() -> None:
    with pytest.raises(PromptError, match="num_frames"):
        fixture_pipeline("nvila-video").prepare(_video_msg(AVI), num_frames=0)


# ------------------------------------------------------------------------------------------- prompts


def test_prompt_longer_than_the_context() -> None:
    pipe = fixture_pipeline("nvila")
    assert pipe.config.model_max_length == 8192
    with pytest.raises(PromptError, match="context") as info:
        pipe.generate("word " * 20000, max_new_tokens=1)
    assert "8192" in str(info.value)


@pytest.mark.parametrize(
    "messages, fragment",
    [
        pytest.param([], "non-empty list", id="empty-list"),
        pytest.param([{"role": "robot", "content": "hi"}], "role 'robot'", id="unknown-role"),
        pytest.param(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "image", "image": str(PNG)}]},
                {"role": "user", "content": "and?"},
            ],
            "only allowed in user messages",
            id="image-in-assistant",
        ),
        pytest.param(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "last message must be a user",
            id="ends-with-assistant",
        ),
        pytest.param([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}], "unknown content part",
                     id="unknown-part-type"),
        pytest.param([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], "system message",
                     id="late-system"),
        pytest.param([{"role": "user"}], "'role' and 'content'", id="no-content"),
        pytest.param([{"role": "user", "content": [{"type": "text", "text": 3}]}], "string 'text'",
                     id="non-string-text"),
        pytest.param([{"role": "user", "content": [{"type": "image"}]}], "needs a 'image' entry", id="empty-image"),
    ],
)
def test_bad_messages(messages: list, fragment: str) -> None:
    with pytest.raises(PromptError, match=fragment):
        fixture_pipeline("nvila").generate(messages, max_new_tokens=1)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_bad_sampling_options(options: dict, fragment: str) -> None:
    pipe = fixture_pipeline("nvila")
    with pytest.raises(PromptError, match=fragment):
        pipe.generate("hi", **options)
    with pytest.raises(PromptError, match=fragment):
        list(pipe.stream("hi", **options))


def test_unknown_generation_option() -> None:
    pipe = fixture_pipeline("nvila")
    with pytest.raises(ConfigError, match=r"unknown generation options \['max_tokens'\]"):
        pipe.generate("hi", max_tokens=5)
    with pytest.raises(ConfigError, match="unknown generation options"):
        pipe.chat("hi", temprature=0.5)


def test_nan_temperature_is_rejected() -> None:
    with pytest.raises(PromptError, match="temperature"):
        fixture_pipeline("nvila").generate("hi", temperature=float("nan"), max_new_tokens=2)


def test_empty_batch_gives_no_results() -> None:
    assert fixture_pipeline("nvila").generate_batch([], max_new_tokens=1) == []
    with pytest.raises(PromptError, match="max_new_tokens"):           # options are still checked
        fixture_pipeline("nvila").generate_batch([], max_new_tokens=0)


# -------------------------------------------------------------------------------------- load options


def test_unknown_dtype() -> None:
    with pytest.raises(ConfigError, match="dtype 'int3' is not supported"):
        nvila.load(CHECKPOINTS / "nvila", dtype="int3", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda(device: str) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        nvila.load(CHECKPOINTS / "nvila", dtype="float32", device=device)


def test_invalid_device_string() -> None:
    with pytest.raises(ConfigError, match="tpu9"):
        nvila.load(CHECKPOINTS / "nvila", dtype="float32", device="tpu9")


def test_non_float_torch_dtype() -> None:
    with pytest.raises(ConfigError, match="dtype"):
        nvila.load(CHECKPOINTS / "nvila", dtype=torch.int8, device="cpu")
