"""n > 1 through real HTTP on the real model: several independent answers, reproducible with a seed, counted right."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from tests.agent.test_websocket_stream import collect, ws_url
from tests.agent_process import RunningAgent, http_json

MODEL = "smollm2-135m-instruct"


def test_n_chat_choices_are_numbered_differ_and_repeat_with_the_seed(client: openai.OpenAI) -> None:
    def ask() -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Name an animal."}],
            n=3,
            temperature=1.0,
            seed=11,
            max_tokens=12,
        )

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1  # independent draws, not one answer three times
    assert texts == [c.message.content for c in again.choices]  # seed + index fixes each choice
    assert first.usage is not None and again.usage is not None
    single = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name an animal."}], max_tokens=1
    )
    assert single.usage is not None
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is counted once
    assert 3 <= first.usage.completion_tokens <= 3 * 12  # every choice's tokens, each choice at least one


def test_streamed_choices_reassemble_to_the_non_streamed_ones(client: openai.OpenAI) -> None:
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "n": 2,
        "temperature": 1.0,
        "seed": 5,
        "max_tokens": 10,
    }
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    texts = ["", ""]
    finishes: list[str | None] = [None, None]
    usage = None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):  # type: ignore[call-overload]
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert usage is not None and whole.usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_n_text_completions(running_agent: RunningAgent) -> None:
    status, _, body = http_json(
        "POST",
        f"{running_agent.inference_url}/completions",
        {"prompt": "Once upon a time", "n": 2, "temperature": 1.0, "seed": 1, "max_tokens": 5},
    )
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 10  # 5 each, never a stop inside 5 tokens of a story


@pytest.mark.parametrize("n", [0, 17])
def test_n_out_of_range_is_a_400(running_agent: RunningAgent, n: int) -> None:
    status, _, body = http_json(
        "POST",
        f"{running_agent.inference_url}/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "n": n},
    )
    assert status == 400, body
    assert body["error"]["param"] == "n"


async def test_the_websocket_stream_sends_every_choice_and_they_match_the_plain_answers(
    client: openai.OpenAI, running_agent: RunningAgent
) -> None:
    request: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Name a fruit."}],
        "n": 2,
        "temperature": 1.0,
        "seed": 21,
        "max_tokens": 10,
    }
    whole = client.chat.completions.create(model=MODEL, **request)
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(running_agent)) as ws:
        await ws.send_json({**request, "id": "two"})
        events = await collect(ws)
    done = events[-1]
    assert done["type"] == "done" and done["request"] == "two"
    texts = ["", ""]
    for chunk in events[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts == [c.message.content for c in whole.choices]
    assert done["choices"] == [{"index": c.index, "finish_reason": c.finish_reason} for c in whole.choices]
    assert done["finish_reason"] == whole.choices[0].finish_reason
    assert whole.usage is not None and done["usage"]["completion_tokens"] == whole.usage.completion_tokens
