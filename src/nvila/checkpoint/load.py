"""Loading an official-layout NVILA checkpoint folder (or Hub id) into a :class:`Checkpoint`.

The folder layout is :mod:`nvila.formats.layout`; each part is read by :mod:`nvila.checkpoint.weights`.
Loading appends the media tokens to the tokenizer and grows the LLM's embeddings with mean rows, as the
reference does (saving removes those rows again). A folder with a ``quant_config.json`` is a quantized
checkpoint: the linears it lists are swapped for quantized modules before the strict load
(:mod:`nvila.checkpoint.quant`), which then also checks the dtype of every integer tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvila.base.errors import CheckpointError
from nvila.base.files import read_json
from nvila.checkpoint.quant import apply_quant_config
from nvila.checkpoint.weights import PartRecord, load_weights, stored_float_dtype, weight_files
from nvila.formats.config import NvilaConfig
from nvila.formats.layout import CONFIG, PARTS, PREPROCESSOR, QUANT_CONFIG
from nvila.model.nvila import NvilaModel
from nvila.model.projector import Projector
from nvila.model.vision import VisionTower
from nvila.processing.chat import CHAT_TEMPLATES, IMAGE_TOKEN, MEDIA_SPECIAL_TOKENS, SENTINEL_TOKEN, VIDEO_TOKEN


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a Hub id downloaded (or found in the cache) with huggingface_hub.
    Built-in model names (``nvila:...``) are resolved by :func:`nvila.api.resolve_model` before this."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; --model expects a checkpoint folder (with config.json, llm/, ...)")
        return path
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint folder {text} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text))
    except Exception as e:  # network, auth, offline mode, unknown repo
        raise CheckpointError(
            f"{text} is not a local folder and could not be fetched from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}). On a machine with internet access run "
            f"`huggingface-cli download {text} --local-dir DIR`, copy DIR here and pass --model DIR"
        ) from None


def check_layout(root: Path) -> None:
    """Raise CheckpointError naming every missing piece of the official layout."""
    problems = []
    if not (root / CONFIG).is_file():
        problems.append(CONFIG)
    for part in PARTS:
        d = root / part
        if not d.is_dir():
            problems.append(f"{part}/")
            continue
        if not (d / CONFIG).is_file():
            problems.append(f"{part}/{CONFIG}")
        if not weight_files(d):
            problems.append(f"{part}/model.safetensors")
    if problems:
        raise CheckpointError(
            f"{root} is not an NVILA checkpoint folder: missing {', '.join(problems)} "
            "(expected config.json + llm/, vision_tower/, mm_projector/ sub-folders with config.json and "
            "*.safetensors each)"
        )


@dataclass
class Checkpoint:
    """A loaded model with everything needed to run it and to save it back unchanged."""

    model: Any                      # nvila.model.nvila.NvilaModel
    tokenizer: Any
    chat_template: str
    stop_token_ids: list[int]
    root: Path
    records: dict[str, PartRecord]


def vision_classes() -> dict[str, type]:
    """``architectures[0]`` of vision_tower/config.json -> transformers class."""
    from transformers import Dinov2Model, SiglipVisionModel

    return {"SiglipVisionModel": SiglipVisionModel, "Dinov2Model": Dinov2Model}


def _build(cls: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """Instantiate a transformers model in ``dtype`` without spending time on random init."""
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") else cls(config)
    finally:
        torch.set_default_dtype(previous)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # skipped along with the init; tied heads must share the embeddings
    return model


def load_checkpoint(path_or_id: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    keep_16bit: bool = False) -> Checkpoint:
    """Load an official-layout NVILA checkpoint (local folder or Hub id) with its modules in ``dtype``.

    ``keep_16bit``: a part whose weights are all stored in bf16 (or fp16) is built in that dtype instead,
    so no float32 copy of it is ever made (for :func:`nvila.model.mixed.fp32_math_on_16bit_weights`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    root = resolve(path_or_id)
    check_layout(root)
    raw = read_json(root / CONFIG)
    root_record = PartRecord(files={CONFIG: (root / CONFIG).read_bytes()})
    quant = None
    if (root / QUANT_CONFIG).is_file():
        quant = read_json(root / QUANT_CONFIG)
        root_record.files[QUANT_CONFIG] = (root / QUANT_CONFIG).read_bytes()
    sub = {part: read_json(root / part / CONFIG) for part in PARTS}
    pre_path = root / "vision_tower" / PREPROCESSOR
    pre = read_json(pre_path) if pre_path.is_file() else None
    cfg = NvilaConfig.from_official(raw, sub["vision_tower"], sub["mm_projector"], sub["llm"], pre)

    arch = (sub["vision_tower"].get("architectures") or ["SiglipVisionModel"])[0]
    classes = vision_classes()
    if arch not in classes:
        raise CheckpointError(f"vision tower architecture {arch!r} is not supported (known: {sorted(classes)})")
    try:
        vcfg = AutoConfig.from_pretrained(root / "vision_tower")
        lcfg = AutoConfig.from_pretrained(root / "llm")
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot parse a sub-folder config in {root}: {e}") from e
    vcfg._attn_implementation = lcfg._attn_implementation = "sdpa"
    records: dict[str, PartRecord] = {"": root_record}
    dtypes = {part: _part_dtype(root / part, dtype, keep_16bit) for part in PARTS}
    vision_model = _build(classes[arch], vcfg, dtypes["vision_tower"])
    _quantized_skeleton(vision_model, "vision_tower", quant)
    records["vision_tower"] = load_weights(vision_model, root / "vision_tower", "vision_tower")
    projector = _build(lambda c: Projector(cfg.projector_type, cfg.mm_hidden_size, cfg.llm_hidden_size), None,
                       dtypes["mm_projector"])
    _quantized_skeleton(projector, "mm_projector", quant)
    records["mm_projector"] = load_weights(projector, root / "mm_projector", "mm_projector")
    llm = _build(AutoModelForCausalLM, lcfg, dtypes["llm"])
    _quantized_skeleton(llm, "llm", quant)
    records["llm"] = load_weights(llm, root / "llm", "llm")

    tokenizer, template, stop_ids, media_ids, end_ids = _load_tokenizer(root / "llm", cfg.chat_template)
    records["llm"].vocab_rows = _grow_embeddings(llm, len(tokenizer))
    vision = VisionTower(vision_model, cfg.select_layer, cfg.select_feature)
    model = NvilaModel(cfg, vision, projector, llm, media_ids, end_ids).eval().to(device)
    return Checkpoint(model, tokenizer, template, stop_ids, root, records)


def _part_dtype(folder: Path, dtype: torch.dtype, keep_16bit: bool) -> torch.dtype:
    stored = stored_float_dtype(folder) if keep_16bit else None
    return stored if stored in (torch.bfloat16, torch.float16) else dtype


def _quantized_skeleton(module: nn.Module, part: str, quant: dict[str, Any] | None) -> None:
    """Swap in the quantized linears a quant_config.json lists for ``part``, before its tensors load."""
    if quant is not None:
        apply_quant_config(module, part, quant)


def _load_tokenizer(folder: Path, name: str | None) -> tuple[Any, str, list[int], dict[str, int], list[int]]:
    """Tokenizer with the media tokens appended, chat template (built-in ``name`` or the tokenizer's own),
    stop ids, media ids, "\\n" ids."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from e
    for token in MEDIA_SPECIAL_TOKENS:  # one at a time: ids follow the saved vocabulary in this order
        tok.add_tokens([token], special_tokens=True)
    if name:
        if name not in CHAT_TEMPLATES:
            raise CheckpointError(f"config.json names chat_template {name!r}; known: {sorted(CHAT_TEMPLATES)}")
        template = CHAT_TEMPLATES[name]
    elif tok.chat_template:
        template = tok.chat_template
    else:
        raise CheckpointError(f"{folder} has no chat template (tokenizer_config.json 'chat_template')")
    stop_ids = _stop_token_ids(tok, template, SENTINEL_TOKEN)
    media_ids = {"image": tok.convert_tokens_to_ids(IMAGE_TOKEN), "video": tok.convert_tokens_to_ids(VIDEO_TOKEN)}
    end_ids = tok("\n", add_special_tokens=False)["input_ids"]
    return tok, template, stop_ids, media_ids, end_ids


def _stop_token_ids(tok: Any, template: str, sentinel: str) -> list[int]:
    """The token the template puts right after an assistant message, plus the tokenizer's eos."""
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}]
    ids = tok(tok.apply_chat_template(chat, chat_template=template, tokenize=False), add_special_tokens=False)
    ids = ids["input_ids"]
    sentinel_id = tok.convert_tokens_to_ids(sentinel)
    stops = [ids[i + 1] for i, t in enumerate(ids[:-1]) if t == sentinel_id]
    if tok.eos_token_id is not None:
        stops.append(tok.eos_token_id)
    return sorted(set(stops))


def _grow_embeddings(llm: nn.Module, new_rows: int) -> int:
    """Append mean rows to the input embeddings (and an untied LM head) up to ``new_rows``.

    Returns the number of rows stored on disk. The reference resizes with "mean resizing" (mean of the
    old rows plus a negligible random term); we append the exact mean. A 16-bit head cannot hold it exactly,
    so it also keeps the float32 rows as ``float_tail`` (not saved) for float32 math on 16-bit weights.
    """
    emb = llm.get_input_embeddings().weight
    old = emb.shape[0]
    if new_rows <= old:
        return old
    head = llm.get_output_embeddings()
    tied = head is not None and head.weight is emb
    mean_in = emb.detach().float().mean(0)
    mean_out = head.weight.detach().float().mean(0) if head is not None and not tied else None
    llm.resize_token_embeddings(new_rows, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[old:] = mean_in
        if mean_out is not None:
            llm.get_output_embeddings().weight[old:] = mean_out
    head = llm.get_output_embeddings()
    if head is not None and head.weight.dtype != torch.float32:
        tail = (mean_in if mean_out is None else mean_out).expand(new_rows - old, -1).clone()
        head.register_buffer("float_tail", tail, persistent=False)
    return old
