"""The processor files at the root of an "-hf" folder: tokenizer, chat template, ``processor_config.json`` and
the processor's own source (``nvila/hf_remote/processing_nvila.py``, copied, never imported here).

``processor_config.json`` holds the settings the remote processor takes (:func:`processor_settings`: the token
geometry of ``nvila.processing.tiling`` as plain JSON), and its ``auto_map`` points
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` at the copied file. The tokenizer names its
media tokens through ``extra_special_tokens`` (``tokenizer.image_token`` / ``video_token`` and their ids,
which SGLang reads; transformers >= 4.47 and 5.x).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from nvila.formats.config import NvilaConfig
from nvila.formats.hf import CHAT_TEMPLATE_FILE, HF_TYPES, PROCESSOR_CONFIG
from nvila.formats.tokens import IMAGE_TOKEN, VIDEO_TOKEN

PROCESSOR_SOURCE = "processing_nvila.py"      # in nvila.hf_remote
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def processor_settings(cfg: NvilaConfig) -> dict[str, Any]:
    """The remote processor's settings (its ``__init__`` arguments besides the tokenizer), JSON-ready."""
    enc = cfg.video_encoder
    return {
        "image_mode": cfg.image_mode,
        "tile_size": cfg.tile_size,
        "s2_scales": list(cfg.s2_scales),
        "min_tiles": cfg.min_tiles,
        "max_tiles": cfg.max_tiles,
        "tokens_per_tile": cfg.tokens_per_tile,
        "tile_token_side": cfg.token_side(cfg.tile_size),     # tokens per tile side after the projector
        "video_encoder": enc.kind,
        "video_pool_sizes": [list(p) for p in enc.pool_sizes],
        "num_video_frames": cfg.num_video_frames,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
        "rescale_factor": cfg.rescale_factor,
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
    }


def processor_files(cfg: NvilaConfig, tokenizer_files: dict[str, bytes], chat_template: str, lite: bool
                    ) -> dict[str, bytes]:
    """Every processor-related root file of an "-hf" folder, name -> content.

    ``tokenizer_files``: what ``save_pretrained`` writes for a tokenizer that already holds the media tokens
    (as ``nvila.load`` makes it; :func:`nvila.checkpoint.save.tokenizer_files`); ``chat_template``: the template
    nvila renders prompts with; ``lite``: NVILA-Lite's class and file names.
    """
    kind = HF_TYPES["nvila_lite" if lite else "nvila"]
    files = _tokenizer_files(tokenizer_files)
    files[CHAT_TEMPLATE_FILE] = hf_chat_template(chat_template, lite).encode("utf-8")
    config = {"auto_map": {"AutoProcessor": f"{kind.processor_module}.{kind.processor_class}"},
              "processor_class": kind.processor_class, **processor_settings(cfg)}
    files[PROCESSOR_CONFIG] = (json.dumps(config, indent=2) + "\n").encode("utf-8")
    files[kind.processor_module + ".py"] = resources.files("nvila.hf_remote").joinpath(PROCESSOR_SOURCE).read_bytes()
    return files


def hf_chat_template(template: str, lite: bool) -> str:
    """``template`` behind a preamble that renders list contents as nvila renders them, so the template also
    takes OpenAI-style messages (``{"type": "image"}`` / ``"video"`` / ``"text"`` parts), as SGLang's server
    sends them to templates that loop over ``message['content']`` (it drops the media of any other template).

    Parts are concatenated with no separator, placeholders typed in text are removed and the content is
    trimmed; string contents are trimmed only. In NVILA-Lite the only image of a conversation is written
    ``<image>\\n`` (the processor puts the other tiles' placeholders in front of it); otherwise ``<image>``.
    """
    image, video = IMAGE_TOKEN, VIDEO_TOKEN
    single = f"'{image}\\n'" if lite else f"'{image}'"
    clean = f"| replace('{image}', '') | replace('{video}', '')"
    preamble = (
        "{%- set nvila = namespace(messages=[], images=0) -%}"
        "{%- for message in messages -%}{%- if message['content'] is not string and message['content'] is not none -%}"
        "{%- for part in message['content'] -%}{%- if part is mapping and part['type'] == 'image' -%}"
        "{%- set nvila.images = nvila.images + 1 -%}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set nvila.messages = nvila.messages + [{'role': message['role'], 'content': message['content'] | trim}] -%}"
        "{%- elif message['content'] is none -%}{%- set nvila.messages = nvila.messages + [message] -%}"
        "{%- else -%}{%- set text = namespace(value='') -%}"
        "{%- for part in message['content'] -%}"
        f"{{%- if part is string -%}}{{%- set text.value = text.value + (part {clean}) -%}}"
        f"{{%- elif part['type'] == 'text' -%}}{{%- set text.value = text.value + (part['text'] {clean}) -%}}"
        f"{{%- elif part['type'] == 'image' -%}}{{%- set text.value = text.value + "
        f"({single} if nvila.images == 1 else '{image}') -%}}"
        f"{{%- elif part['type'] == 'video' -%}}{{%- set text.value = text.value + '{video}' -%}}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set nvila.messages = nvila.messages + [{'role': message['role'], 'content': text.value | trim}] -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set messages = nvila.messages -%}"
    )
    return preamble + template


def _tokenizer_files(saved: dict[str, bytes]) -> dict[str, bytes]:
    """The tokenizer's files with its config naming the media tokens and carrying no chat template of its
    own (``chat_template.jinja`` is the one template, shared with the processor)."""
    files = dict(saved)
    config = json.loads(files[TOKENIZER_CONFIG_FILE])
    config.pop("chat_template", None)
    files.pop(CHAT_TEMPLATE_FILE, None)
    extra = config.get("extra_special_tokens") or {}
    if isinstance(extra, list):        # transformers 5 writes the additional special tokens under this name
        config["additional_special_tokens"], extra = extra, {}
    config["extra_special_tokens"] = {**extra, "image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN}
    files[TOKENIZER_CONFIG_FILE] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return files
