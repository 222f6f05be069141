"""logit_bias through real HTTP on the real model: a banned token never appears, a forced one always does."""

from __future__ import annotations

from typing import Any

import pytest

from engines.text import GgufTokenizer
from tests.agent_process import RunningAgent, http_json
from tests.bundled import smollm2_gguf


def complete(agent: RunningAgent, **extra: Any) -> tuple[int, Any]:
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, **extra}
    status, _, answer = http_json("POST", f"{agent.inference_url}/completions", body)
    return status, answer


def test_a_banned_token_is_never_chosen_and_a_forced_one_always_is(running_agent: RunningAgent) -> None:
    tokenizer = GgufTokenizer.from_gguf(smollm2_gguf())
    status, plain = complete(running_agent)
    assert status == 200, plain
    first = tokenizer.encode(plain["choices"][0]["text"], add_special=False)[0]
    status, banned = complete(running_agent, logit_bias={str(first): -100})
    assert status == 200, banned
    assert first not in tokenizer.encode(banned["choices"][0]["text"], add_special=False)
    forced_id = tokenizer.encode(" banana", add_special=False)[0]
    status, forced = complete(running_agent, logit_bias={str(forced_id): 100})
    assert status == 200, forced
    assert tokenizer.encode(forced["choices"][0]["text"], add_special=False) == [forced_id] * 6


@pytest.mark.parametrize("bias", [{"abc": 1}, {"99999999": 1}, {"5": 101}])
def test_a_bad_logit_bias_is_a_400_naming_it(running_agent: RunningAgent, bias: dict[str, int]) -> None:
    status, answer = complete(running_agent, logit_bias=bias)
    assert status == 400, answer
    assert answer["error"]["param"].startswith("logit_bias")  # the map, or the entry that is out of range
