"""ToolCallShaper: generated text to OpenAI's tool calls, however the text is split into pieces."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.api.openai.tools import ToolCallShaper

TWO_CALLS = (
    '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","note":"a } and </tool"}}</tool_call>'
    '<tool_call>{"name":"get_time","arguments":{}}</tool_call>'
)


def reassembled(deltas: list[dict[str, Any]]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        for part in delta.get("tool_calls", []):
            entry = calls.setdefault(part["index"], ["", ""])
            entry[0] += part["function"].get("name", "")
            entry[1] += part["function"].get("arguments", "")
    return [(name, arguments) for _, (name, arguments) in sorted(calls.items())]


@pytest.mark.parametrize("piece", [1, 2, 5, 13, 1000])
def test_streamed_calls_reassemble_to_the_whole_answer_for_any_split(piece: int) -> None:
    shaper = ToolCallShaper(enabled=True)
    deltas = [d for i in range(0, len(TWO_CALLS), piece) for d in shaper.push(TWO_CALLS[i : i + piece])]
    deltas += shaper.flush()
    assert shaper.finish_reason("stop") == "tool_calls"
    whole = ToolCallShaper(enabled=True).message(TWO_CALLS)
    assert whole["content"] is None
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in whole["tool_calls"]]
    assert reassembled(deltas) == expected
    assert json.loads(expected[0][1]) == {"city": "Paris", "note": "a } and </tool"}
    assert expected[1] == ("get_time", "{}")


def test_prose_is_content_and_finishes_as_it_finished() -> None:
    shaper = ToolCallShaper(enabled=True)
    deltas = shaper.push("Sunny") + shaper.push(" today.") + shaper.flush()
    assert "".join(d["content"] for d in deltas) == "Sunny today."
    assert shaper.finish_reason("stop") == "stop"


def test_a_call_cut_short_by_the_token_limit_is_length_not_tool_calls() -> None:
    shaper = ToolCallShaper(enabled=True)
    shaper.push('<tool_call>{"name":"get_time","arguments":{"tim')
    assert shaper.finish_reason("length") == "length"
    assert shaper.finish_reason("stop") == "stop"  # a call left open is never reported as complete calls


def test_without_tools_text_is_content_even_if_it_looks_like_a_call() -> None:
    shaper = ToolCallShaper(enabled=False)
    assert shaper.push("<tool_call>") == [{"content": "<tool_call>"}]
