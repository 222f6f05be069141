"""Constrained decoding on the real model: output valid by construction at temperature 1.0, in a continuous batch,
without changing what the unconstrained sequences of the batch produce."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import llguidance
import pytest

from engines.base import Done, Failed, GenerationEvent, GenerationRequest, SamplingParams, Tokens
from engines.onnxruntime import OrtExecutor
from engines.runtime.grammar import Grammars, MaskBatch, SchemaError, json_schema_grammar, mask_executor, token_table
from engines.runtime.scheduler import Scheduler, SchedulerLimits
from engines.text import GgufTokenizer
from tests.engines.json_schemas import SCHEMAS

PROMPT = "<|im_start|>user\nDescribe something as JSON.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> GgufTokenizer:
    return GgufTokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def table(tokenizer: GgufTokenizer) -> llguidance.LLTokenizer:
    return token_table(tokenizer)


class Run:
    """A scheduler over the real executor, collecting each request's tokens and how it ended."""

    def __init__(self, executor: OrtExecutor, table: llguidance.LLTokenizer, *, overlap: bool = False) -> None:
        self.grammars = Grammars(table)
        masks = MaskBatch(mask_executor(2), executor.vocab_size, overlap=overlap)
        self.tokens: dict[int, list[int]] = {}
        self.ended: dict[int, Done | Failed] = {}
        self._all_ended = asyncio.Event()
        self._expected = 0
        self.scheduler = Scheduler(
            executor, self._on, SchedulerLimits(max_batch=16, prefix_cache_tokens=0), (self.grammars, masks)
        )

    def _on(self, event: GenerationEvent) -> None:
        if isinstance(event, Tokens):
            self.tokens.setdefault(event.id, []).extend(event.ids)
        else:
            assert event.id is not None
            self.ended[event.id] = event
            if len(self.ended) >= self._expected:
                self._all_ended.set()

    async def generate(self, requests: list[GenerationRequest]) -> None:
        self._expected = len(requests)
        task = asyncio.create_task(self.scheduler.run())
        try:
            for request in requests:
                self.scheduler.submit(request)
            await self._all_ended.wait()  # bounded by the test's timeout
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def request(
    tokenizer: GgufTokenizer, request_id: int, grammar: str | None, *, seed: int, max_tokens: int = 256
) -> GenerationRequest:
    return GenerationRequest(
        id=request_id,
        prompt=tokenizer.encode(PROMPT),
        params=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed),
        stop_ids=tokenizer.stop_ids,
        grammar=grammar,
    )


@pytest.fixture
def run(executor: OrtExecutor, table: llguidance.LLTokenizer) -> Run:
    return Run(executor, table)


@pytest.mark.timeout(900)
async def test_every_schema_of_the_corpus_gives_valid_json_at_temperature_one(
    run: Run, tokenizer: GgufTokenizer
) -> None:
    assert len(SCHEMAS) >= 50
    requests = [request(tokenizer, i, json_schema_grammar(schema), seed=i) for i, schema in enumerate(SCHEMAS)]
    await run.generate(requests)
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    wrong = []
    for i, schema in enumerate(SCHEMAS):
        ended = run.ended[i]
        text = tokenizer.decode(run.tokens.get(i, []), skip_special=True)
        try:
            assert isinstance(ended, Done) and ended.finish_reason == "stop", ended
            jsonschema.validate(json.loads(text), schema, format_checker=checker)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            wrong.append(f"schema {i} {json.dumps(schema)[:100]}: {text[:120]!r}: {str(exc)[:160]}")
    assert not wrong, "\n".join(wrong)


# Masks computed just before the forward pass (no spare core) or beside it (a box with cores to spare).
@pytest.mark.parametrize("overlap", [False, True], ids=["masks-before", "masks-beside"])
async def test_a_constrained_sequence_among_unconstrained_ones_gives_what_it_gives_alone(
    executor: OrtExecutor, table: llguidance.LLTokenizer, tokenizer: GgufTokenizer, overlap: bool
) -> None:
    grammar = json_schema_grammar(SCHEMAS[48])
    alone = Run(executor, table)
    await alone.generate([request(tokenizer, 0, grammar, seed=7)])
    batched = Run(executor, table, overlap=overlap)
    await batched.generate(
        [request(tokenizer, i, None, seed=100 + i, max_tokens=48) for i in range(1, 8)]
        + [request(tokenizer, 0, grammar, seed=7)]
    )
    assert batched.tokens[0] == alone.tokens[0]
    assert all(isinstance(batched.ended[i], Done) for i in range(8))
    # The unconstrained ones were not constrained: at temperature 1 they write prose, not this JSON.
    assert any(not tokenizer.decode(batched.tokens[i]).lstrip().startswith("{") for i in range(1, 8))


async def test_a_repeated_grammar_is_compiled_once(run: Run, tokenizer: GgufTokenizer) -> None:
    grammar = json_schema_grammar(SCHEMAS[17])
    await run.generate([request(tokenizer, i, grammar, seed=i, max_tokens=64) for i in range(3)])
    assert (run.grammars.compiled, run.grammars.reused) == (1, 2)


async def test_a_grammar_that_does_not_compile_fails_only_its_request(run: Run, tokenizer: GgufTokenizer) -> None:
    await run.generate(
        [request(tokenizer, 0, "not a grammar %%%", seed=0), request(tokenizer, 1, None, seed=1, max_tokens=8)]
    )
    failed = run.ended[0]
    assert isinstance(failed, Failed) and failed.code == "bad_request" and "grammar" in failed.message
    assert isinstance(run.ended[1], Done)


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "format": "hostname-ish"}, "format"),
    ],
)
def test_a_schema_keyword_that_cannot_be_enforced_is_named(schema: dict[str, object], keyword: str) -> None:
    with pytest.raises(SchemaError) as raised:
        json_schema_grammar(schema)
    assert raised.value.keyword == keyword


@pytest.mark.parametrize(
    "schema",
    [{"type": "strng"}, {"type": "integer", "minimum": 5, "maximum": 2}, {"$ref": "#/$defs/missing"}],
)
def test_an_invalid_schema_is_refused_without_a_keyword(schema: dict[str, object]) -> None:
    with pytest.raises(SchemaError) as raised:
        json_schema_grammar(schema)
    assert raised.value.keyword is None
