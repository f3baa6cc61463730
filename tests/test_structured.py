"""Structured output (``response_format``): grammar-constrained decoding in the API, the CLI and the server.

The fixture checkpoints are random models: without the constraint they emit garbage, with it every answer
that finishes must parse as JSON and validate against its schema (greedy, sampled at temperature 1 with
several seeds, in batches that mix constrained and free requests, streamed). The schemas bound their strings,
numbers and arrays so a random model finishes well within the token budget; an answer cut by the budget
reports ``finish_reason == "length"``.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import pytest
import torch
from conftest import CHECKPOINTS, fixture_pipeline

xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from nvila.base.errors import ConfigError  # noqa: E402
from nvila.cli.main import main  # noqa: E402
from nvila.generate import SamplingParams  # noqa: E402
from nvila.grammar import Grammars, parse_response_format, require_xgrammar  # noqa: E402

PET = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind", "vaccinated"],
       "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 30},
                      "kind": {"enum": ["cat", "dog", "bird"]}, "vaccinated": {"type": "boolean"}}}
SCHEMAS = {
    "pet": PET,
    "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    "points": {"$defs": {"pt": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "y": {"type": "number", "minimum": -1, "maximum": 1}}}},
               "type": "object", "additionalProperties": False, "required": ["first", "rest", "note"],
               "properties": {"first": {"$ref": "#/$defs/pt"},
                              "rest": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "maxItems": 3},
                              "note": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}}},
    "code": {"type": "object", "required": ["code", "tags"],
             "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                            "tags": {"type": "array", "items": {"const": "x"}, "maxItems": 2}}},
}
SEEDS = range(5)
BUDGET = 96                                   # tokens: every SCHEMAS answer of the random models fits


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def assert_valid(text: str, schema: dict) -> object:
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    return value


@pytest.fixture(scope="module")
def pipe():
    return fixture_pipeline("nvila-lite")


# ---- response_format parsing ------------------------------------------------------------------------------
def test_parse_response_format_shapes() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == ("json_object", '{"type":"object"}')
    kind, key = parse_response_format(schema_format({"type": "object", "properties": {"b": {}, "a": {}}}))
    assert kind == "json_schema" and key == '{"type":"object","properties":{"b":{},"a":{}}}'   # order kept


@pytest.mark.parametrize("bad, fragment", [
    ("json", "must be an object"),
    ({"type": "xml"}, "response_format.type must be one of"),
    ({"type": "json_schema"}, "response_format.json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "name must be a string"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict must be a boolean"),
])
def test_malformed_response_format_is_a_config_error(bad: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_response_format(bad)


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "foo"}, 'Unsupported type "foo"'),
    ({"$ref": "#/$defs/missing"}, "$defs"),
    ({"type": "string", "pattern": "("}, "parenthesis is not closed"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum greater than maximum"),
])
def test_schema_that_cannot_compile_names_the_problem(pipe, schema: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        pipe.generate("hi", response_format=schema_format(schema), max_new_tokens=4)
    message = str(info.value)
    assert message.startswith("response_format: the JSON schema cannot be used") and fragment in message
    assert "/project/" not in message                                # xgrammar's source location is cut off


def test_missing_xgrammar_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(ConfigError, match=r"pip install 'nvila\[structured\]'"):
        require_xgrammar()


# ---- the mask: width, forbidden tokens, completion -----------------------------------------------------------
def test_mask_is_as_wide_as_the_logits_and_never_allows_special_tokens(pipe) -> None:
    tok = pipe.tokenizer
    width = pipe.next_token_logits("hi").shape[-1]
    grammar = pipe.response_grammar(schema_format(PET))
    assert grammar.vocab_size == width
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    media = {tok.convert_tokens_to_ids(t) for t in ("<vila/sentinel>", "<image>", "<vila/video>")}
    assert media <= special
    stops = set(pipe.checkpoint.stop_token_ids)
    # tokens holding a raw control character: never valid in compact JSON (strings escape them)
    control = {i for i in range(len(tok)) if i not in special and any(ord(ch) < 32 for ch in tok.decode([i]))}
    assert control
    c = grammar.constraint()
    tokens = tok.encode('{"name": "ab cd', add_special_tokens=False)
    assert len(tokens) >= 5
    for token in tokens:                                   # the start, a key, inside a string
        logits = torch.zeros(width)
        c.mask(logits)
        allowed = set(logits.isfinite().nonzero().flatten().tolist())
        assert allowed and not allowed & special, allowed & special           # stop tokens too: not complete
        assert not allowed & control
        c.accept(token)
    assert stops <= special
    with pytest.raises(RuntimeError, match="rejected token"):
        c.accept(tok.convert_tokens_to_ids("<image>"))    # even inside a string, where its text would fit


def test_lm_head_wider_than_the_tokenizer_masks_the_extra_rows(pipe) -> None:
    width = len(pipe.tokenizer) + 37            # a head padded beyond the tokenizer (random real-shape presets)
    grammars = Grammars(pipe.tokenizer, width, pipe.checkpoint.stop_token_ids)
    c = grammars.get({"type": "json_object"}).constraint()
    logits = torch.zeros(width)
    c.mask(logits)
    assert logits[len(pipe.tokenizer):].isinf().all() and logits[: len(pipe.tokenizer)].isfinite().any()
    with pytest.raises(RuntimeError, match="entries but the grammar was built for"):
        c.mask(torch.zeros(width - 1))


def test_complete_answer_allows_only_the_stop_tokens(pipe) -> None:
    grammar = pipe.response_grammar(schema_format({"enum": ["yes", "no"]}))
    c = grammar.constraint()
    for token in pipe.tokenizer.encode('"yes"', add_special_tokens=False):
        c.accept(token)
    logits = torch.zeros(grammar.vocab_size)
    c.mask(logits)
    assert set(logits.isfinite().nonzero().flatten().tolist()) == set(pipe.checkpoint.stop_token_ids)
    r = pipe.generate("hi", response_format=schema_format({"enum": ["yes", "no"]}), max_new_tokens=BUDGET)
    assert r.finish_reason == "stop" and r.text in ('"yes"', '"no"')


# ---- caching --------------------------------------------------------------------------------------------------
def test_grammars_compile_once_per_schema_and_stay_bounded(pipe, monkeypatch) -> None:
    import nvila.grammar as grammar_module

    infos = []
    real = grammar_module.tokenizer_info
    monkeypatch.setattr(grammar_module, "tokenizer_info", lambda *a: infos.append(1) or real(*a))
    grammars = Grammars(pipe.tokenizer, pipe.next_token_logits("hi").shape[-1], pipe.checkpoint.stop_token_ids,
                        max_grammars=2)
    a = grammars.get(schema_format(PET, "a"))
    assert grammars.get(schema_format(json.loads(json.dumps(PET)), "b")) is a       # same schema, another name
    assert grammars.compiles == 1 and len(grammars) == 1
    grammars.get(schema_format(SCHEMAS["scores"]))
    grammars.get({"type": "json_object"})
    assert grammars.compiles == 3 and len(grammars) == 2                            # bounded: PET evicted
    assert grammars.get(schema_format(PET)) is not a and grammars.compiles == 4
    assert grammars.get({"type": "text"}) is None and grammars.get(None) is None
    assert infos == [1]                                                             # tokenizer info built once


def test_pipeline_reuses_its_grammar(pipe) -> None:
    assert pipe.response_grammar(schema_format(PET)) is pipe.response_grammar(schema_format(PET))


# ---- guarantees in the API ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_sampled_answers_validate(pipe, name: str) -> None:
    schema = SCHEMAS[name]
    for seed in SEEDS:
        r = pipe.generate("Describe a pet.", response_format=schema_format(schema), temperature=1.0, seed=seed,
                          max_new_tokens=BUDGET)
        assert r.finish_reason == "stop", (seed, r.text)
        assert_valid(r.text, schema)
        assert len(r.output_token_ids) < BUDGET


def test_without_the_constraint_the_model_emits_no_json(pipe) -> None:
    """The control: the random model's free answers are not JSON, so the tests above test the constraint."""
    for seed in SEEDS:
        text = pipe.generate("Describe a pet.", temperature=1.0, seed=seed, max_new_tokens=32).text
        with pytest.raises(ValueError):
            json.loads(text)


def test_greedy_answer_validates_and_pydantic_class_is_accepted(pipe) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        kind: Literal["cat", "dog"]
        age: int = pydantic.Field(ge=0, le=30)

    r = pipe.generate("Describe a pet.", response_format=Pet, max_new_tokens=BUDGET)
    assert r.finish_reason == "stop"
    pet = Pet.model_validate_json(r.text)
    assert pet.kind in ("cat", "dog")
    assert pipe.chat("Describe a pet.", response_format=Pet, max_new_tokens=BUDGET) == r.text


def test_json_object_answers_are_objects_or_cut(pipe) -> None:
    finished = 0
    for seed in SEEDS:
        r = pipe.generate("hi", response_format={"type": "json_object"}, temperature=1.0, seed=seed, max_new_tokens=32)
        if r.finish_reason == "stop":
            assert isinstance(json.loads(r.text), dict)
            finished += 1
        else:
            assert r.finish_reason == "length" and r.text.startswith("{")
    assert finished >= 1


def test_answer_cut_by_max_new_tokens_reports_length(pipe) -> None:
    r = pipe.generate("Describe a pet.", response_format=schema_format(PET), max_new_tokens=3)
    assert r.finish_reason == "length" and len(r.output_token_ids) == 3
    with pytest.raises(ValueError):
        json.loads(r.text)


def test_stream_concatenates_to_the_valid_answer(pipe) -> None:
    rf = schema_format(SCHEMAS["points"])
    pieces = list(pipe.stream("Where?", response_format=rf, temperature=1.0, seed=3, max_new_tokens=BUDGET))
    whole = pipe.generate("Where?", response_format=rf, temperature=1.0, seed=3, max_new_tokens=BUDGET)
    assert len(pieces) > 1 and "".join(pieces) == whole.text
    assert_valid(whole.text, SCHEMAS["points"])


def test_stop_strings_still_cut_a_constrained_answer(pipe) -> None:
    r = pipe.generate("Describe a pet.", response_format=schema_format(PET), stop=[":"], max_new_tokens=BUDGET)
    assert r.finish_reason == "stop" and r.text == '{"name"'


def test_generate_batch_constrained_equals_single(pipe) -> None:
    convs = ["Describe a pet.", [{"role": "user", "content": "A much longer request: describe a pet in detail."}],
             "Pet?"]
    rf = schema_format(PET)
    batch = pipe.generate_batch(convs, response_format=rf, max_new_tokens=BUDGET)
    singles = [pipe.generate(c, response_format=rf, max_new_tokens=BUDGET) for c in convs]
    assert [g.output_token_ids for g in batch] == [g.output_token_ids for g in singles]
    for g in batch:
        assert g.finish_reason == "stop"
        assert_valid(g.text, PET)


def test_batch_mixing_constrained_and_free_sequences(pipe) -> None:
    """Pipeline.decode (the server's loop) with per-sequence params: the constrained rows validate, the free
    rows decode exactly as they do alone (the masks touch only their own rows)."""
    prompts = ["Describe a pet.", "Tell me a story.", "Where?", "Say something.", "Scores?"]
    embeds = [pipe.embed(pipe.prepare(p)) for p in prompts]
    kinds = [SCHEMAS["pet"], None, SCHEMAS["points"], None, SCHEMAS["scores"]]
    params = [SamplingParams(max_new_tokens=BUDGET if k else 24, temperature=1.0, seed=7,
                             grammar=pipe.response_grammar(schema_format(k)) if k else None) for k in kinds]
    texts, finish = [""] * 5, [None] * 5
    for step in pipe.decode(embeds, params):
        for b in range(5):
            texts[b] += step.pieces[b]
            finish[b] = step.finished[b] or finish[b]
    for b, schema in enumerate(kinds):
        if schema is not None:
            assert finish[b] == "stop", texts[b]
            assert_valid(texts[b].strip(), schema)
        else:
            alone = pipe.generate(prompts[b], temperature=1.0, seed=7, max_new_tokens=24)
            assert texts[b].strip() == alone.text


# ---- command line -------------------------------------------------------------------------------------------
def test_cli_infer_json_schema_and_json_object(tmp_path, capsys) -> None:
    schema_file = tmp_path / "pet.json"
    schema_file.write_text(json.dumps(PET))
    model = ["--model", str(CHECKPOINTS / "nvila-lite"), "--dtype", "float32", "--text", "Describe a pet."]
    assert main(["infer", *model, "--json-schema", str(schema_file), "--json", "--max-new-tokens", str(BUDGET)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "stop"
    assert_valid(out["text"], PET)
    assert main(["infer", *model, "--json-object", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("{")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "foo"}')
    assert main(["infer", *model, "--json-schema", str(bad)]) == 2
    assert 'error: response_format: the JSON schema cannot be used for constrained decoding: Unsupported type "foo"' \
        in capsys.readouterr().err
    assert main(["infer", *model, "--json-schema", str(tmp_path / "missing.json")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_bench_json_schema_writes_both_rates_with_provenance(tmp_path, capsys) -> None:
    schema_file = tmp_path / "pet.json"
    schema_file.write_text(json.dumps(PET))
    out = tmp_path / "structured.json"
    assert main(["bench", "--model", str(CHECKPOINTS / "nvila-lite"), "--setup", "fp32", "--json-schema",
                 str(schema_file), "--text", "Describe a pet.", "--runs", "2", "--warmup", "0", "--new-tokens", "6",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["decode_tokens_per_s"]) == {"free", "schema"} and min(data["decode_tokens_per_s"].values()) > 0
    assert data["grammar_ms_per_token"] > 0 and data["compile_s"] > data["cached_lookup_s"]
    assert data["logits_width"] == fixture_pipeline("nvila-lite").model.llm.config.vocab_size
    assert data["provenance"]["xgrammar"] and data["provenance"]["response_format"]["json_schema"]["schema"] == PET
    assert data["answers"]["schema"].startswith('{"name": "')
    assert "schema/free" in capsys.readouterr().out


# ---- the server ----------------------------------------------------------------------------------------------
openai = pytest.importorskip("openai")
from test_server import ServerProcess, assert_openai_error  # noqa: E402


@pytest.fixture(scope="module")
def lite():
    """`nvila serve` of the nvila-lite fixture, as test_server.py starts it (batches of up to 8)."""
    server = ServerProcess("nvila-lite", "--max-queue", "64", "--max-batch", "8")
    yield server
    server.stop()


def _chat(server, **kw):
    return server.client().chat.completions.create(model="nvila-lite", **kw)


def test_server_json_schema_sampled_answers_validate(lite) -> None:
    for seed in SEEDS:
        out = _chat(lite, messages=[{"role": "user", "content": "Describe a pet."}], temperature=1.0, seed=seed,
                    max_tokens=BUDGET, response_format=schema_format(PET, "pet"))
        assert out.choices[0].finish_reason == "stop"
        assert_valid(out.choices[0].message.content, PET)


def test_server_json_object(lite) -> None:
    out = _chat(lite, messages=[{"role": "user", "content": "hi"}], seed=0, temperature=1.0, max_tokens=32,
                response_format={"type": "json_object"})
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


def test_openai_parse_with_a_pydantic_model(lite) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        kind: Literal["cat", "dog", "bird"]
        age: int = pydantic.Field(ge=0, le=30)
        vaccinated: bool

    client = lite.client()
    for seed in SEEDS:
        out = client.chat.completions.parse(model="nvila-lite", messages=[{"role": "user", "content": "A pet?"}],
                                            response_format=Pet, temperature=1.0, seed=seed, max_tokens=BUDGET)
        pet = out.choices[0].message.parsed
        assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "bird") and 0 <= pet.age <= 30
    with pytest.raises(openai.LengthFinishReasonError):                   # a cut answer is not claimed valid
        client.chat.completions.parse(model="nvila-lite", messages=[{"role": "user", "content": "A pet?"}],
                                      response_format=Pet, max_tokens=3)


def test_server_cut_answer_reports_length(lite) -> None:
    out = _chat(lite, messages=[{"role": "user", "content": "Describe a pet."}], max_tokens=3,
                response_format=schema_format(PET))
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


def test_server_streaming_with_a_schema(lite) -> None:
    kw = dict(messages=[{"role": "user", "content": "Where?"}], temperature=1.0, seed=4, max_tokens=BUDGET,
              response_format=schema_format(SCHEMAS["points"]))
    whole = _chat(lite, **kw).choices[0].message.content
    pieces, finish = [], None
    for chunk in _chat(lite, stream=True, **kw):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop" and len([p for p in pieces if p]) > 1
    assert "".join(pieces) == whole
    assert_valid(whole, SCHEMAS["points"])


def test_server_batches_constrained_and_free_requests_together(lite) -> None:
    before = httpx.get(f"{lite.url}/health", timeout=10).json()["engine"]
    kinds = [PET, None, SCHEMAS["points"], None, SCHEMAS["scores"], None, SCHEMAS["code"], None] * 2
    start = threading.Barrier(len(kinds))

    def ask(i: int) -> tuple[dict | None, object]:
        schema = kinds[i]
        start.wait()
        out = _chat(lite, messages=[{"role": "user", "content": f"Request {i}."}], temperature=1.0, seed=i,
                    max_tokens=BUDGET if schema else 8,
                    **({"response_format": schema_format(schema)} if schema else {}))
        return schema, out.choices[0]

    with ThreadPoolExecutor(len(kinds)) as pool:
        answers = list(pool.map(ask, range(len(kinds))))
    for schema, choice in answers:
        if schema is not None:
            assert choice.finish_reason == "stop", choice.message.content
            assert_valid(choice.message.content, schema)
        else:
            assert isinstance(choice.message.content, str)
    after = httpx.get(f"{lite.url}/health", timeout=10).json()["engine"]
    assert after["requests"] - before["requests"] == len(kinds)
    assert after["batches"] - before["batches"] < len(kinds)              # requests shared decode batches
    assert after["largest_batch"] > 1


@pytest.mark.parametrize("response_format, fragment", [
    (schema_format({"type": "foo"}), 'Unsupported type "foo"'),
    (schema_format({"type": "string", "pattern": "("}), "parenthesis is not closed"),
    ({"type": "xml"}, "response_format.type must be one of"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema must be a JSON schema object"),
])
def test_server_bad_response_format_is_400(lite, response_format: dict, fragment: str) -> None:
    r = httpx.post(f"{lite.url}/v1/chat/completions", timeout=30, json={
        "model": "nvila-lite", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": response_format})
    err = assert_openai_error(r, 400)
    assert "response_format" in err["message"] and fragment in err["message"], err
    with pytest.raises(openai.BadRequestError):
        _chat(lite, messages=[{"role": "user", "content": "hi"}], max_tokens=4, response_format=response_format)
    assert lite.alive()
