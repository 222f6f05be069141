"""logprobs / top_logprobs through real HTTP on the real model: chat and text completions, plain, SSE and the
WebSocket, in OpenAI's shapes, with the numbers the sampler started from."""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import openai

from tests.agent.test_websocket_stream import collect, ws_url
from tests.agent_process import RunningAgent, http_json

MODEL = "smollm2-135m-instruct"
ASK: list[Any] = [{"role": "user", "content": "Name three colours."}]


def check_entry(entry: Any, alternatives: int) -> None:
    """One token's logprobs: a real log-probability, its bytes, alternatives best first."""
    assert entry.logprob <= 0.0 and math.isfinite(entry.logprob)
    assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    assert len(entry.top_logprobs) == alternatives
    values = [alt.logprob for alt in entry.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert sum(math.exp(v) for v in values) <= 1.0 + 1e-4


def test_chat_logprobs_cover_every_token_and_greedy_picks_the_best_alternative(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert completion.usage is not None and len(entries) == completion.usage.completion_tokens
    for entry in entries:
        check_entry(entry, 3)
        # Greedy decoding takes the most likely token, so it is the first alternative, with the same number.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
    assert b"".join(bytes(e.bytes or []) for e in entries).decode() == choice.message.content


def test_logprobs_describe_the_model_not_the_temperature(client: openai.OpenAI) -> None:
    # The first token's distribution depends on the prompt only: a hot sampled request reports the same
    # alternatives as a greedy one.
    def first(temperature: float) -> Any:
        completion = client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=temperature, seed=3, max_tokens=1, logprobs=True, top_logprobs=5
        )
        content = completion.choices[0].logprobs
        assert content is not None and content.content is not None
        return [(alt.token, round(alt.logprob, 4)) for alt in content.content[0].top_logprobs]

    assert first(0.0) == first(1.8)


def test_without_top_logprobs_each_token_has_its_logprob_only_and_off_means_null(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, logprobs=True)
    content = completion.choices[0].logprobs
    assert content is not None and content.content
    for entry in content.content:
        check_entry(entry, 0)
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_are_the_non_streamed_ones(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "temperature": 1.0,
        "seed": 9,
        "max_tokens": 12,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    streamed: list[Any] = []
    text = ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    assert text == whole.choices[0].message.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]


def test_json_mode_alternatives_are_only_tokens_the_grammar_allows(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=6,
        logprobs=True,
        top_logprobs=20,
    )
    content = completion.choices[0].logprobs
    assert content is not None and content.content
    first = content.content[0]
    # A compact JSON object starts with "{": every alternative the mask left does, and they hold all the mass.
    assert first.top_logprobs and all(alt.token.startswith("{") for alt in first.top_logprobs)
    assert first.token.startswith("{")


def test_text_completion_logprobs_in_the_legacy_shape(running_agent: RunningAgent) -> None:
    status, _, body = http_json(
        "POST",
        running_agent.inference_url + "/completions",
        {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 2},
    )
    assert status == 200, body
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == body["usage"]["completion_tokens"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(offsets))]
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert len(top) == 2 and max(top.values()) == logprob and top[token] == logprob  # greedy: the best one


def test_streamed_text_completion_logprobs_add_up_to_the_whole(running_agent: RunningAgent) -> None:
    body: dict[str, Any] = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 4, "logprobs": 1}
    url = running_agent.inference_url + "/completions"
    status, _, whole = http_json("POST", url, body)
    assert status == 200
    client = openai.OpenAI(base_url=running_agent.inference_url, api_key="unused", max_retries=0)
    tokens: list[str] = []
    offsets: list[int] = []
    for chunk in client.completions.create(model=MODEL, stream=True, **body):
        logprobs = chunk.choices[0].logprobs
        if logprobs is not None:
            tokens += logprobs.tokens or []
            offsets += logprobs.text_offset or []
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert offsets == whole["choices"][0]["logprobs"]["text_offset"]


async def test_the_websocket_stream_carries_logprobs(running_agent: RunningAgent) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(running_agent)) as ws:
        await ws.send_json({"messages": ASK, "max_tokens": 6, "logprobs": True, "top_logprobs": 1})
        events = await collect(ws)
    done = events[-1]
    assert done["type"] == "done"
    entries = [e for c in events[:-1] for e in (c["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert len(entries) == done["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 1 and e["logprob"] <= 0 for e in entries)
