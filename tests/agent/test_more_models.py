"""More than one chat model in one agent: a request for an installed model loads it, models stay `keep_alive`
after their last request, the least recently used idle one makes room at `models.max_loaded`, and `default_model`
changes while the agent runs. One agent for the module; its home has the bundled model under three more ids."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.agent_process import RunningAgent, http_json, start_agent
from tests.bundled import install_alias
from tests.waiting import eventually

BUNDLED = "smollm2-135m-instruct"
ALIASES = ("chat-a", "chat-b", "chat-c")
QUESTION = [{"role": "user", "content": "Say hello."}]


def thox(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    home = tmp_path_factory.mktemp("more-models")
    install_alias(home, *ALIASES)
    # In the config file, not the environment, so that they can change while the agent runs.
    for key, value in (("default_model", BUNDLED), ("models.max_loaded", "3"), ("models.keep_alive_seconds", "-1")):
        assert thox(home, "config", "set", key, value).returncode == 0
    running = start_agent(home)
    yield running
    assert running.stop() == 0


@pytest.fixture
def client(agent: RunningAgent) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.inference_url, api_key="unused", max_retries=0, timeout=300)


def cards(agent: RunningAgent) -> dict[str, dict[str, Any]]:
    status, _, body = http_json("GET", f"{agent.inference_url}/models")
    assert status == 200, body
    return {card["id"]: card for card in body["data"]}


def loaded(agent: RunningAgent) -> set[str]:
    return {
        model for model, card in cards(agent).items() if card["loaded"] and "chat.completions" in card["capabilities"]
    }


def ask(client: openai.OpenAI, model: str | None = None, **extra: Any) -> str:
    """One short answer; returns the model that gave it. Without `model`, a raw request (the SDK insists on one)."""
    if model is None:
        body = {"messages": QUESTION, "max_tokens": 4, "temperature": 0, **extra}
        status, _, answer = http_json("POST", f"{client.base_url}chat/completions", body)
        assert status == 200 and answer["choices"][0]["message"]["content"], answer
        return str(answer["model"])
    completion = client.chat.completions.create(
        model=model,
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=0,
        extra_body=extra or None,
    )
    assert completion.choices[0].message.content, completion
    return completion.model


def unload_all_but_the_first(agent: RunningAgent, client: openai.OpenAI) -> None:
    """Each test starts with only the bundled model loaded (keep_alive 0 unloads a model once it is idle)."""
    for model in loaded(agent) - {BUNDLED}:
        ask(client, model, keep_alive=0)
    eventually(lambda: loaded(agent) == {BUNDLED}, "only the bundled model loaded")


def test_every_installed_model_is_listed_with_its_card(agent: RunningAgent) -> None:
    listed = cards(agent)
    assert list(listed)[0] == BUNDLED and listed[BUNDLED]["default"] is True
    for model in ALIASES:
        card = listed[model]
        assert card["loaded"] is False and card["default"] is False, card
        assert (card["family"], card["quantization"], card["format"]) == ("llama", "Q4_1", "gguf"), card
        assert card["size"] > 50_000_000 and card["trained_context_length"] == 8192, card
        assert card["context_length"] == 2048 and {"chat.completions", "tools", "json"} <= set(card["capabilities"])
    status, _, one = http_json("GET", f"{agent.inference_url}/models/chat-b")
    assert status == 200 and one["id"] == "chat-b" and one["loaded"] is False, one


def test_a_request_loads_an_installed_model_and_both_answer(agent: RunningAgent, client: openai.OpenAI) -> None:
    unload_all_but_the_first(agent, client)
    assert ask(client, "chat-a") == "chat-a"
    assert ask(client, BUNDLED) == BUNDLED and ask(client) == BUNDLED  # the default is unchanged
    assert loaded(agent) == {BUNDLED, "chat-a"}
    card = cards(agent)["chat-a"]
    assert card["loaded"] is True and card["expires_at"] is None and card["placed"] is False, card  # keep_alive -1
    health = agent.health()
    (more,) = health["more_models"]
    assert more["model"] == "chat-a" and more["pid"] != health["engine"]["pid"], health  # an engine host of its own


def test_keep_alive_zero_unloads_once_idle_and_a_bad_one_is_refused(agent: RunningAgent, client: openai.OpenAI) -> None:
    unload_all_but_the_first(agent, client)
    assert ask(client, "chat-b", keep_alive="10m") == "chat-b"
    expires = cards(agent)["chat-b"]["expires_at"]
    assert expires is not None, cards(agent)["chat-b"]
    assert ask(client, "chat-b", keep_alive=0) == "chat-b"
    eventually(lambda: "chat-b" not in loaded(agent), "chat-b unloaded after keep_alive 0")
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, "chat-b", keep_alive="soon")
    assert info.value.body["param"] == "keep_alive" and "duration" in info.value.message, info.value.body  # type: ignore[index]
    assert "chat-b" not in loaded(agent)  # refused before anything was loaded


def test_the_least_recently_used_idle_model_makes_room(agent: RunningAgent, client: openai.OpenAI) -> None:
    unload_all_but_the_first(agent, client)
    ask(client, "chat-a")
    ask(client, "chat-b")
    ask(client, "chat-a")  # chat-b is now the least recently used
    assert loaded(agent) == {BUNDLED, "chat-a", "chat-b"}
    assert ask(client, "chat-c") == "chat-c"  # a fourth model at max_loaded 3
    assert loaded(agent) == {BUNDLED, "chat-a", "chat-c"}
    assert ask(client, "chat-b") == "chat-b"  # and back: chat-a goes now
    assert loaded(agent) == {BUNDLED, "chat-b", "chat-c"}


def test_unknown_model_names_the_installed_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, "gpt-9")
    assert info.value.code == "model_not_found"
    assert all(model in info.value.message for model in (BUNDLED, *ALIASES)), info.value.message


def test_default_model_changes_while_running(agent: RunningAgent, client: openai.OpenAI) -> None:
    unload_all_but_the_first(agent, client)
    refused = thox(agent.home, "config", "set", "default_model", "gpt-9")
    assert refused.returncode != 0 and "chat-a" in refused.stderr + refused.stdout, refused
    assert ask(client) == BUNDLED
    changed = thox(agent.home, "config", "set", "default_model", "chat-c")
    assert changed.returncode == 0, changed
    eventually(lambda: cards(agent)["chat-c"]["default"], "chat-c the default", timeout=120)
    assert ask(client) == "chat-c" and ask(client, BUNDLED) == BUNDLED
    assert cards(agent)[BUNDLED]["default"] is False
    assert thox(agent.home, "config", "set", "default_model", BUNDLED).returncode == 0
    eventually(lambda: cards(agent)[BUNDLED]["default"], "the bundled model the default again")
    assert ask(client) == BUNDLED
