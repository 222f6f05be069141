"""response_format through real HTTP, the real agent and model: JSON mode, JSON schemas, the SDK's parse()."""

from __future__ import annotations

import json
from typing import Any, Literal

import aiohttp
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, Field

from tests.agent.test_websocket_stream import collect, ws_url
from tests.agent_process import RunningAgent, http_json

MODEL = "smollm2-135m-instruct"
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Describe a city as JSON."}]
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
        "coastal": {"type": "boolean"},
    },
    "required": ["name", "population", "coastal"],
    "additionalProperties": False,
}


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


def city_format(strict: bool) -> Any:  # the SDK's ResponseFormatJSONSchema, as a plain dict
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": strict}}


def test_the_sdk_parse_returns_a_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person,
        temperature=1.0,
        seed=3,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Person)
    assert completion.choices[0].finish_reason == "stop"
    assert Person.model_validate_json(message.content or "") == message.parsed


@pytest.mark.parametrize("strict", [True, False])
def test_a_json_schema_is_followed_strict_or_not(client: openai.OpenAI, strict: bool) -> None:
    for seed in range(3):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format=city_format(strict),
            temperature=1.0,
            seed=seed,
        )
        jsonschema.validate(json.loads(completion.choices[0].message.content or ""), CITY)


def test_json_mode_answers_a_json_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        # Greedy, and a question with a short answer: an object of any shape can nest or repeat past any budget
        # on a 135M model.
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=400,
    )
    assert completion.choices[0].finish_reason == "stop"
    answer = json.loads(completion.choices[0].message.content or "")
    assert isinstance(answer, dict) and "Paris" in json.dumps(answer)


def test_a_streamed_json_schema_answer_reassembles_to_valid_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format=city_format(True),
        temperature=1.0,
        seed=5,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), CITY)


async def test_the_websocket_stream_follows_the_schema_too(running_agent: RunningAgent) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url(running_agent)) as ws:
        await ws.send_json({"messages": ASK, "response_format": city_format(True), "temperature": 1.0, "seed": 2})
        events = await collect(ws)
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"
    jsonschema.validate(json.loads("".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])), CITY)


@pytest.mark.parametrize(
    ("response_format", "param", "code", "named"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
            "response_format.json_schema.schema",
            "unsupported_parameter",
            "uniqueItems",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}},
            "response_format.json_schema.schema",
            "invalid_value",
            "strng",
        ),
        ({"type": "json_schema"}, "response_format.json_schema", "missing_required_parameter", "json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "has spaces", "schema": {}}},
            "response_format.json_schema.name",
            "invalid_value",
            "name",
        ),
        ({"type": "yaml"}, "response_format.type", "invalid_value", "type"),
    ],
)
def test_a_bad_response_format_is_a_400_naming_the_problem(
    running_agent: RunningAgent, response_format: dict[str, Any], param: str, code: str, named: str
) -> None:
    status, _, body = http_json(
        "POST",
        f"{running_agent.inference_url}/chat/completions",
        {"messages": ASK, "response_format": response_format, "max_tokens": 4},
    )
    assert status == 400, body
    error = body["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert named in error["message"]
