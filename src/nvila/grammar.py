"""Structured output: OpenAI's ``response_format`` compiled into a grammar that masks the logits.

``{"type": "json_object"}`` and ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``
become an xgrammar grammar over this model's tokenizer; the decode loop (:func:`nvila.generate.decode`)
asks each constrained sequence's :class:`GrammarConstraint` to mask the logits before sampling, so every
token taken keeps the answer a prefix of a valid document, and once the document is complete only the stop
tokens remain. Batching, streaming and stop strings are the decode loop's and work unchanged.

One :class:`Grammars` per tokenizer (the Pipeline owns it) builds xgrammar's tokenizer info once and keeps
the compiled grammars in a bounded LRU keyed by the canonical schema JSON. The mask is as wide as the
logits (the LM head can have more rows than the tokenizer has tokens); special tokens (chat markers, the
media placeholders and sentinel) and rows without a token are never allowed, the stop tokens only at the
end. xgrammar is an optional dependency (``pip install 'nvila[structured]'``), imported on first use.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Sequence

import torch

from nvila.base.errors import ConfigError

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
JSON_OBJECT_SCHEMA = {"type": "object"}       # json_object: any JSON object
MAX_GRAMMARS = 64                             # compiled grammars kept per tokenizer (LRU)
_CONTROL_BYTE = re.compile(rb"[\x00-\x1f]")
_XGRAMMAR_LOCATION = re.compile(r"^\[[\d:.]+\] \S+:\d+: ")   # "[10:54:33] /project/cpp/x.cc:94: " prefix


def require_xgrammar() -> Any:
    """The xgrammar module, or a ConfigError saying how to install it."""
    try:
        import xgrammar
    except ImportError:
        raise ConfigError("response_format needs the xgrammar package: pip install 'nvila[structured]'") from None
    return xgrammar


def parse_response_format(response_format: Any) -> tuple[str, str] | None:
    """OpenAI's ``response_format`` -> (kind, canonical schema JSON), or None for free text.

    Accepts ``None``, ``{"type": "text"}``, ``{"type": "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"name": str, "schema": {...}, "strict": bool}}`` and, in
    Python, a Pydantic model class (its JSON schema). The schema JSON is canonical (compact, no spaces),
    so equal schemas share one compiled grammar; key order is kept, as it is the order in which the
    answer's properties are generated.
    """
    if response_format is None:
        return None
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        response_format = {"type": "json_schema", "json_schema": {
            "name": response_format.__name__, "schema": response_format.model_json_schema()}}
    if not isinstance(response_format, dict):
        raise ConfigError(f"response_format must be an object like {{\"type\": \"json_object\"}}, "
                          f"got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise ConfigError(f"response_format.type must be one of {list(RESPONSE_FORMAT_TYPES)}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return kind, _canonical(JSON_OBJECT_SCHEMA)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ConfigError("response_format.json_schema must be an object with a `schema` (and `name`, `strict`)")
    if "name" in spec and not isinstance(spec["name"], str):
        raise ConfigError(f"response_format.json_schema.name must be a string, got {spec['name']!r}")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise ConfigError(f"response_format.json_schema.strict must be a boolean, got {spec['strict']!r}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ConfigError("response_format.json_schema.schema must be a JSON schema object, "
                          f"got {type(schema).__name__}")
    return kind, _canonical(schema)


def _canonical(schema: dict[str, Any]) -> str:
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"response_format: the schema is not plain JSON ({e})") from None


class Grammars:
    """Compiled response-format grammars for one tokenizer and LM head: thread-safe, bounded LRU.

    ``vocab_size`` is the width of the logits (the LM head's rows); ``stop_token_ids`` the tokens that
    end an answer (``Checkpoint.stop_token_ids``). xgrammar is imported and its tokenizer info built on
    the first constrained request.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 max_grammars: int = MAX_GRAMMARS) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.max_grammars = max_grammars
        self.compiles = 0                   # grammars compiled so far (cache misses)
        self._cache: OrderedDict[tuple[str, str], JsonGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: Any = None

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, response_format: Any) -> "JsonGrammar | None":
        """The grammar of a ``response_format`` (see :func:`parse_response_format`); None for free text.
        Raises ConfigError for a malformed response_format or a schema xgrammar cannot compile."""
        key = parse_response_format(response_format)
        if key is None:
            return None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            compiler = self._compiler or self._make_compiler()
        grammar = JsonGrammar(self._compile(compiler, *key), self.vocab_size)   # outside the lock: can be slow
        with self._lock:
            self.compiles += 1
            self._cache[key] = grammar
            while len(self._cache) > self.max_grammars:
                self._cache.popitem(last=False)
        return grammar

    def _make_compiler(self) -> Any:
        xgr = require_xgrammar()
        self._compiler = xgr.GrammarCompiler(tokenizer_info(self.tokenizer, self.vocab_size, self.stop_token_ids),
                                             cache_enabled=False)     # we cache, keyed by the canonical schema
        return self._compiler

    @staticmethod
    def _compile(compiler: Any, kind: str, schema: str) -> Any:
        try:
            # compact JSON (", " and ": " between items, no other whitespace): a model cannot loop on
            # whitespace, and answers stay short. Strict mode: no properties the schema does not declare.
            return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=kind == "json_schema")
        except (RuntimeError, ValueError) as e:
            reason = _XGRAMMAR_LOCATION.sub("", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
            raise ConfigError(f"response_format: the JSON schema cannot be used for constrained decoding: "
                              f"{reason}") from None


def tokenizer_info(tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> Any:
    """xgrammar's view of the tokenizer with ``vocab_size`` (logits width) entries: the vocabulary as
    transformers has it, with blanks (which xgrammar never allows) for every special token (chat markers,
    media placeholders, the sentinel), every row beyond the tokenizer, and every token holding a raw control
    byte (0x00-0x1f: compact JSON never has one, and xgrammar 0.2.9's strings with min/maxLength would
    otherwise let them in unescaped); the stop tokens end the answer."""
    xgr = require_xgrammar()
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    text = detected.decoded_vocab                     # the bytes each token stands for
    vocab = [""] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and i not in special and not _CONTROL_BYTE.search(text[i]):
            vocab[i] = token
    return xgr.TokenizerInfo(vocab, detected.vocab_type, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids),
                             add_prefix_space=detected.add_prefix_space)


class JsonGrammar:
    """A compiled grammar (shared by every request with its schema); :meth:`constraint` starts one answer."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        self.compiled = compiled
        self.vocab_size = vocab_size

    def constraint(self) -> "GrammarConstraint":
        return GrammarConstraint(self)


class GrammarConstraint:
    """The grammar state of one answer: masks a row of logits, follows the tokens taken."""

    def __init__(self, grammar: JsonGrammar) -> None:
        xgr = require_xgrammar()
        self._xgr = xgr
        self.vocab_size = grammar.vocab_size
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)       # (1, ceil(V / 32)) int32

    def mask(self, logits: torch.Tensor) -> None:
        """(V,) logits of this sequence: tokens the grammar does not allow next set to -inf, in place."""
        if logits.shape[-1] != self.vocab_size:
            raise RuntimeError(f"logits have {logits.shape[-1]} entries but the grammar was built for "
                               f"{self.vocab_size} (the LM head's rows)")
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(logits[None], self.bitmask.to(logits.device))

    def accept(self, token: int) -> None:
        """Advance past ``token`` (one the mask allowed)."""
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its mask allowed")
