#!/usr/bin/env python3
"""Check a converted "-hf" NVILA / NVILA-Lite folder against SGLang's own model classes, loader and processor.

usage (three modes; the file is longer than 500 lines so that it stays one file to copy into any SGLang env):

    # 1. in an SGLang environment (not the project's .venv): the strict load check, optionally the feature check
    python scripts/sglang_check.py HF_FOLDER [--quiet] [--preset NAME]
                                   [--features IMAGE ... --golden GOLDEN.npz [--feature-dtype float32|bfloat16]]
    # 2. in the project's .venv (nvila, no sglang): the golden visual tokens the feature check compares with
    .venv/bin/python scripts/sglang_check.py --make-golden LLAVA_OR_HF_FOLDER --features IMAGE ... --golden OUT.npz
    # 3. in the project's .venv: one result JSON with provenance from the JSON objects mode 1 printed
    .venv/bin/python scripts/sglang_check.py --write-report OUT.json RESULT.json ...

An SGLang environment that works on a CPU-only machine (what `make sglang-check` builds, ~11 GB):

    python3 -m venv .venv-sglang && .venv-sglang/bin/pip install sglang==0.5.23

The load check, on the CPU, without a GPU:
  * reads HF_FOLDER/config.json; model_type ``nvila`` -> sglang.srt.models.nvila.NVILAForConditionalGeneration,
    ``nvila_lite`` -> sglang.srt.models.nvila_lite.NVILALiteForConditionalGeneration (SGLang's server picks the
    class from ``architectures``, so that must name the same class); the config object is SGLang's own
    NVILAConfig / NVILALiteConfig built from text_config, vision_config, image_token_id, video_token_id;
  * builds the module in the config's dtype (default bfloat16) after a world-size-1 gloo process group, as
    SGLang's own layer unit tests do (sglang.test.layer_ut_utils.init_single_process_dist);
  * fills every parameter with NaN, then feeds every tensor of every root ``*.safetensors`` through the
    module's own ``load_weights``, one tensor at a time, and checks strictly:
      - no KeyError (a key SGLang has no parameter for)           -> "unexpected"
      - no shape assertion / loader error                          -> "errors"
      - no key that SGLang's loader silently drops (e.g. an extra LLM layer or an unknown llm.* name, which
        Qwen2ForCausalLM only logs)                                -> "unexpected"
      - every parameter of the SGLang module, LLM included, was written in full (no NaN left; a fused
        qkv_proj / gate_up_proj missing one of its shards counts) -> "missing"
      - model.safetensors.index.json, if present, names exactly the tensors and files found.
    ``llm.lm_head.weight`` with ``tie_word_embeddings: true`` is dropped by SGLang too; that is listed under
    "ignored" and is not a failure.

The feature check (``--features``, after a passing load), what SGLang's server does with an image request:
  * sets up the server's tokenizer side as sglang.srt.managers.tokenizer_manager does: ServerArgs(device="cpu")
    published for the "tokenizer" role, ModelConfig.from_server_args (it loads the folder's own
    configuration_nvila.py through auto_map), SGLang's get_processor (the folder's processing_nvila*.py) and
    get_mm_processor (NVILAMultimodalProcessor, chosen from ``architectures``);
  * checks that SGLang's class built from that server config has the same parameters (names, shapes) as the
    one built from SGLang's own NVILAConfig (on the meta device, no memory);
  * the chat endpoint: SGLang's TemplateManager and process_content_for_template_format (what
    serving_chat._apply_jinja_template runs) on an OpenAI-style message (image_url part, then PROMPT) must keep
    the image and render the processor's own prompt text (SGLang drops the media of a template it reads as
    'string' content format);
  * per image: one user message (the image, then PROMPT) rendered by the folder's processor, run through
    NVILAMultimodalProcessor.process_mm_data_async (SGLang's image loading, processor call, item split and
    offsets); its input_ids, pixels and block_sizes must equal the folder processor's own output;
  * casts the loaded vision tower and projector to ``--feature-dtype`` (float32: the weights are exact) and
    runs SGLang's ``get_image_feature`` on those items, as the server does on an embedding-cache miss;
  * compares with the golden visual tokens nvila computed (mode 2, ``Model.media_rows``): the row count must
    equal the image tokens in input_ids and SGLang's item offsets, the prompt length nvila's fused length; then
    max abs error, the error relative to max |golden|, cosine (all values, and the worst row) within TOLERANCE.

Output: a human summary on stderr and one JSON object on stdout:
    {"ok", "loaded", "missing", "unexpected", "errors", "ignored", "sglang_version", ..., "features": {...}}
Exit status: 0 all checks passed; 1 a check failed (or the folder is not an "-hf" folder);
2 SGLang cannot be imported / its model classes or server-side processor cannot be built here (reason printed).

Two things this script does to SGLang's environment, and nothing else (SGLang's code is not patched):
  1. ``sys.modules`` stub for ``vllm`` / ``vllm._custom_ops`` -- only when vllm is not installed and CUDA is
     not available. Without CUDA (and without SGLANG_USE_CPU_ENGINE=1) SGLang's RotaryEmbedding.__init__
     (sglang/srt/layers/rotary_embedding/base.py) does ``from vllm._custom_ops import rotary_embedding`` as its
     fallback kernel. That GPU extension is only called in forward(), never by load_weights or by the vision
     tower / projector; the stub's function raises if it is ever called. The alternative,
     SGLANG_USE_CPU_ENGINE=1, needs the CPU build of sgl_kernel, which is not on PyPI (the PyPI sglang-kernel
     wheel holds only CUDA .so files that need libcuda.so.1), so importing sglang.srt.mem_cache.memory_pool
     fails with it.
  2. Each parameter's ``weight_loader`` attribute is wrapped (on this module instance only) to record which
     parameter each checkpoint tensor was written to; the wrapped loader is called unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import itertools
import json
import logging
import os
import socket
import sys
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

CLASSES = {
    "nvila": ("sglang.srt.models.nvila", "NVILAForConditionalGeneration", "NVILAConfig"),
    "nvila_lite": ("sglang.srt.models.nvila_lite", "NVILALiteForConditionalGeneration", "NVILALiteConfig"),
}
VENV_HINT = ("python3 -m venv .venv-sglang && .venv-sglang/bin/pip install sglang==0.5.23; then run "
             ".venv-sglang/bin/python scripts/sglang_check.py HF_FOLDER (or `make sglang-check`)")
FUSED_SHARDS = {"qkv_proj": {"q", "k", "v"}, "gate_up_proj": {0, 1}}
PROMPT = "Describe the image."
# Per feature dtype: the largest max-abs error relative to max |golden|, the smallest cosine of any row.
# float32: the same modules (transformers SigLIP, torch layers) on the same weights; measured bit-identical on
# the 2-layer random checkpoints, the margin is for other CPUs' kernels. bfloat16 (SGLang's serving dtype)
# against nvila's float32: measured rel_err <= 0.008, min row cosine >= 0.99996 with 2 layers.
TOLERANCE = {"float32": {"rel_err": 1e-4, "min_row_cosine": 0.99999},
             "bfloat16": {"rel_err": 0.05, "min_row_cosine": 0.999}}


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr)


def finish(summary: dict, code: int) -> None:
    print(json.dumps(summary, indent=2, default=str))
    sys.exit(code)


def not_importable(summary: dict, reason: str) -> None:
    summary.update(ok=False, reason=reason, hint=VENV_HINT)
    print(f"sglang_check: SGLang is not usable here: {reason}\n  to get it: {VENV_HINT}", file=sys.stderr)
    finish(summary, 2)


def read_config(folder: Path, summary: dict) -> dict:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        summary.update(ok=False, reason=f"cannot read {path}: {e}")
        print(f"sglang_check: {summary['reason']}", file=sys.stderr)
        finish(summary, 1)
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt not in CLASSES:
        summary.update(ok=False, reason=f"{path}: model_type {mt!r} is not an '-hf' NVILA type "
                                        f"({' / '.join(CLASSES)})")
        print(f"sglang_check: {summary['reason']}", file=sys.stderr)
        finish(summary, 1)
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub_vllm_custom_ops() -> bool:
    """See the module docstring, point 1. Returns whether the stub was installed."""
    import torch

    if importlib.util.find_spec("vllm") is not None or torch.cuda.is_available():
        return False

    def rotary_embedding(*_a, **_k):
        raise RuntimeError("sglang_check: vllm._custom_ops is a stub (CPU-only weight check); forward() "
                           "cannot run here")

    vllm = types.ModuleType("vllm")
    ops = types.ModuleType("vllm._custom_ops")
    ops.rotary_embedding = rotary_embedding
    vllm._custom_ops = ops
    vllm.__sglang_check_stub__ = True
    sys.modules["vllm"] = vllm
    sys.modules["vllm._custom_ops"] = ops
    return True


def setup_sglang(model_type: str, summary: dict):
    """Import SGLang, set up a world-size-1 CPU process group; return (model class, config class)."""
    try:
        import sglang
    except Exception as e:  # noqa: BLE001 -- ImportError, or anything its __init__ raises
        not_importable(summary, f"import sglang failed: {type(e).__name__}: {e}")
    summary["sglang_version"] = getattr(sglang, "__version__", "unknown")
    import torch

    summary["torch_version"] = torch.__version__
    summary["notes"].append("vllm._custom_ops stubbed (CPU, no CUDA)" if stub_vllm_custom_ops()
                            else "no stub needed")
    warnings.filterwarnings("ignore", message=r"Only CUDA.*support")  # AWQ / GGUF notices at import
    module_name, cls_name, cfg_name = CLASSES[model_type]
    step = f"import {module_name}"
    try:
        mod = importlib.import_module(module_name)
        step = "init_single_process_dist (gloo, world size 1)"
        from sglang.test.layer_ut_utils import init_single_process_dist

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        init_single_process_dist(master_port=int(os.environ["MASTER_PORT"]), backend="gloo")
    except Exception as e:  # noqa: BLE001 -- any failure here means "not usable on this machine"
        tb = traceback.format_exc(limit=-3)
        not_importable(summary, f"{step} failed: {type(e).__name__}: {e}\n{tb}")
    return getattr(mod, cls_name), getattr(mod, cfg_name)


def torch_dtype(cfg: dict):
    import torch

    name = cfg.get("torch_dtype") or cfg.get("dtype") or cfg["text_config"].get("torch_dtype") or "bfloat16"
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    return dt if isinstance(dt, torch.dtype) else torch.bfloat16


# ---- the load check (SGLang environment) -----------------------------------------------------------------
def preflight(folder: Path, cfg: dict, summary: dict, q: bool) -> list[Path]:
    """Config fields SGLang reads, and the root safetensors files; exits 1 when loading cannot start."""
    mt = cfg["model_type"]
    cls_name = CLASSES[mt][1]
    for k in ("text_config", "vision_config"):
        if not isinstance(cfg.get(k), dict):
            summary["errors"].append(f"config.json: {k} is missing or not a dict")
    for k in ("image_token_id", "video_token_id"):
        if not isinstance(cfg.get(k), int):
            summary["errors"].append(f"config.json: {k} is missing (SGLang's config would default it to -1)")
    archs = cfg.get("architectures") or []
    if not archs or archs[0] != cls_name:
        summary["errors"].append(f"config.json: architectures {archs!r} but model_type {mt!r}; SGLang's server "
                                 f"picks the class from architectures[0], expected {cls_name!r}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        summary["errors"].append(f"no *.safetensors at the root of {folder}")
    if any(e.startswith(("config.json: text_config", "config.json: vision_config", "no *.safetensors"))
           for e in summary["errors"]):
        say("sglang_check: FAILED before loading:\n  " + "\n  ".join(summary["errors"]), q)
        finish(summary, 1)
    summary["layers"] = {"llm": cfg["text_config"].get("num_hidden_layers"),
                         "vision": cfg["vision_config"].get("num_hidden_layers")}
    return files


def sglang_config(cfg: dict, config_cls):
    return config_cls(text_config=cfg["text_config"], vision_config=cfg["vision_config"],
                      image_token_id=cfg.get("image_token_id"), video_token_id=cfg.get("video_token_id"))


def build_model(cfg: dict, model_cls, config_cls, summary: dict, q: bool):
    """SGLang's module in the config's dtype, on the CPU."""
    import torch

    dtype = torch_dtype(cfg)
    summary["dtype"] = str(dtype).replace("torch.", "")
    try:
        sg_cfg = sglang_config(cfg, config_cls)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("cpu"):
                return model_cls(sg_cfg)
        finally:
            torch.set_default_dtype(prev)
    except Exception as e:  # noqa: BLE001 -- reported as a failed check
        summary["errors"].append(f"building {model_cls.__name__} from config.json failed: {type(e).__name__}: {e}")
        say("sglang_check: FAILED: " + summary["errors"][-1] + "\n" + traceback.format_exc(limit=-4), q)
        finish(summary, 1)


class Tracker:
    """NaN-fills the module and records which parameter (and shard) each checkpoint tensor lands in."""

    def __init__(self, model) -> None:
        import torch
        from sglang.srt.model_loader import weight_utils

        self.params = dict(model.named_parameters())
        name_of = {id(p): n for n, p in self.params.items()}
        self.writes: dict[str, set] = {n: set() for n in self.params}
        self.current: list[str] = []  # param names written while loading the current key

        def wrap(orig):
            def loader(param, loaded_weight, *shard, **kw):
                out = (orig or weight_utils.default_weight_loader)(param, loaded_weight, *shard, **kw)
                n = name_of.get(id(param), "?")  # recorded only once the loader has accepted the tensor
                self.writes.setdefault(n, set()).add(shard[0] if shard else kw.get("loaded_shard_id", "*"))
                self.current.append(n)
                return out
            return loader

        with torch.no_grad():
            for p in self.params.values():
                if p.is_floating_point():
                    p.fill_(float("nan"))
                p.weight_loader = wrap(getattr(p, "weight_loader", None))


class Grab(logging.Handler):
    """Qwen2ForCausalLM only logs names it has no parameter for; this collects those messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.msgs: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.msgs.append(record.getMessage())


def feed(model, files: list[Path], tied: bool, tracker: Tracker, summary: dict) -> dict[str, str]:
    """Every tensor of ``files`` through ``model.load_weights``, one at a time; returns {key: file name}."""
    from safetensors import safe_open

    cls_name = type(model).__name__
    grab = Grab()
    logging.getLogger("sglang").addHandler(grab)
    seen: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 -- safe_open, not a dict
                if key in seen:
                    summary["errors"].append(f"{key}: in both {seen[key]} and {f.name}")
                    continue
                seen[key] = f.name
                tensor = sf.get_tensor(key)
                tracker.current.clear()
                grab.msgs.clear()
                try:
                    model.load_weights([(key, tensor)])
                except KeyError as e:
                    summary["unexpected"].append(key)
                    summary["errors"].append(f"{key}: SGLang's {cls_name}.load_weights raised KeyError {e} "
                                             f"(no such parameter; shape {tuple(tensor.shape)})")
                    continue
                except Exception as e:  # noqa: BLE001 -- shape assertion or a loader's own check
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    summary["errors"].append(f"{key}: {type(e).__name__}: {msg} "
                                             f"(checkpoint shape {tuple(tensor.shape)}, {tensor.dtype})")
                    continue
                if tracker.current:
                    summary["loaded"] += 1
                elif tied and key == "llm.lm_head.weight":
                    summary["ignored"].append(key)
                    summary["notes"].append("llm.lm_head.weight dropped by SGLang: tie_word_embeddings is true")
                else:
                    summary["unexpected"].append(key)
                    why = "; ".join(grab.msgs) or "silently skipped by SGLang's loader"
                    summary["errors"].append(f"{key}: loaded into nothing ({why})")
    logging.getLogger("sglang").removeHandler(grab)
    return seen


def completeness(tracker: Tracker, cls_name: str, summary: dict) -> None:
    import torch

    with torch.no_grad():
        for n, p in tracker.params.items():
            unwritten = bool(p.is_floating_point() and torch.isnan(p).any().item())
            if not tracker.writes.get(n):
                summary["missing"].append(n)
                continue
            short = n.rsplit(".", 2)[-2] if n.count(".") >= 2 else ""
            want = FUSED_SHARDS.get(short)
            got = tracker.writes[n] - {"*"}
            if want and got != want:
                summary["missing"].append(f"{n} (shards loaded {sorted(map(str, got))}, "
                                          f"need {sorted(map(str, want))})")
            elif unwritten:
                summary["missing"].append(f"{n} (partly unwritten: NaN left after loading)")
    if summary["missing"]:
        summary["errors"].append(f"{len(summary['missing'])} parameter(s) of {cls_name} not loaded")


def check_index(folder: Path, seen: dict[str, str], summary: dict) -> None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        wm = json.loads(index.read_text())["weight_map"]
        if set(wm) != set(seen):
            a, b = sorted(set(wm) - set(seen)), sorted(set(seen) - set(wm))
            summary["errors"].append(f"index.json weight_map differs from the tensors found: "
                                     f"only in index {a[:10]}, only in files {b[:10]}")
        elif any(wm[k] != seen[k] for k in wm):
            summary["errors"].append("index.json weight_map names other files than the ones holding the keys")
    except (OSError, ValueError, KeyError, TypeError) as e:
        summary["errors"].append(f"unreadable {index.name}: {e}")


def say_load(summary: dict, cls_name: str, q: bool) -> None:
    version = summary["sglang_version"]
    if summary["load_ok"]:
        say(f"sglang_check: load OK  {cls_name} (sglang {version}): {summary['loaded']} tensors loaded, all "
            f"{summary['params_total']} parameters written"
            + (f"; ignored {summary['ignored']}" if summary["ignored"] else ""), q)
        return
    say(f"sglang_check: load FAILED  {cls_name} (sglang {version}): "
        f"{summary['loaded']}/{summary['tensors_in_checkpoint']} tensors loaded", q)
    for e in summary["errors"][:40]:
        say("  - " + e, q)
    for m in summary["missing"][:40]:
        say("  - missing: " + m, q)
    if len(summary["missing"]) > 40:
        say(f"  - ... {len(summary['missing']) - 40} more missing", q)


def load_check(folder: Path, cfg: dict, summary: dict, q: bool):
    """The strict load; returns (SGLang's loaded module, its class, its config class)."""
    files = preflight(folder, cfg, summary, q)
    model_cls, config_cls = setup_sglang(cfg["model_type"], summary)
    summary["weight_loader_path"] = ("v2" if os.environ.get("SGLANG_ENABLE_WEIGHT_LOADER_V2", "").lower()
                                     in ("1", "true") else "legacy")
    model = build_model(cfg, model_cls, config_cls, summary, q)
    tracker = Tracker(model)
    summary["params_total"] = len(tracker.params)
    seen = feed(model, files, bool(cfg["text_config"].get("tie_word_embeddings", False)), tracker, summary)
    completeness(tracker, model_cls.__name__, summary)
    check_index(folder, seen, summary)
    summary["tensors_in_checkpoint"] = len(seen)
    summary["load_ok"] = not summary["errors"] and not summary["missing"] and not summary["unexpected"]
    say_load(summary, model_cls.__name__, q)
    return model, model_cls, config_cls


# ---- the feature check (SGLang environment) --------------------------------------------------------------
def image_messages(path: Path) -> list[dict[str, Any]]:
    """The one prompt of both sides: a user message with the image, then PROMPT."""
    return [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": PROMPT}]}]


def server_side(folder: Path):
    """SGLang's tokenizer-manager setup for ``folder``: (ModelConfig, the HF processor, NVILAMultimodalProcessor)."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
    from sglang.srt.managers.tokenizer_manager import determine_tensor_transport_mode, get_processor_wrapper
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    server_args = ServerArgs(model_path=str(folder), trust_remote_code=True, device="cpu")
    publish(server_args, role="tokenizer")
    model_config = ModelConfig.from_server_args(server_args)
    import_processors("sglang.srt.multimodal.processors")
    processor = get_processor_wrapper()
    mm = get_mm_processor(model_config.hf_config, server_args, processor, determine_tensor_transport_mode(),
                          model_config=model_config)
    return model_config, processor, mm


def same_parameters(model_cls, hf_config, sg_config) -> list[str]:
    """Differences between SGLang's class built from the server's config and from SGLang's own config class."""
    import torch

    with torch.device("meta"):
        a = {n: tuple(p.shape) for n, p in model_cls(hf_config).named_parameters()}
        b = {n: tuple(p.shape) for n, p in model_cls(sg_config).named_parameters()}
    return [f"{n}: server config {a.get(n)}, SGLang config {b.get(n)}" for n in sorted(set(a) | set(b))
            if a.get(n) != b.get(n)]


def sglang_items(mm, text: str, image: Path):
    """SGLang's own request path for one image: (MultimodalDataItems, input_ids)."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    req = GenerateReqInput(text=text, image_data=[str(image.resolve())])
    out = asyncio.run(mm.process_mm_data_async(image_data=req.image_data, audio_data=None, input_text=text,
                                               request_obj=req))
    return out.mm_items, list(out.input_ids)


def chat_endpoint(model_config, processor, folder: Path, image: Path) -> dict:
    """What SGLang's OpenAI chat endpoint makes of one user message (image_url part, then PROMPT): its
    TemplateManager picks the template and content format, process_content_for_template_format collects the
    image, the tokenizer renders (serving_chat._apply_jinja_template). The text must be the processor's own."""
    from sglang.srt.parser.jinja_template_utils import process_content_for_template_format
    from sglang.srt.parser.template_manager import TemplateManager
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer_from_processor

    tokenizer = get_tokenizer_from_processor(processor)
    templates = TemplateManager()
    templates.load_chat_template(types.SimpleNamespace(processor=processor, tokenizer=tokenizer,
                                                       model_config=model_config), None, str(folder))
    fmt = templates.jinja_template_content_format
    r: dict[str, Any] = {"conversation_template": templates.chat_template_name, "content_format": fmt,
                         "problems": []}
    if templates.chat_template_name is not None:
        r["problems"].append(f"SGLang picks its own conversation template {templates.chat_template_name!r} for "
                             "this model path instead of the folder's chat template")
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image.resolve())}},
                                           {"type": "text", "text": PROMPT}]}
    images: list = []
    rendered_message = process_content_for_template_format(message, fmt, images, [], [], [])
    r["images_collected"] = len(images)
    if not images:
        r["problems"].append(f"the image is dropped: SGLang reads the chat template as {fmt!r} content format (a "
                             "template that loops over message['content'] or names 'image' is read as 'openai'), "
                             "so the request reaches the model as text only")
    try:
        rendered = tokenizer.apply_chat_template([rendered_message], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 -- a template that cannot render the parts is the finding
        rendered = None
        r["problems"].append(f"the chat template cannot render SGLang's {fmt!r} content: {type(e).__name__}: {e}")
    expected = processor.apply_chat_template(image_messages(image), add_generation_prompt=True)
    r.update(prompt=rendered, expected_prompt=expected)
    if rendered is not None and rendered != expected:
        r["problems"].append("SGLang's rendered prompt differs from the processor's (see prompt / expected_prompt)")
    r["ok"] = not r["problems"]
    return r


def compare(got, want) -> dict[str, float]:
    """Errors of ``got`` against ``want``, both (n, D)."""
    import torch
    import torch.nn.functional as F

    got, want = got.double(), want.double()
    err = (got - want).abs()
    ref = want.abs().max().item()
    return {"max_abs_err": err.max().item(), "max_abs_ref": ref, "rel_err": err.max().item() / ref,
            "mean_abs_err": err.mean().item(),
            "cosine": F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item(),
            "min_row_cosine": F.cosine_similarity(got, want, dim=1).min().item(),
            "finite": bool(torch.isfinite(got).all().item())}


def check_image(model, processor, mm, image: Path, golden, dtype_name: str, image_token_id: int,
                reads_blocks: bool) -> dict:
    """One image through the folder's processor, SGLang's request path and get_image_feature, against golden."""
    import torch

    name = image.name
    r: dict[str, Any] = {"image": name, "problems": []}
    if f"{name}/rows" not in golden:
        r["problems"].append(f"{name} is not in the golden file (its images: {list(golden['images'])})")
        return r
    messages = image_messages(image)
    direct = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    items, ids = sglang_items(mm, text, image)
    ids_direct = direct["input_ids"][0].tolist()
    pixels = torch.cat([torch.as_tensor(i.feature) for i in items])
    blocks = list(itertools.chain.from_iterable(getattr(i, "block_sizes", [None]) for i in items))
    with torch.no_grad():
        feats = model.get_image_feature(items).float()                              # (rows, D)
    want = torch.from_numpy(golden[f"{name}/rows"])                                 # (rows, D)
    golden_block = [int(v) for v in golden[f"{name}/block"]] or None
    r.update(tiles=int(pixels.shape[0]), block_sizes=list(direct["block_sizes"]), sglang_items=len(items),
             input_len=len(ids),
             golden_fused_length=int(golden[f"{name}/fused_length"]),
             image_tokens=ids.count(image_token_id),
             offset_tokens=sum(e - s + 1 for i in items for s, e in i.offsets),
             rows=int(feats.shape[0]), golden_rows=int(want.shape[0]), dim=int(feats.shape[1]))
    if ids != ids_direct:
        r["problems"].append(f"SGLang's input_ids ({len(ids)}) differ from the processor's ({len(ids_direct)})")
    if not torch.equal(pixels, direct["pixel_values"]):
        r["problems"].append("SGLang's item pixels differ from the processor's pixel_values")
    # NVILA's get_image_feature reads the items' block_sizes (chained) as one entry per image; NVILA-Lite's
    # ignores them (SGLang's item split gives each tile item a copy of the image's [None]).
    if reads_blocks and (blocks != list(direct["block_sizes"]) or blocks != [golden_block]):
        r["problems"].append(f"block_sizes: SGLang items {blocks}, processor {direct['block_sizes']}, "
                             f"nvila {golden_block}")
    if not r["rows"] == r["image_tokens"] == r["offset_tokens"] == r["golden_rows"]:
        r["problems"].append(f"counts differ: {r['rows']} feature rows, {r['image_tokens']} image tokens in "
                             f"input_ids, {r['offset_tokens']} in SGLang's offsets, {r['golden_rows']} nvila rows")
    if r["input_len"] != r["golden_fused_length"]:
        r["problems"].append(f"prompt length {r['input_len']} but nvila's fused length is "
                             f"{r['golden_fused_length']}")
    if feats.shape == want.shape:
        r.update(compare(feats, want))
        tol = TOLERANCE[dtype_name]
        if not (r["finite"] and r["rel_err"] <= tol["rel_err"] and r["min_row_cosine"] >= tol["min_row_cosine"]):
            r["problems"].append(f"features differ beyond {tol}: rel_err {r['rel_err']:.3g}, "
                                 f"min_row_cosine {r['min_row_cosine']:.8f}")
    r["ok"] = not r["problems"]
    return r


def feature_check(model, model_cls, config_cls, folder: Path, cfg: dict, images: list[Path], golden_path: Path,
                  dtype_name: str, summary: dict, q: bool) -> None:
    import numpy as np
    import torch

    feats: dict[str, Any] = {"dtype": dtype_name, "prompt": PROMPT, "golden": str(golden_path),
                             "tolerance": TOLERANCE[dtype_name], "images": [], "errors": []}
    summary["features"] = feats
    golden = np.load(golden_path, allow_pickle=False)
    try:
        model_config, processor, mm = server_side(folder)
    except Exception as e:  # noqa: BLE001 -- "not usable here", like a failed import
        not_importable(summary, f"SGLang's server-side processor setup failed: {type(e).__name__}: {e}\n"
                                f"{traceback.format_exc(limit=-3)}")
    hf_config = model_config.hf_config
    feats["server_config_class"] = f"{type(hf_config).__module__}.{type(hf_config).__name__}"
    feats["server_processor"] = f"{type(mm).__name__} + {type(processor).__name__}"
    diffs = same_parameters(model_cls, hf_config, sglang_config(cfg, config_cls))
    if diffs:
        feats["errors"].append(f"the server's config builds other parameters than SGLang's NVILAConfig: {diffs[:10]}")
    chat = chat_endpoint(model_config, processor, folder, images[0])
    feats["chat_endpoint"] = chat
    say(f"sglang_check: chat endpoint {'OK    ' if chat['ok'] else 'FAILED'} (content format "
        f"{chat['content_format']!r}, {chat['images_collected']} image collected)"
        + "".join(f"\n  - {p}" for p in chat["problems"]), q)
    image_token_id = int(hf_config.image_token_id)
    dtype = getattr(torch, dtype_name)
    model.vision_tower.to(dtype)
    model.mm_projector.to(dtype)
    for image in images:
        r = check_image(model, processor, mm, image, golden, dtype_name, image_token_id,
                        reads_blocks=cfg["model_type"] == "nvila")
        feats["images"].append(r)
        say(f"sglang_check: features {'OK    ' if r['ok'] else 'FAILED'} {r['image']}: "
            + (f"{r['rows']} rows x {r['dim']}, tiles {r['tiles']}, block_sizes {r['block_sizes']}, "
               f"max abs err {r['max_abs_err']:.3g} (rel {r['rel_err']:.3g}), min row cosine "
               f"{r['min_row_cosine']:.8f}" if "rel_err" in r else "")
            + "".join(f"\n  - {p}" for p in r["problems"]), q)
    mm.shutdown()
    feats["ok"] = not feats["errors"] and chat["ok"] and all(r["ok"] for r in feats["images"])
    for e in feats["errors"]:
        say("sglang_check: FAILED " + e, q)


# ---- the golden visual tokens (project venv: nvila, no sglang) ---------------------------------------------
def make_golden(folder: str, images: list[Path], out: Path) -> None:
    """nvila's float32 visual tokens (all rows of all placeholders, in order, no end embeddings) per image."""
    import numpy as np
    import torch

    import nvila

    names = [p.name for p in images]
    if len(set(names)) != len(names):
        raise SystemExit(f"sglang_check: image file names must differ (the golden file is keyed by them): {names}")
    pipe = nvila.load(folder, dtype="float32")
    data: dict[str, np.ndarray] = {"images": np.array(names), "prompt": np.array(PROMPT),
                                   "folder": np.array(str(folder))}
    for path in images:
        prompt = pipe.prepare(image_messages(path))
        with torch.inference_mode():
            rows = torch.cat([r for ph in pipe.model.media_rows(prompt.media) for r in ph]).float()  # (n, D)
        block = getattr(prompt.media[0].plan, "block", None)
        data[f"{path.name}/rows"] = rows.numpy()
        data[f"{path.name}/fused_length"] = np.array(prompt.fused_length)
        data[f"{path.name}/block"] = np.array(list(block) if block else [], dtype=np.int64)
        print(f"sglang_check: golden {path.name}: {tuple(rows.shape)} rows, fused length {prompt.fused_length}, "
              f"block {block}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **data)
    print(out)


# ---- one result JSON (project venv) ----------------------------------------------------------------------------
def write_report(out: Path, results: list[Path]) -> int:
    """docs/perf-style JSON: provenance + one entry per check; returns 0 when every check passed."""
    from nvila.base.files import write_json
    from nvila.base.provenance import provenance

    summaries = [json.loads(path.read_text()) for path in results]
    checks = []
    for s in summaries:
        f = s.get("features") or {}
        checks.append({
            "preset": s.get("preset"), "folder": s.get("folder"), "model_type": s.get("model_type"),
            "sglang_class": s.get("sglang_class"), "layers": s.get("layers"), "ok": s.get("ok"),
            "load": {k: s.get(k) for k in ("load_ok", "loaded", "tensors_in_checkpoint", "params_total", "dtype",
                                           "ignored", "weight_loader_path", "notes")}
            | {"missing": len(s.get("missing", [])), "unexpected": len(s.get("unexpected", [])),
               "errors": s.get("errors", [])[:10], "reason": s.get("reason")},
            "features": {k: f.get(k) for k in ("ok", "dtype", "prompt", "tolerance", "server_config_class",
                                               "server_processor", "errors", "chat_endpoint")}
            | {"images": [{k: r.get(k) for k in ("image", "ok", "tiles", "block_sizes", "sglang_items",
                                                 "input_len", "image_tokens", "rows", "dim", "max_abs_err",
                                                 "max_abs_ref", "rel_err", "mean_abs_err", "cosine",
                                                 "min_row_cosine", "problems")}
                          for r in f.get("images", [])]},
        })
    versions = sorted({(s["sglang_version"], s.get("torch_version")) for s in summaries if s.get("sglang_version")})
    write_json(out, {"provenance": provenance(script="scripts/sglang_check.py",
                                              sglang=[{"sglang": v, "torch": t} for v, t in versions],
                                              presets=[c["preset"] for c in checks]),
                     "checks": checks})
    ok = all(c["ok"] for c in checks)
    print(f"sglang_check: wrote {out}: " + ", ".join(f"{c['preset'] or c['folder']} {'OK' if c['ok'] else 'FAILED'}"
                                                     for c in checks), file=sys.stderr)
    return 0 if ok else 1


# ---- entry point -------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="modes: see the usage lines at the top of scripts/sglang_check.py")
    ap.add_argument("folder", type=Path, nargs="?", help='a converted "-hf" folder (config.json + root *.safetensors)')
    ap.add_argument("--quiet", action="store_true", help="only the JSON summary")
    ap.add_argument("--preset", help="a label recorded in the JSON (e.g. the random-checkpoint preset)")
    ap.add_argument("--features", type=Path, nargs="+", metavar="IMAGE", help="images for the feature check")
    ap.add_argument("--golden", type=Path, help="the .npz of --make-golden (read by the check, written by it)")
    ap.add_argument("--feature-dtype", choices=sorted(TOLERANCE), default="float32",
                    help="dtype of SGLang's vision tower + projector in the feature check (default float32)")
    ap.add_argument("--make-golden", metavar="FOLDER",
                    help="project venv: write nvila's visual tokens of --features to --golden (llava or -hf folder)")
    ap.add_argument("--write-report", type=Path, metavar="OUT.json",
                    help="project venv: gather the JSON outputs (positional RESULT files) with provenance")
    ap.add_argument("results", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_report:
        args.results = ([args.folder] if args.folder else []) + args.results
        if not args.results:
            ap.error("--write-report needs the result JSON files")
    elif args.make_golden:
        if not (args.features and args.golden) or args.folder:
            ap.error("--make-golden FOLDER needs --features and --golden, and no positional folder")
    elif not args.folder or args.results:
        ap.error("give one '-hf' folder")
    elif bool(args.features) != bool(args.golden):
        ap.error("--features and --golden go together")
    for p in args.features or []:
        if not p.is_file():
            ap.error(f"no image {p}")
    if args.golden and not args.make_golden and not args.golden.is_file():
        ap.error(f"no golden file {args.golden}; write it with --make-golden in the project's .venv")
    if args.golden and args.golden.suffix != ".npz":
        ap.error("--golden must end in .npz")
    return args


def main() -> None:
    args = parse_args()
    if args.write_report:
        sys.exit(write_report(args.write_report, args.results))
    if args.make_golden:
        make_golden(args.make_golden, args.features, args.golden)
        return
    q, folder = args.quiet, args.folder
    summary: dict = {"ok": False, "folder": str(folder), "preset": args.preset, "loaded": 0, "missing": [],
                     "unexpected": [], "errors": [], "ignored": [], "notes": [], "sglang_version": None}
    cfg = read_config(folder, summary)
    module_name, cls_name, _ = CLASSES[cfg["model_type"]]
    summary.update(model_type=cfg["model_type"], sglang_class=f"{module_name}.{cls_name}")
    model, model_cls, config_cls = load_check(folder, cfg, summary, q)
    summary["ok"] = summary["load_ok"]
    if args.features:
        if summary["load_ok"]:
            feature_check(model, model_cls, config_cls, folder, cfg, args.features, args.golden,
                          args.feature_dtype, summary, q)
            summary["ok"] = summary["features"]["ok"]
        else:
            summary["features"] = {"ok": False, "errors": ["skipped: the load check failed"], "images": []}
    say(f"sglang_check: {'OK' if summary['ok'] else 'FAILED'}  {folder}", q)
    finish(summary, 0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
