"""Function calling through real HTTP, the real agent and model, with the OpenAI SDK: calls in OpenAI's shape,
arguments valid against each function's schema, streamed deltas that reassemble to the same calls."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.agent.test_websocket_stream import collect, ws_url
from tests.agent_process import RunningAgent, http_json

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 30}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls: Any) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_forces_valid_calls_in_openais_shape(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=4
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    check_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_called_and_parallel_false_gives_one_call(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        temperature=1.0,
        seed=2,
    )
    calls = completion.choices[0].message.tool_calls
    check_calls(calls)
    assert calls is not None and [c.function.name for c in calls if c.type == "function"] == ["get_time"]


def test_none_answers_in_prose(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40
    )
    message = completion.choices[0].message
    assert message.tool_calls is None and message.content


def test_auto_gives_prose_or_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(3):
        completion = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=60
        )
        choice = completion.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            check_calls(choice.message.tool_calls)
        else:
            assert choice.message.content and not choice.message.content.startswith("<")


ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 60}},
    "required": ["answer"],
    "additionalProperties": False,
}


def test_with_a_response_format_the_answer_is_valid_json_or_valid_calls(client: openai.OpenAI) -> None:
    answer_format: Any = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    prose = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", response_format=answer_format, max_tokens=60
    )
    assert prose.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(prose.choices[0].message.content or ""), ANSWER)
    kinds = set()
    for seed in range(4):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            response_format=answer_format,
            temperature=1.0,
            seed=seed,
            max_tokens=60,
        )
        choice = completion.choices[0]
        if choice.message.tool_calls:
            check_calls(choice.message.tool_calls)
            kinds.add("calls")
        elif choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content or ""), ANSWER)
            kinds.add("json")
    assert kinds  # at least one answer finished within max_tokens


def test_a_conversation_round_trip_with_a_tool_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0
    )
    calls = first.choices[0].message.tool_calls
    check_calls(calls)
    assert calls is not None
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
    ]
    for call in calls:
        history.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})})
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60
    )
    assert second.choices[0].message.content and second.choices[0].message.tool_calls is None
    assert second.usage is not None and second.usage.prompt_tokens > (first.usage.prompt_tokens if first.usage else 0)


def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_calls(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 1.0,
        "seed": 9,
    }
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert whole is not None
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": ""})
            if delta.id:
                entry["id"] = delta.id
            if delta.function and delta.function.name:
                entry["name"] = delta.function.name
            if delta.function and delta.function.arguments:
                entry["arguments"] += delta.function.arguments
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [
        (c.function.name, c.function.arguments) for c in whole
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


async def test_the_websocket_stream_sends_tool_call_deltas(running_agent: RunningAgent) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(running_agent)) as ws:
        await ws.send_json({"messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0})
        events = await collect(ws)
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "tool_calls"
    deltas = [d for e in events[:-1] for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] in SCHEMAS and deltas[0]["id"].startswith("call_")
    arguments = "".join(d["function"].get("arguments", "") for d in deltas if d["index"] == 0)
    jsonschema.validate(json.loads(arguments), SCHEMAS[deltas[0]["function"]["name"]])


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "invalid_value"),
        ({"tools": None, "tool_choice": "auto"}, "tool_choice", "invalid_value"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}]},
            "tools[0].function.parameters",
            "invalid_value",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"uniqueItems": True}}}},
            "response_format.json_schema.schema",
            "unsupported_parameter",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_parameter(
    running_agent: RunningAgent, extra: dict[str, Any], param: str, code: str
) -> None:
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    status, _, answer = http_json("POST", f"{running_agent.inference_url}/chat/completions", body)
    assert status == 400, answer
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)
