"""Checkpoint loading and saving: bit-identical round trips, media-token embeddings, tied heads, the skipped
last ViT layer, and how local paths / Hub ids are resolved."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINTS, MEDIA, VARIANTS, fixture_pipeline
from safetensors import safe_open

import nvila
from nvila.base.errors import CheckpointError, NvilaError

PARTS = ("llm", "vision_tower", "mm_projector")
MEDIA_TOKENS = ("<vila/sentinel>", "<image>", "<vila/video>")
IMAGE_PROMPT = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": str(MEDIA / "hopper_64x64.png")},
            {"type": "text", "text": "Describe the image."},
        ],
    }
]


# ---------------------------------------------------------------------------------------------- helpers


def _copy_checkpoint(variant: str, dest: Path) -> Path:
    """A writable copy of a fixture checkpoint (the fixture files may be read-only)."""
    shutil.copytree(CHECKPOINTS / variant, dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dest


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _tree(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root (folders listed with b'<dir>')."""
    return {
        str(p.relative_to(root)): (b"<dir>" if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


def _assert_same_checkpoint(original: Path, saved: Path) -> None:
    """Same files; every safetensors tensor with the same key, dtype and bits; other files byte for byte."""
    orig_files = sorted(str(p.relative_to(original)) for p in original.rglob("*") if p.is_file())
    saved_files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert saved_files == orig_files
    for part in PARTS:
        weights = sorted((original / part).glob("*.safetensors"))
        assert weights, f"fixture {original.name}/{part} has no weights: the comparison would be empty"
        for w in weights:
            a, b = _tensors(w), _tensors(saved / part / w.name)
            assert a.keys() == b.keys(), f"{part}/{w.name}: key sets differ"
            for key in a:
                assert b[key].dtype == a[key].dtype, f"{part}/{w.name}:{key} dtype {b[key].dtype} != {a[key].dtype}"
                assert b[key].shape == a[key].shape, f"{part}/{w.name}:{key} shape"
                assert torch.equal(b[key], a[key]), f"{part}/{w.name}:{key} values differ"
    non_weights = [f for f in orig_files if not f.endswith(".safetensors")]
    # The comparison must cover the configs, the tokenizer files and the preprocessor config.
    for required in ("config.json", "llm/config.json", "vision_tower/config.json", "mm_projector/config.json",
                     "llm/tokenizer.json", "llm/tokenizer_config.json", "vision_tower/preprocessor_config.json"):
        assert required in non_weights
    for rel in non_weights:
        assert (saved / rel).read_bytes() == (original / rel).read_bytes(), f"{rel} is not byte-identical"


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_round_trip_is_bit_identical(variant: str, tmp_path: Path) -> None:
    ckpt = CHECKPOINTS / variant
    pipe = fixture_pipeline(variant)  # nvila.load(ckpt, dtype="float32", device="cpu"), loaded once
    assert pipe.model.llm.dtype == torch.float32
    out = pipe.save(tmp_path / "out")
    assert Path(out) == tmp_path / "out"
    _assert_same_checkpoint(ckpt, tmp_path / "out")
    # Nothing but the output folder is left behind (no temporary sibling).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    reloaded = nvila.load(tmp_path / "out", dtype="float32", device="cpu")
    expected = pipe.next_token_logits(IMAGE_PROMPT)
    got = reloaded.next_token_logits(IMAGE_PROMPT)
    assert got.shape == expected.shape == (len(pipe.tokenizer),)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_round_trip_is_bit_identical(variant: str, tmp_path: Path) -> None:
    pipe = nvila.load(CHECKPOINTS / variant, dtype="bfloat16", device="cpu")
    assert pipe.model.llm.dtype == torch.bfloat16
    assert next(pipe.model.vision.parameters()).dtype == torch.bfloat16
    pipe.save(tmp_path / "out")
    _assert_same_checkpoint(CHECKPOINTS / variant, tmp_path / "out")


def test_top_level_config_is_written_back_verbatim(tmp_path: Path) -> None:
    ckpt = _copy_checkpoint("nvila-lite", tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["_name_or_path"] = "NVILA-Lite – café"  # non-ASCII survives only if the file is copied verbatim
    (ckpt / "config.json").write_text(json.dumps(raw, indent=4, ensure_ascii=False), encoding="utf-8")
    nvila.load(ckpt, dtype="float32").save(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()


def test_save_into_existing_empty_folder_is_allowed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    fixture_pipeline("nvila-lite").save(out)
    assert (out / "llm" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_into_non_empty_folder_fails_and_leaves_it_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "sub" / "config.json").write_text("{}")
    before = _tree(out)
    with pytest.raises(NvilaError, match="not empty") as info:
        fixture_pipeline("nvila-lite").save(out)
    assert str(out) in str(info.value)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_save_onto_an_existing_file_is_an_nvila_error(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.write_text("not a folder")
    with pytest.raises(NvilaError):
        fixture_pipeline("nvila-lite").save(target)
    assert target.read_text() == "not a folder"


# ------------------------------------------------------------------------- media tokens and embeddings


@pytest.mark.parametrize("variant", VARIANTS)
def test_media_tokens_follow_the_saved_vocabulary_with_mean_rows(variant: str) -> None:
    pipe = fixture_pipeline(variant)
    llm = pipe.model.llm
    with safe_open(str(CHECKPOINTS / variant / "llm" / "model.safetensors"), framework="pt") as f:
        vocab = f.get_slice("model.embed_tokens.weight").get_shape()[0]
        saved_emb = f.get_tensor("model.embed_tokens.weight").float()
    assert vocab == json.loads((CHECKPOINTS / variant / "llm" / "config.json").read_text())["vocab_size"]

    assert len(pipe.tokenizer) == vocab + 3
    ids = [pipe.tokenizer.convert_tokens_to_ids(t) for t in MEDIA_TOKENS]
    assert ids == [vocab, vocab + 1, vocab + 2]
    assert pipe.processor.image_token_id == vocab + 1
    assert pipe.processor.video_token_id == vocab + 2

    emb = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == vocab + 3
    # The stored rows are loaded unchanged; the three new ones are the mean of the stored rows.
    assert torch.equal(emb[:vocab].detach(), saved_emb)
    torch.testing.assert_close(emb[vocab:].detach(), saved_emb.mean(0).expand(3, -1), atol=1e-6, rtol=0)

    logits = pipe.next_token_logits(IMAGE_PROMPT)
    assert logits.shape == (vocab + 3,)
    others = logits[:vocab]
    assert others.std() > 0.1  # otherwise "equals the mean" would be trivially true
    torch.testing.assert_close(logits[vocab:], others.mean().expand(3), atol=1e-5, rtol=0)


def test_tied_embeddings_share_one_parameter_after_loading() -> None:
    lite = fixture_pipeline("nvila-lite").model.llm
    assert lite.config.tie_word_embeddings
    assert lite.lm_head.weight is lite.get_input_embeddings().weight
    # The untied models keep a separate head, loaded from its own tensor.
    full = fixture_pipeline("nvila").model.llm
    assert not full.config.tie_word_embeddings
    assert full.lm_head.weight is not full.get_input_embeddings().weight
    with safe_open(str(CHECKPOINTS / "nvila" / "llm" / "model.safetensors"), framework="pt") as f:
        stored_head = f.get_tensor("lm_head.weight").float()
    assert torch.equal(full.lm_head.weight[: stored_head.shape[0]].detach(), stored_head)


# -------------------------------------------------------------------------------------- vision tower


def test_vision_tower_matches_transformers_second_to_last_hidden_state() -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    folder = CHECKPOINTS / "nvila" / "vision_tower"
    pipe = fixture_pipeline("nvila")
    tower = pipe.model.vision
    n_layers = len(tower.model.encoder.layers)
    assert n_layers == json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert tower.layers_to_run == n_layers - 1  # select_layer -2: the last layer is skipped

    reference = SiglipVisionModel.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    random_model = SiglipVisionModel(SiglipVisionConfig.from_pretrained(folder)).eval()
    size = pipe.config.tile_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def fail(*_: object) -> None:
        raise AssertionError("the unused last ViT layer was run")

    hook = tower.model.encoder.layers[-1].register_forward_pre_hook(fail)
    try:
        with torch.no_grad():
            ours = tower(pixels)
    finally:
        hook.remove()
    with torch.no_grad():
        ref_states = reference(pixels, output_hidden_states=True).hidden_states
        rnd = random_model(pixels, output_hidden_states=True).hidden_states[-2]

    assert len(ref_states) == n_layers + 1
    # The reference really loaded the checkpoint's vision_model.* weights (not a random init) ...
    assert (ref_states[-2] - rnd).abs().max() > 1e-2
    # ... and the skipped layer matters, so this comparison can tell -2 from -1.
    assert (ref_states[-1] - ref_states[-2]).abs().max() > 1e-2
    assert ours.shape == ref_states[-2].shape
    torch.testing.assert_close(ours, ref_states[-2], atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------- resolution


def test_hub_id_offline_gives_download_instructions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import time, which has already happened.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)  # "some-org/some-model" must not exist as a relative folder
    with pytest.raises(CheckpointError) as info:
        nvila.load("some-org/some-model", dtype="float32", device="cpu")
    message = str(info.value)
    assert "huggingface-cli download" in message
    assert "some-org/some-model" in message
    assert "huggingface-cli download some-org/some-model" in message


def test_missing_local_path_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        nvila.load(tmp_path / "nope", dtype="float32", device="cpu")
    assert str(tmp_path / "nope") in str(info.value)


def test_file_path_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file") as info:
        nvila.load(target, dtype="float32", device="cpu")
    assert str(target) in str(info.value)
