"""Float32 math on 16-bit weights (the lossless default where bf16 is not native): the module swaps against
their reference math, the parity of a model loaded that way with the reference fixtures, and a save that
gives back the stored tensors bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CHECKPOINTS, MEDIA, OUTPUTS, VARIANTS, case_messages, fixture_cases
from test_checkpoint import _assert_same_checkpoint
from torch import nn

import nvila
from nvila.base import hardware
from nvila.model.mixed import (
    PackedFp16Linear,
    UpcastEmbedding,
    UpcastLinear,
    fbgemm_fp16_available,
    fp32_math_on_16bit_weights,
)

pytestmark = pytest.mark.skipif(not fbgemm_fp16_available(), reason="FBGEMM (x86 builds of torch) is not available")
AVX2 = ("avx2", "fma")


def bf16_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    """A bf16 linear with weights spanning fp16's subnormal range too (the values fp16 stores inexactly)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).bfloat16()
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, :4] *= 1e-4                                                   # |w| ~ 2e-6: fp16 subnormals
    lin.weight.data = w.bfloat16()
    if bias:
        lin.bias.data = torch.randn(n, generator=g).bfloat16()
    return lin


@pytest.mark.parametrize("rows, max_rows", [(1, 1 << 62), (7, 1 << 62), (7, 4)])     # fp16 GEMM / unpacked
@pytest.mark.parametrize("bias", [True, False])
def test_packed_fp16_linear_is_float32_math_on_the_stored_weight(rows: int, max_rows: int, bias: bool) -> None:
    lin = bf16_linear(96, 40, bias)
    packed = PackedFp16Linear(lin, max_rows)
    x = torch.randn(2, rows, 96, generator=torch.Generator().manual_seed(1))
    want = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    got = packed(x)
    assert got.dtype == torch.float32 and got.shape == (2, rows, 40)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    state = packed.state_dict()
    assert torch.equal(state["weight"], lin.weight) and state["weight"].dtype == torch.bfloat16
    assert packed._exact_index.numel() > 0                             # the subnormals were kept aside
    if bias:
        assert torch.equal(state["bias"], lin.bias)


def test_float_tail_rows_are_multiplied_in_float32() -> None:
    lin = bf16_linear(64, 24, bias=False)
    tail = torch.randn(3, 64) * 0.01                                   # float32 rows, not bf16-representable
    lin.weight.data[-3:] = tail.bfloat16()
    lin.register_buffer("float_tail", tail, persistent=False)
    packed = PackedFp16Linear(lin, 1 << 62)
    x = torch.randn(5, 64)
    want = F.linear(x.double(), torch.cat([lin.weight[:-3].double(), tail.double()]))
    torch.testing.assert_close(packed(x).double(), want, rtol=0, atol=1e-5)
    assert packed.state_dict()["weight"].shape == (24, 64)


def test_conversion_keeps_names_and_upcasts_what_fp16_cannot_hold() -> None:
    model = nn.ModuleDict({"a": bf16_linear(512, 512), "b": bf16_linear(512, 512), "c": bf16_linear(32, 16),
                           "emb": nn.Embedding(10, 32).bfloat16(), "norm": nn.LayerNorm(32).bfloat16()})
    model["b"].weight.data[0, 0] = 1e5                                 # beyond fp16's range
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = fp32_math_on_16bit_weights(model, 1 << 62)
    assert counts == {"packed_fp16": 1, "upcast_linear": 2, "upcast_embedding": 1}
    assert isinstance(model["a"], PackedFp16Linear) and isinstance(model["b"], UpcastLinear)
    assert isinstance(model["c"], UpcastLinear)                        # too small to be worth packing
    assert isinstance(model["emb"], UpcastEmbedding) and model["emb"](torch.tensor([1])).dtype == torch.float32
    assert model["norm"].weight.dtype == torch.float32
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k].to(before[k].dtype), before[k]) for k in before)


def _cases(variant: str) -> list[tuple[str, dict]]:
    return [(c, s) for c, s in sorted(fixture_cases().items()) if c.startswith(variant + "/")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_avx2_default_matches_the_reference_fixtures(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """dtype="auto" under the AVX2 rules: float32 math on the bf16 weights (no float32 copy), logits within
    1e-4 of the reference's float32 logits and the same 16 greedy tokens on every fixture case."""
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AVX2))
    pipe = nvila.load(CHECKPOINTS / variant, device="cpu")
    kinds = {type(m) for m in pipe.model.modules()}
    assert PackedFp16Linear in kinds and nn.Linear not in kinds      # the fixtures' small layers: UpcastLinear
    low = (UpcastEmbedding, UpcastLinear)
    assert all(p.dtype == torch.float32 for m in pipe.model.modules() if not isinstance(m, low)
               for p in m.parameters(recurse=False))
    for case, spec in _cases(variant):
        ref = json.loads((OUTPUTS / f"{case}.json").read_text())
        messages = case_messages(spec)
        logits = pipe.next_token_logits(messages).numpy()
        err = float(np.abs(logits - np.load(OUTPUTS / f"{case}.npz")["last_logits"]).max())
        assert err < 1e-4, f"{case}: max |logit error| {err:.2e}"
        assert pipe.generate(messages, max_new_tokens=16).output_token_ids == ref["generation"]["output_ids"], case


def test_avx2_loaded_model_saves_the_stored_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AVX2))
    pipe = nvila.load(CHECKPOINTS / "nvila-lite", device="cpu")
    pipe.save(tmp_path / "out")
    _assert_same_checkpoint(CHECKPOINTS / "nvila-lite", tmp_path / "out")
    again = nvila.load(tmp_path / "out", device="cpu")
    assert torch.equal(again.next_token_logits("hi"), pipe.next_token_logits("hi"))


@pytest.mark.parametrize("flags, dtype, packed", [(AVX2, "auto", True), (AVX2, "float32", False),
                                                  (("avx512_bf16", "avx2", "fma"), "auto", False),
                                                  (("asimd",), "auto", False)])
def test_which_loads_take_float32_math_on_16bit_weights(flags: tuple, dtype: str, packed: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    pipe = nvila.load(CHECKPOINTS / "nvila", dtype=dtype, device="cpu")
    assert any(isinstance(m, PackedFp16Linear) for m in pipe.model.modules()) is packed


def test_adapters_and_quantized_folders_load_in_float32(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A LoRA merge would round into 16-bit weights: with an adapter the model loads in float32."""
    from nvila.checkpoint.lora import apply_lora, save_adapter
    from nvila.formats.lora import LoraSettings

    base = nvila.load(CHECKPOINTS / "nvila-lite", dtype="float32", device="cpu")
    settings = LoraSettings(r=2, alpha=4, dropout=0.0)
    apply_lora(base.model, settings)
    save_adapter(base.model, tmp_path / "adapter", settings)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AVX2))
    pipe = nvila.load(CHECKPOINTS / "nvila-lite", device="cpu", lora=tmp_path / "adapter")
    assert not any(isinstance(m, PackedFp16Linear) for m in pipe.model.modules())
    assert pipe.model.llm.dtype == torch.float32


def test_mapped_input_embeddings_leave_the_table_in_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the LM head has its own packed copy, the 16-bit input table stays in the checkpoint file
    (memory-mapped): the same rows as the loaded table (appended media rows included), the same logits, and
    a save that writes the stored table back."""
    import nvila.model.mixed as mixed
    from nvila.model.mixed import MappedEmbedding

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(AVX2))
    monkeypatch.setattr(mixed, "PACKED_MIN_WEIGHTS", 0)                  # pack the tiny LM head too
    src = CHECKPOINTS / "nvila-lite"
    pipe = nvila.load(src, device="cpu")
    emb = pipe.model.llm.get_input_embeddings()
    assert isinstance(emb, MappedEmbedding) and isinstance(pipe.model.llm.get_output_embeddings(), PackedFp16Linear)
    monkeypatch.setattr("nvila.api.map_input_embeddings", lambda ckpt, rows: False)
    plain = nvila.load(src, device="cpu")
    table = plain.model.llm.get_input_embeddings()
    assert isinstance(table, UpcastEmbedding) and emb.num_embeddings == table.weight.shape[0]
    ids = torch.arange(table.weight.shape[0])                           # every row, appended ones included
    assert torch.equal(emb(ids), table(ids)) and emb(ids).dtype == torch.float32
    messages = [{"role": "user", "content": [{"type": "image", "image": str(MEDIA / "china_800x600.png")},
                                             {"type": "text", "text": "Describe the image."}]}]
    assert torch.equal(pipe.next_token_logits(messages), plain.next_token_logits(messages))
    pipe.save(tmp_path / "out")
    _assert_same_checkpoint(src, tmp_path / "out")
