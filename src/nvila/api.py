"""The one public entry point: ``nvila.load(...)`` -> :class:`Pipeline`.

The CLI, the server and evaluation all go through a Pipeline, so behaviour (prompting, media handling,
decoding) is defined once::

    import nvila
    pipe = nvila.load("Efficient-Large-Model/NVILA-8B")            # or a local folder
    pipe.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                            {"type": "text", "text": "What is this?"}]}])
"""

from __future__ import annotations

import importlib.metadata
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from nvila.base.errors import CheckpointError, ConfigError
from nvila.base.hardware import cpu_rules, decode_kernel_wins, resolve_device, resolve_dtype
from nvila.checkpoint.load import Checkpoint, load_checkpoint, map_input_embeddings, resolve, restore_16bit
from nvila.checkpoint.lora import find_adapter, load_adapter, merge_lora, require_peft
from nvila.checkpoint.save import save_checkpoint
from nvila.formats.layout import QUANT_CONFIG
from nvila.formats.plans import Prompt
from nvila.generate import SamplingParams, TextStep, Trim, decode_text
from nvila.grammar import Grammars, JsonGrammar
from nvila.model.fast import contiguous_head, use_decode_linear, use_fast_vision_attention
from nvila.model.mixed import fp32_math_on_16bit_weights
from nvila.model.quantized import pack_int8_for_cpu
from nvila.processing.processor import Processor
from nvila.processing.timestamps import Segment, TimeTokens

MODEL_NAME_PREFIX = "nvila:"
MODEL_ENTRY_POINTS = "nvila.models"
DEFAULT_MODEL = "nvila:nano"             # what the CLI and server use without --model
MEDIA_OPTIONS = ("num_frames", "fps", "max_frames", "frame_rate")
TIME_TOKEN_MODES = ("seconds", "raw")   # answers' <tK>: written as seconds into the clip, or left as tokens


@dataclass
class Generation:
    """Result of one generation."""

    text: str
    prompt_token_ids: list[int]          # ids fed to the fusion step (one id per placeholder)
    num_media_embeddings: int            # media embeddings spliced in, "\n" embeddings included
    prompt_length: int                   # positions the LLM saw for the prompt (fused length)
    output_token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"        # "stop" (stop token or string) | "length"
    raw_text: str | None = None          # the text before time tokens were written as seconds (None: unchanged)
    segments: list[Segment] = field(default_factory=list)   # spans given by pairs of time tokens, in seconds


def resolve_model(path_or_id: str | os.PathLike) -> tuple[str | os.PathLike, Path | None]:
    """(checkpoint folder or Hub id, adapter folder or None) for a model name.

    ``nvila:NAME`` names a built-in model, found through the ``nvila.models`` entry points (the package
    that builds it registers itself there, so this layer never imports the builders): ``nvila:nano`` is
    NVILA-Nano with its trained adapter, ``nvila:nano-base`` its untrained base. Anything else is returned
    as given (a folder or a Hub id).
    """
    text = str(path_or_id)
    if not text.startswith(MODEL_NAME_PREFIX):
        return path_or_id, None
    name = text[len(MODEL_NAME_PREFIX):]
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=MODEL_ENTRY_POINTS)}
    if name not in found:
        known = ", ".join(MODEL_NAME_PREFIX + n for n in sorted(found)) or "none (is nvila installed with pip?)"
        raise CheckpointError(f"{text} is not a built-in model; known: {known}")
    base, adapter = found[name].load()()
    return base, adapter


def load(
    path_or_id: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    fast: bool | None = None,
    lora: str | os.PathLike | None = None,
) -> "Pipeline":
    """Load an NVILA checkpoint: a local folder in the official layout, a Hugging Face Hub id, or a built-in
    model name (``nvila:nano``, see :func:`resolve_model`).

    ``dtype="auto"`` follows this CPU's rules (:func:`nvila.base.hardware.cpu_rules`): bfloat16 on CUDA and on
    CPUs that compute it natively (AVX512-BF16, AMX), float32 elsewhere; pass ``dtype="float32"`` for
    bit-level parity with the reference.
    ``fast`` switches the CPU fast path of the dtype. bfloat16 (default on): the vision tower's attention as
    bf16 GEMMs and, where it was measured faster (AMX), a single-token decode kernel for the LLM's linears
    (:mod:`nvila.model.fast`); results move by bf16 rounding. float32 (default on for ``dtype="auto"`` where
    the rules say so, AVX2 CPUs): weights stored in bf16 stay 16-bit and are multiplied in float32
    (:mod:`nvila.model.mixed`), which loses nothing against the float32 reference and halves the weights'
    memory and bytes per token; not with ``lora``. A quantized folder loads its float layers (LM head,
    embeddings, projector) that way too, and where the CPU rule runs W8A8 through FBGEMM (AVX2), its int8
    weights are packed for it once at load (:func:`nvila.model.quantized.pack_int8_for_cpu`).
    ``lora`` names a LoRA adapter folder (``nvila.checkpoint.lora.save_adapter``, needs ``nvila[train]``): it
    is loaded into the base model and merged, so inference runs at the base model's speed.
    A folder with a ``quant_config.json`` (written by ``nvila quantize``) loads as the quantized model.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, builtin_adapter = resolve_model(path_or_id)
    if builtin_adapter is not None:
        if lora is not None:
            raise ConfigError(f"{path_or_id} already includes its trained adapter; to load another adapter, "
                              f"pass the base model ({MODEL_NAME_PREFIX}nano-base) with it")
        lora = builtin_adapter
    if lora is not None:
        require_peft()        # both fail before the slow base-model load
        find_adapter(lora)
    source = resolve(source)
    auto = dtype in (None, "auto")
    quantized = (source / QUANT_CONFIG).is_file()
    fp32_on_16bit = (dev.type == "cpu" and dt == torch.float32 and lora is None
                     and (fast if fast is not None else auto and cpu_rules().fp32_math_on_16bit_weights))
    ckpt = load_checkpoint(source, dtype=dt, device=str(dev), keep_16bit=fp32_on_16bit and not quantized)
    if lora is not None:
        if QUANT_CONFIG in ckpt.records[""].files:
            raise ConfigError("a LoRA adapter cannot be merged into a quantized checkpoint; merge it into the "
                              "float model (nvila merge), then quantize the result")
        load_adapter(ckpt.model, lora)
        merge_lora(ckpt.model)
    if fp32_on_16bit:
        if quantized:          # built in float32 (its parts mix dtypes): its float layers go back to 16 bits
            restore_16bit(ckpt)
        map_input_embeddings(ckpt, cpu_rules().packed_fp16_max_rows)
        fp32_math_on_16bit_weights(ckpt.model, cpu_rules().packed_fp16_max_rows)
    elif fast if fast is not None else (dev.type == "cpu" and dt == torch.bfloat16):
        if decode_kernel_wins():
            use_decode_linear(ckpt.model.llm)
        use_fast_vision_attention(ckpt.model.vision.model)
    if quantized:
        pack_int8_for_cpu(ckpt.model)
    contiguous_head(ckpt.model.llm)
    return Pipeline(ckpt)


class Pipeline:
    """A loaded model with its processor: chat, stream, batch generation and parity hooks."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.config = checkpoint.model.cfg
        self.processor = Processor(self.config, self.tokenizer, checkpoint.chat_template)
        # Encoded media by (content key, plan): a conversation re-sends earlier images every turn, and
        # the vision tower is the most expensive stage, so each is encoded once.
        self.media_cache: OrderedDict[Any, list[torch.Tensor]] = OrderedDict()
        self.media_cache_size = 16
        # response_format grammars: xgrammar's tokenizer info built once (on first use), grammars cached by schema
        self.grammars = Grammars(self.tokenizer, self.model.llm.config.vocab_size, checkpoint.stop_token_ids)
        self.time_tokens = self._time_tokens()

    # ---- preparation ----------------------------------------------------------------------------
    def prepare(self, messages: str | Sequence[Any], **media_options: Any) -> Prompt:
        """Messages -> Prompt (token ids + media pixels + plans), without running the model."""
        unknown = sorted(set(media_options) - set(MEDIA_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown media options {unknown}; known: {list(MEDIA_OPTIONS)}")
        return self.processor(messages, **_pick(media_options, MEDIA_OPTIONS))

    @torch.inference_mode()
    def embed(self, prompt: Prompt) -> torch.Tensor:
        """(L_fused, D) input embeddings of a prepared prompt (media encodings are cached by content)."""
        keys = [(m.key, m.plan) if m.key is not None else None for m in prompt.media]
        missing = [m for m, k in zip(prompt.media, keys) if k is None or k not in self.media_cache]
        fresh = iter(self.model.embed_media(missing))
        blocks: list[torch.Tensor] = []
        for item, key in zip(prompt.media, keys):
            if key is not None and key in self.media_cache:
                self.media_cache.move_to_end(key)
                item_blocks = self.media_cache[key]
            else:
                item_blocks = [next(fresh) for _ in range(item.placeholders)]
                if key is not None:
                    self.media_cache[key] = item_blocks
                    while len(self.media_cache) > self.media_cache_size:
                        self.media_cache.popitem(last=False)
            blocks += item_blocks
        return self.model.fuse(prompt.input_ids, blocks)

    @torch.inference_mode()
    def next_token_logits(self, messages: str | Sequence[Any], **media_options: Any) -> torch.Tensor:
        """Logits (float32, shape [vocab]) at the last prompt position."""
        x = self.embed(self.prepare(messages, **media_options))
        return self.model.llm(inputs_embeds=x[None], logits_to_keep=1).logits[0, -1].float()

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, messages: str | Sequence[Any], **options: Any) -> Generation:
        """Answer one conversation; options = SamplingParams fields, ``response_format`` and media options.

        ``response_format`` (OpenAI's shape: ``{"type": "json_object"}``, ``{"type": "json_schema",
        "json_schema": {"name", "schema", "strict"}}``, or a Pydantic model class) constrains the answer to
        JSON (matching the schema): an answer that ends with ``finish_reason == "stop"`` parses and validates,
        one cut by ``max_new_tokens`` ("length") does not have to."""
        return self.generate_batch([messages], **options)[0]

    def generate_batch(self, conversations: Sequence[str | Sequence[Any]], **options: Any) -> list[Generation]:
        """Answer several conversations together (one prefill, batched decode steps)."""
        params = self._sampling(options)
        if not conversations:
            return []
        prompts = [self.prepare(c, **_pick(options, MEDIA_OPTIONS)) for c in conversations]
        results = [Generation("", p.input_ids, p.num_media_embeddings, p.fused_length) for p in prompts]
        texts = [""] * len(prompts)
        for step in self.decode([self.embed(p) for p in prompts], params):
            for b, (token, piece) in enumerate(zip(step.tokens, step.pieces)):
                if token is not None:
                    results[b].output_token_ids.append(token)
                texts[b] += piece
                results[b].finish_reason = step.finished[b] or "length"
        for r, text, prompt in zip(results, texts, prompts):
            r.text = text.strip()
            if options.get("time_tokens", "seconds") == "seconds":
                self._render_time_tokens(r, prompt)
        return results

    def _time_tokens(self) -> TimeTokens | None:
        """The checkpoint's time tokens (NVILA-8B-Video), checked against its tokenizer; None without them."""
        n = self.config.num_time_tokens
        if not n:
            return None
        tokens = TimeTokens(n, self.config.time_token_format)
        missing = [tokens.token_format.format(t=k) for k in range(n)
                   if len(self.tokenizer(tokens.token_format.format(t=k), add_special_tokens=False)["input_ids"]) != 1]
        if missing:
            raise CheckpointError(f"config.json declares {n} time tokens but the tokenizer lacks {missing[:3]}"
                                  f"{' ...' if len(missing) > 3 else ''} as single tokens")
        return tokens

    def clip_duration(self, prompt: Prompt) -> float | None:
        """The duration of the prompt's video, what time tokens refer to (None: no video, several, or unknown)."""
        videos = [m for m in prompt.media if m.kind == "video"]
        return videos[0].duration if len(videos) == 1 else None

    def render_time_tokens(self, text: str, prompt: Prompt) -> tuple[str, list[Segment]]:
        """``text`` with its time tokens written as seconds into the prompt's clip, and the segments they give;
        unchanged without time tokens or a clip of known duration."""
        duration = self.clip_duration(prompt)
        if self.time_tokens is None or duration is None:
            return text, []
        return self.time_tokens.render(text, duration)

    def _render_time_tokens(self, result: Generation, prompt: Prompt) -> None:
        text, result.segments = self.render_time_tokens(result.text, prompt)
        if text != result.text:
            result.raw_text, result.text = result.text, text

    def response_grammar(self, response_format: Any) -> JsonGrammar | None:
        """The compiled grammar of a ``response_format`` (None for free text), for ``SamplingParams.grammar``;
        compiled once per schema and cached. Raises ConfigError for a malformed response_format or a schema
        that cannot be compiled, and when xgrammar is not installed."""
        return self.grammars.get(response_format)

    def decode(self, embeds: Sequence[torch.Tensor], params: SamplingParams | Sequence[SamplingParams]
               ) -> Iterator[TextStep]:
        """Decode a batch of fused prompts (:meth:`embed`), one :class:`~nvila.generate.TextStep` per step:
        the loop behind chat, stream and the server. ``params``: shared, or one per sequence."""
        return decode_text(self.model.llm, self.tokenizer, embeds, params, self.checkpoint.stop_token_ids,
                           self.config.model_max_length)

    def chat(self, messages: str | Sequence[Any], **options: Any) -> str:
        """The model's answer to a conversation, as text."""
        return self.generate(messages, **options).text

    def stream(self, messages: str | Sequence[Any], **options: Any) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated.

        The pieces concatenate to exactly ``chat(...)``'s text (surrounding whitespace stripped).
        """
        params = self._sampling(options)
        prompt = self.prepare(messages, **_pick(options, MEDIA_OPTIONS))
        seconds = options.get("time_tokens", "seconds") == "seconds"
        trim = Trim()
        for step in self.decode([self.embed(prompt)], params):
            piece = trim.push(step.pieces[0])
            if piece and seconds:
                piece = self.render_time_tokens(piece, prompt)[0]   # a time token is never split across pieces
            if piece:
                yield piece

    def save(self, out: str | os.PathLike) -> Path:
        """Write the model in the official layout (bit-identical tensors for an unmodified model)."""
        return save_checkpoint(self.checkpoint, out)

    def _sampling(self, options: dict[str, Any]) -> SamplingParams:
        """Generation options -> SamplingParams (``response_format`` compiled to its grammar)."""
        sampling = tuple(f for f in SamplingParams.__dataclass_fields__ if f != "grammar")
        known = {*sampling, "response_format", "time_tokens", *MEDIA_OPTIONS}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown generation options {unknown}; known: {sorted(known)}")
        if options.get("time_tokens", "seconds") not in TIME_TOKEN_MODES:
            raise ConfigError(f"time_tokens must be one of {TIME_TOKEN_MODES}, got {options['time_tokens']!r}")
        fields = _pick(options, sampling)
        stop = fields.get("stop", ())
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}")
        fields["stop"] = tuple(stop)
        return SamplingParams(**fields, grammar=self.response_grammar(options.get("response_format")))


def _pick(options: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in names and v is not None}
