"""Loading an official-layout NVILA checkpoint folder (or Hub id) into a :class:`Checkpoint`.

The folder layout is :mod:`nvila.formats.layout`; each part is read by :mod:`nvila.checkpoint.weights`.
Loading appends the media tokens to the tokenizer and grows the LLM's embeddings with mean rows, as the
reference does (saving removes those rows again). A folder with a ``quant_config.json`` is a quantized
checkpoint: the linears it lists are swapped for quantized modules before the strict load
(:mod:`nvila.checkpoint.quant`), which then also checks the dtype of every integer tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvila.base.errors import CheckpointError
from nvila.base.files import json_bytes, read_json
from nvila.base.hardware import release_freed_memory
from nvila.checkpoint.quant import apply_quant_config
from nvila.checkpoint.weights import (
    PartRecord,
    PartSource,
    load_weights,
    map_tensor,
    non_weight_files,
    read_rows,
    stored_float_dtype,
    weight_files,
)
from nvila.formats.config import NvilaConfig
from nvila.formats.hf import HF_ONLY_FILES, HF_PREFIX, HF_TYPES, folder_layout, llava_configs
from nvila.formats.layout import CONFIG, PARTS, PREPROCESSOR, QUANT_CONFIG, WEIGHT_SUFFIXES, official_name
from nvila.model.mixed import MappedEmbedding, PackedFp16Linear, packable
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


def check_layout(root: Path) -> str:
    """The folder's layout (``"llava"`` or ``"hf"``); raise CheckpointError naming every missing piece."""
    layout = folder_layout(root)
    if layout == "hf":
        problems = [] if weight_files(root) else ["model*.safetensors at the folder root"]
        if (root / QUANT_CONFIG).is_file():
            raise CheckpointError(f"{root} is an '-hf' folder with a {QUANT_CONFIG}; nvila reads quantized "
                                  "checkpoints in the llava layout only (as `nvila quantize` writes them)")
    else:
        problems = [] if (root / CONFIG).is_file() else [CONFIG]
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
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12] if root.is_dir() else []
        raise CheckpointError(
            f"{root} is not an NVILA checkpoint folder: missing {', '.join(problems)} (expected either the llava "
            "layout of the released NVILA checkpoints: config.json + llm/, vision_tower/, mm_projector/ sub-folders "
            "with config.json and *.safetensors each; or the '-hf' layout: a config.json with model_type "
            f"{' or '.join(sorted(HF_TYPES))} and *.safetensors at the root; found: {', '.join(found) or 'nothing'})"
        )
    return layout or "llava"


@dataclass
class Folder:
    """A checkpoint folder read as the llava layout, whichever layout it has on disk: the configs, the
    non-weight files of every part (written back verbatim by a save) and where each part's tensors are."""

    layout: str
    configs: dict[str, dict[str, Any]]             # "" (top level) and each part
    files: dict[str, dict[str, bytes]]             # "" (top level) and each part, llava names
    sources: dict[str, PartSource]
    tokenizer_dir: Path
    preprocessor: dict[str, Any] | None = None     # the vision tower's preprocessor_config.json, parsed
    quant: dict[str, Any] | None = None            # quant_config.json of a quantized folder, parsed


def read_folder(root: Path) -> Folder:
    """Read a checkpoint folder's configs and files (no tensors) in either layout."""
    layout = check_layout(root)
    if layout == "hf":
        return _read_hf(root)
    top = {CONFIG: (root / CONFIG).read_bytes()}
    quant = pre = None
    if (root / QUANT_CONFIG).is_file():
        quant = read_json(root / QUANT_CONFIG)
        top[QUANT_CONFIG] = (root / QUANT_CONFIG).read_bytes()
    if (root / "vision_tower" / PREPROCESSOR).is_file():
        pre = read_json(root / "vision_tower" / PREPROCESSOR)
    files = {"": top} | {part: non_weight_files(root / part) for part in PARTS}
    configs = {"": read_json(root / CONFIG)} | {part: read_json(root / part / CONFIG) for part in PARTS}
    return Folder(layout, configs, files, {part: PartSource.of(root / part) for part in PARTS}, root / "llm",
                  pre, quant)


def _read_hf(root: Path) -> Folder:
    configs = llava_configs(read_json(root / CONFIG))
    files: dict[str, dict[str, bytes]] = {part: {CONFIG: json_bytes(configs[part])} for part in PARTS}
    files[""] = {CONFIG: json_bytes(configs[""])}
    pre = None
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.name.endswith(WEIGHT_SUFFIXES) or p.name in HF_ONLY_FILES or p.suffix == ".py":
            continue
        if p.name == PREPROCESSOR:
            pre = read_json(p)
        files["vision_tower" if p.name == PREPROCESSOR else "llm"][p.name] = p.read_bytes()
    sources = {part: PartSource.of(root, HF_PREFIX[part]) for part in PARTS}
    return Folder("hf", configs, files, sources, root, pre)


@dataclass
class Checkpoint:
    """A loaded model with everything needed to run it and to save it back unchanged."""

    model: Any                      # nvila.model.nvila.NvilaModel
    tokenizer: Any
    chat_template: str
    stop_token_ids: list[int]
    root: Path
    records: dict[str, PartRecord]
    sources: dict[str, PartSource] = field(default_factory=dict)   # where each part's tensors are stored


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
    from transformers import AutoModelForCausalLM

    root = resolve(path_or_id)
    folder = read_folder(root)
    sub = folder.configs
    cfg = folder_config(folder)

    arch = (sub["vision_tower"].get("architectures") or ["SiglipVisionModel"])[0]
    classes = vision_classes()
    if arch not in classes:
        raise CheckpointError(f"vision tower architecture {arch!r} is not supported (known: {sorted(classes)})")
    vcfg, lcfg = transformers_config(folder, "vision_tower"), transformers_config(folder, "llm")
    vcfg._attn_implementation = lcfg._attn_implementation = "sdpa"
    records: dict[str, PartRecord] = {"": PartRecord(files=folder.files[""])}
    dtypes = {part: _part_dtype(folder.sources[part], dtype, keep_16bit) for part in PARTS}
    vision_model = _build(classes[arch], vcfg, dtypes["vision_tower"])
    projector = _build(lambda c: Projector(cfg.projector_type, cfg.mm_hidden_size, cfg.llm_hidden_size), None,
                       dtypes["mm_projector"])
    llm = _build(AutoModelForCausalLM, lcfg, dtypes["llm"])
    for part, module in (("vision_tower", vision_model), ("mm_projector", projector), ("llm", llm)):
        _quantized_skeleton(module, part, folder.quant)
        records[part] = load_weights(module, folder.sources[part], part)
        records[part].files = folder.files[part]

    tokenizer, template, stop_ids, media_ids, end_ids = load_tokenizer(folder.tokenizer_dir, cfg.chat_template, lcfg)
    records["llm"].vocab_rows = _grow_embeddings(llm, len(tokenizer))
    vision = VisionTower(vision_model, cfg.select_layer, cfg.select_feature)
    model = NvilaModel(cfg, vision, projector, llm, media_ids, end_ids).eval().to(device)
    return Checkpoint(model, tokenizer, template, stop_ids, root, records, folder.sources)


def folder_config(folder: Folder) -> NvilaConfig:
    """The typed configuration of a checkpoint folder (no tensors read)."""
    sub = folder.configs
    return NvilaConfig.from_official(sub[""], sub["vision_tower"], sub["mm_projector"], sub["llm"],
                                     folder.preprocessor)


def transformers_config(folder: Folder, part: str) -> Any:
    """The transformers config object of a part (read from its sub-folder, or from the "-hf" config's dict)."""
    from transformers import AutoConfig

    try:
        if folder.layout == "llava":
            return AutoConfig.from_pretrained(folder.sources[part].folder)
        d = dict(folder.configs[part])
        return AutoConfig.for_model(d.pop("model_type"), **d)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot parse the {part} config of {folder.sources[part].folder}: {e}") from e


def restore_16bit(ckpt: Checkpoint) -> int:
    """Cast every plain linear and embedding whose weight the checkpoint stores in bf16/fp16 back to that dtype
    (exact: it was loaded from it), for a model built in float32 because its parts mix dtypes (a quantized
    checkpoint: float32 scales next to 16-bit layers). Returns the number of modules cast."""
    parts = {"vision_tower": ckpt.model.vision.model, "mm_projector": ckpt.model.projector, "llm": ckpt.model.llm}
    count = 0
    for part, root in parts.items():
        stored = ckpt.records[part].dtypes
        modules = sorted(((n, m) for n, m in root.named_modules() if type(m) in (nn.Linear, nn.Embedding)),
                         key=lambda item: not isinstance(item[1], nn.Embedding))   # a tied head follows its table
        for name, module in modules:
            dtype = stored.get(official_name(root, part, f"{name}.weight"))
            if dtype in (torch.bfloat16, torch.float16) and module.weight.dtype != dtype:
                module.weight.data = module.weight.data.to(dtype)
                if getattr(module, "bias", None) is not None:
                    module.bias.data = module.bias.data.to(stored.get(official_name(root, part, f"{name}.bias"),
                                                                      dtype))
                count += 1
    return count


def map_input_embeddings(ckpt: Checkpoint, packed_max_rows: int) -> bool:
    """Leave the LLM's 16-bit input embedding table in the checkpoint file, memory-mapped
    (:class:`MappedEmbedding`), for float32 math on 16-bit weights; call it before
    :func:`nvila.model.mixed.fp32_math_on_16bit_weights`. A tied LM head that would be packed is packed now,
    from the file block by block (:class:`PackedFp16Linear`), so the in-memory table is freed before any
    packed copy exists: the model never holds the table twice. Nothing changes (False) when the table is not
    stored in the dtype it was loaded in, a tied head cannot be packed (it multiplies the in-memory table), or
    the file's rows differ from the loaded ones."""
    llm = ckpt.model.llm
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if type(emb) is not nn.Embedding or emb.weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if tied and (type(head) is not nn.Linear or not packable(head.weight)):
        return False
    source = ckpt.sources.get("llm")
    if source is None:
        return False
    rows = ckpt.records["llm"].vocab_rows or emb.weight.shape[0]
    name = next(n for n, m in llm.named_modules() if m is emb)
    key = official_name(llm, "llm", f"{name}.weight")
    table = map_tensor(source, key)
    if table is None or table.dtype != emb.weight.dtype or tuple(table.shape) != (rows, emb.weight.shape[1]):
        return False
    every = max(1, rows // 64)
    if not torch.equal(table[::every], emb.weight[:rows:every]):
        return False                                 # not the rows that were loaded (a changed file)
    tail = emb.weight.detach()[rows:].clone()
    if tied:
        if tail.shape[0] and getattr(head, "float_tail", None) is None:   # appended rows: not in the file
            head.float_tail = tail.float()
        head.weight = nn.Parameter(table, requires_grad=False)          # the in-memory table's last holder
        llm.set_output_embeddings(PackedFp16Linear(head, packed_max_rows,
                                                   read_rows=lambda a, b: read_rows(source, key, a, b)))
    llm.set_input_embeddings(MappedEmbedding(table, tail, torch.float32))
    del emb, head
    release_freed_memory()
    return True


def _part_dtype(source: PartSource, dtype: torch.dtype, keep_16bit: bool) -> torch.dtype:
    stored = stored_float_dtype(source) if keep_16bit else None
    return stored if stored in (torch.bfloat16, torch.float16) else dtype


def _quantized_skeleton(module: nn.Module, part: str, quant: dict[str, Any] | None) -> None:
    """Swap in the quantized linears a quant_config.json lists for ``part``, before its tensors load."""
    if quant is not None:
        apply_quant_config(module, part, quant)


def load_tokenizer(folder: Path, name: str | None, config: Any = None
                   ) -> tuple[Any, str, list[int], dict[str, int], list[int]]:
    """Tokenizer with the media tokens appended, chat template (built-in ``name`` or the tokenizer's own),
    stop ids, media ids, "\\n" ids. ``config``: the LLM's config object (spares transformers reading the
    folder's config.json, which in an "-hf" folder is not a tokenizer's model config)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, use_fast=True, config=config)
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
