"""Continuous batching through real HTTP: batch-independent outputs, the bounded queue, freed slots, prefix reuse."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.agent_process import RunningAgent, start_agent
from tests.waiting import eventually

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def constrained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """An agent that runs one sequence at a time, queues none and keeps no prefixes."""
    running = start_agent(
        tmp_path_factory.mktemp("constrained-home"),
        env={"THOX_ENGINE_MAX_BATCH": "1", "THOX_ENGINE_MAX_QUEUE": "0", "THOX_ENGINE_PREFIX_CACHE_TOKENS": "0"},
    )
    yield running
    running.stop()


def sdk(agent: RunningAgent) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.inference_url, api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, content: str, seed: int, max_tokens: int = 40) -> str:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        temperature=0.8,
        top_p=0.95,
        seed=seed,
        max_tokens=max_tokens,
    )
    return reply.choices[0].message.content or ""


def test_output_is_the_same_alone_or_alongside_seven_others(running_agent: RunningAgent) -> None:
    client = sdk(running_agent)
    alone = ask(client, "Tell me about the sea.", seed=42)
    others = [f"Write a line about the number {n}." for n in range(7)]
    with ThreadPoolExecutor(8) as pool:
        together = pool.submit(ask, client, "Tell me about the sea.", 42)
        neighbours = [pool.submit(ask, client, prompt, n) for n, prompt in enumerate(others)]
        assert together.result() == alone
        assert all(f.result() for f in neighbours)
    # Nothing is left behind once every answer is in (the host reports its counters once a second).

    def drained() -> bool:
        stats = running_agent.health()["engine"]["scheduler"]
        assert not stats["live"] and not stats["waiting"], stats
        return True

    eventually(drained, "no live or waiting sequences in the scheduler")


def test_a_full_queue_answers_503_with_retry_after(constrained: RunningAgent) -> None:
    client = sdk(constrained)
    # A completion that keeps counting holds the only place for as long as the test needs.
    with client.completions.with_streaming_response.create(
        model=MODEL,
        prompt="1, 2, 3, 4, 5, 6, 7,",
        max_tokens=1000,
        temperature=0,
        stream=True,
    ) as running:
        lines = running.iter_lines()  # keep the iterator: dropping it closes the connection
        next(lines)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=stream
                )
            assert info.value.status_code == 503
            assert info.value.code == "server_overloaded"
            assert info.value.response.headers["retry-after"] == "1"
    # The client left: its slot is free at the next token, so the next request is served.
    eventually(lambda: constrained.health()["engine"]["active_streams"] == 0, "the closed stream leaving the engine")
    assert ask(client, "Hi", seed=1, max_tokens=3)


def test_the_sdk_retries_a_503_until_a_slot_frees(constrained: RunningAgent) -> None:
    patient = openai.OpenAI(base_url=constrained.inference_url, api_key="unused", max_retries=5, timeout=120)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda n: ask(patient, f"Count to {n}.", seed=n, max_tokens=20), (3, 4)))
    assert all(results)


def test_prefix_reuse_gives_identical_output(running_agent: RunningAgent, constrained: RunningAgent) -> None:
    system = (
        "You are a meticulous assistant for a small hardware company. Answer briefly, in plain English, "
        "and never invent facts you do not know."
    )
    turn1: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": system},
        {"role": "user", "content": "What is a capacitor?"},
    ]

    def conversation(agent: RunningAgent) -> tuple[str, str]:
        client = sdk(agent)
        first = client.chat.completions.create(model=MODEL, messages=turn1, temperature=0, max_tokens=40)
        answer = first.choices[0].message.content or ""
        turn2: list[ChatCompletionMessageParam] = [
            *turn1,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And a resistor?"},
        ]
        second = client.chat.completions.create(model=MODEL, messages=turn2, temperature=0, max_tokens=40)
        return answer, second.choices[0].message.content or ""

    before = running_agent.health()["engine"].get("scheduler", {}).get("prefix_tokens_reused", 0)
    reused = conversation(running_agent)
    recomputed = conversation(constrained)  # prefix cache off
    assert reused == recomputed

    def reused_tokens() -> int:  # the engine reports its counters about once a second
        after = running_agent.health()["engine"].get("scheduler", {}).get("prefix_tokens_reused", 0)
        # At least the system prompt and the first exchange were not recomputed.
        assert after - before >= 40, (before, after)
        return int(after - before)

    eventually(reused_tokens, "the reported prefix reuse of the second conversation turn")
