"""Official checkpoint layout <-> our modules.

    ROOT/config.json                 LLaVA-style top-level config (model_type llava_llama)
    ROOT/llm/                        transformers causal LM + tokenizer files
    ROOT/vision_tower/               SiglipVisionModel + preprocessor_config.json
    ROOT/mm_projector/               projector weights, keys layers.{i}.*

Weights are read and written with safetensors only. Every tensor is checked (missing, unexpected, shape)
before anything is copied, and errors name the part and the tensor. Loading appends the media tokens to
the tokenizer and grows the LLM's embeddings with mean rows, as the reference does; saving removes those
rows again and writes each tensor back in the dtype it was stored in, so a load/save round trip is
bit-identical. Non-weight files (configs, tokenizer) are written back verbatim.

A folder with a top-level ``quant_config.json`` is a quantized checkpoint (written by :mod:`nvila.quant`):
the linears it lists are swapped for quantized modules before the strict load, which then also checks
the dtype of every integer tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nvila.errors import CheckpointError, NvilaError

PARTS = ("llm", "vision_tower", "mm_projector")
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")
# Official key prefix of each part's tensors -> prefix inside our module.
KEY_PREFIX = {"vision_tower": ("vision_model.", ""), "mm_projector": ("", ""), "llm": ("", "")}
# Vision classes whose official tensor names have no "vision_model." prefix (they are the whole model).
UNPREFIXED_VISION = ("Dinov2Model",)
QUANT_CONFIG = "quant_config.json"
# Integer dtypes of quantized tensors -> their safetensors names (a float file tensor must not fill them).
INT_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32"}
MAX_SHARD_BYTES = 5 * 1024**3
REOPEN_BYTES = 256 * 1024**2


@dataclass
class PartRecord:
    """What was read from one sub-folder, kept so saving can reproduce it exactly."""

    dtypes: dict[str, torch.dtype] = field(default_factory=dict)   # official key -> stored dtype
    files: dict[str, bytes] = field(default_factory=dict)          # non-weight files, verbatim
    vocab_rows: int | None = None                                  # llm: embedding rows on disk


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint folder, ``nvila:nano-base`` (the untrained NVILA-Nano assembly, built once), or a
    Hub id downloaded (or found in the cache) with huggingface_hub."""
    if str(path_or_id) == "nvila:nano-base":
        from nvila.nano import build

        return build()
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
    if not (root / "config.json").is_file():
        problems.append("config.json")
    for part in PARTS:
        d = root / part
        if not d.is_dir():
            problems.append(f"{part}/")
            continue
        if not (d / "config.json").is_file():
            problems.append(f"{part}/config.json")
        if not weight_files(d):
            problems.append(f"{part}/model.safetensors")
    if problems:
        raise CheckpointError(
            f"{root} is not an NVILA checkpoint folder: missing {', '.join(problems)} "
            "(expected config.json + llm/, vision_tower/, mm_projector/ sub-folders with config.json and "
            "*.safetensors each)"
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a sub-folder (single file or the shards named by the index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} has no 'weight_map'") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing weight shards {missing} listed in {index.name}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files and any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder} has only PyTorch .bin weights; nvila reads safetensors only")
    return files


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file; a broken one is a CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def non_weight_files(folder: Path) -> dict[str, bytes]:
    """Every regular file of a sub-folder that is not a weight file, for verbatim write-back."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
    }


def key_prefix(module: nn.Module, part: str) -> tuple[str, str]:
    """(official key prefix, module key prefix) of a part's tensors."""
    if part == "vision_tower" and type(module).__name__ in UNPREFIXED_VISION:
        return "", ""
    return KEY_PREFIX[part]


def load_weights(module: nn.Module, folder: Path, part: str) -> PartRecord:
    """Copy a part's safetensors into ``module`` (strictly) and record stored dtypes.

    Two passes: shapes are checked from the headers first, then tensors are copied one at a time, so
    peak memory stays at the model plus one tensor.
    """
    expected = module.state_dict()
    src_prefix, dst_prefix = key_prefix(module, part)
    record = PartRecord(files=non_weight_files(folder))
    where: dict[str, tuple[Path, str]] = {}
    bad_shapes, bad_dtypes, unexpected = [], [], []
    files = weight_files(folder)
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = dst_prefix + key[len(src_prefix):] if key.startswith(src_prefix) else None
                    if name is None or name not in expected:
                        unexpected.append(key)
                        continue
                    info = f.get_slice(key)
                    shape, want = tuple(info.get_shape()), expected[name]
                    if shape != tuple(want.shape):
                        bad_shapes.append(f"{key}: file {shape} vs model {tuple(want.shape)}")
                    if want.dtype in INT_DTYPES and info.get_dtype() != INT_DTYPES[want.dtype]:
                        bad_dtypes.append(f"{key}: file {info.get_dtype()} vs model {INT_DTYPES[want.dtype]}")
                    where[name] = (file, key)
        missing = [k for k in expected if k not in where and not _is_tied(module, k)]
        _raise_mismatch(folder, part, missing, unexpected, bad_shapes, bad_dtypes)
        with torch.no_grad():
            for file in files:
                _copy_from(file, [(n, k) for n, (src, k) in where.items() if src == file], expected, record)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"weights in {folder} are not readable safetensors: {e}") from e
    return record


def _copy_from(file: Path, items: list[tuple[str, str]], params: dict[str, torch.Tensor], record: PartRecord) -> None:
    """Copy tensors out of one safetensors file.

    The file is memory-mapped, and mapped pages count towards the process's resident memory until the
    mapping closes; reopening it every ``REOPEN_BYTES`` keeps peak RSS near the model's own size.
    """
    done = 0
    while done < len(items):
        copied = 0
        with safe_open(str(file), framework="pt") as f:
            while done < len(items) and copied < REOPEN_BYTES:
                name, key = items[done]
                t = f.get_tensor(key)
                record.dtypes[key] = t.dtype
                params[name].copy_(t)
                copied += t.numel() * t.element_size()
                done += 1


def _is_tied(module: nn.Module, key: str) -> bool:
    """True for an LM head that shares the input embeddings (stored once, as the embeddings)."""
    cfg = getattr(module, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) if cfg is not None else False
    return tied and key == "lm_head.weight"


def _raise_mismatch(folder: Path, part: str, missing: list[str], unexpected: list[str], shapes: list[str],
                    dtypes: list[str] | None = None) -> None:
    dtypes = dtypes or []
    if not (missing or unexpected or shapes or dtypes):
        return
    msg = [f"{folder} does not match its config.json ({part}):"]
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatch", shapes),
                         ("dtype mismatch", dtypes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            msg.append(f"  {label}: {', '.join(items[:5])}{more}")
    raise CheckpointError("\n".join(msg))


def part_state(module: nn.Module, part: str, record: PartRecord) -> dict[str, torch.Tensor]:
    """Our module's tensors under their official names, cast to the dtype they were stored in."""
    src_prefix, dst_prefix = key_prefix(module, part)
    out = {}
    for name, t in module.state_dict().items():
        if _is_tied(module, name):
            continue
        key = src_prefix + name[len(dst_prefix):]
        dtype = record.dtypes.get(key, t.dtype) if t.is_floating_point() else t.dtype
        if record.vocab_rows is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = t[: record.vocab_rows]      # drop the rows appended for the media tokens
        out[key] = t.detach().to("cpu", dtype).contiguous()
    return out


def save_part(state: dict[str, torch.Tensor], folder: Path, files: dict[str, bytes]) -> None:
    """Write one sub-folder: non-weight files verbatim + safetensors (sharded above 5 GiB)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= MAX_SHARD_BYTES:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=MAX_SHARD_BYTES)
    for shard_name, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / shard_name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def atomic_dir(out: Path) -> Path:
    """A temporary sibling folder to write into before renaming to ``out``."""
    if out.exists() and not out.is_dir():
        raise NvilaError(f"output path {out} is a file; choose a folder path")
    if out.exists() and any(out.iterdir()):
        raise NvilaError(f"output folder {out} exists and is not empty; choose a new path")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=False)
    return tmp


def commit_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder from :func:`atomic_dir` into place."""
    if out.exists():
        out.rmdir()  # atomic_dir guaranteed it is empty
    tmp.rename(out)


# ---- whole checkpoints ------------------------------------------------------------------------------


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


def load_checkpoint(path_or_id: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Checkpoint:
    """Load an official-layout NVILA checkpoint (local folder or Hub id)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nvila.config import NvilaConfig
    from nvila.model.nvila import NvilaModel
    from nvila.model.projector import Projector
    from nvila.model.vision import VisionTower

    root = resolve(path_or_id)
    check_layout(root)
    raw = read_json(root / "config.json")
    root_record = PartRecord(files={"config.json": (root / "config.json").read_bytes()})
    quant = None
    if (root / QUANT_CONFIG).is_file():
        quant = read_json(root / QUANT_CONFIG)
        root_record.files[QUANT_CONFIG] = (root / QUANT_CONFIG).read_bytes()
    sub = {part: read_json(root / part / "config.json") for part in PARTS}
    pre_path = root / "vision_tower" / "preprocessor_config.json"
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
    vision_model = _build(classes[arch], vcfg, dtype)
    _quantized_skeleton(vision_model, "vision_tower", quant)
    records["vision_tower"] = load_weights(vision_model, root / "vision_tower", "vision_tower")
    projector = _build(lambda c: Projector(cfg.projector_type, cfg.mm_hidden_size, cfg.llm_hidden_size), None, dtype)
    _quantized_skeleton(projector, "mm_projector", quant)
    records["mm_projector"] = load_weights(projector, root / "mm_projector", "mm_projector")
    llm = _build(AutoModelForCausalLM, lcfg, dtype)
    _quantized_skeleton(llm, "llm", quant)
    records["llm"] = load_weights(llm, root / "llm", "llm")

    tokenizer, template, stop_ids, media_ids, end_ids = _load_tokenizer(root / "llm", raw)
    records["llm"].vocab_rows = _grow_embeddings(llm, len(tokenizer))
    vision = VisionTower(vision_model, cfg.select_layer, cfg.select_feature)
    model = NvilaModel(cfg, vision, projector, llm, media_ids, end_ids).eval().to(device)
    return Checkpoint(model, tokenizer, template, stop_ids, root, records)


def _quantized_skeleton(module: nn.Module, part: str, quant: dict[str, Any] | None) -> None:
    """Swap in the quantized linears a quant_config.json lists for ``part``, before its tensors load."""
    if quant is not None:
        from nvila.quant.config import apply_quant_config  # the quant layer is needed only for such folders

        apply_quant_config(module, part, quant)


def _load_tokenizer(folder: Path, raw: dict[str, Any]) -> tuple[Any, str, list[int], dict[str, int], list[int]]:
    """Tokenizer with the media tokens appended, chat template, stop ids, media ids, "\\n" ids."""
    from transformers import AutoTokenizer

    from nvila.processing.chat import CHAT_TEMPLATES, IMAGE_TOKEN, MEDIA_SPECIAL_TOKENS, SENTINEL_TOKEN, VIDEO_TOKEN

    try:
        tok = AutoTokenizer.from_pretrained(folder, use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from e
    for token in MEDIA_SPECIAL_TOKENS:  # one at a time: ids follow the saved vocabulary in this order
        tok.add_tokens([token], special_tokens=True)
    name = raw.get("chat_template")
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
    old rows plus a negligible random term); we append the exact mean.
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
    return old


def save_checkpoint(ckpt: Checkpoint, out: str | os.PathLike) -> Path:
    """Write ``ckpt`` in the official layout (atomically: temp folder, then rename)."""
    import shutil

    out = Path(out)
    tmp = atomic_dir(out)
    try:
        model = ckpt.model
        original = ckpt.records.get("", PartRecord()).files.get("config.json")
        unchanged = original is not None and json.loads(original) == model.cfg.raw
        (tmp / "config.json").write_bytes(original if unchanged else (json.dumps(model.cfg.raw, indent=2) + "\n").encode())
        for name, data in ckpt.records.get("", PartRecord()).files.items():
            if name != "config.json":  # quant_config.json of a quantized model
                (tmp / name).write_bytes(data)
        modules = {"llm": model.llm, "vision_tower": model.vision.model, "mm_projector": model.projector}
        for part, module in modules.items():
            record = ckpt.records[part]
            save_part(part_state(module, part, record), tmp / part, record.files)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
