"""The engine host dies, clients disconnect, the agent is stopped: nothing hangs and everyone gets a clean answer."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.agent_process import RunningAgent, http_json, start_agent
from tests.waiting import eventually

LONG: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a very long story about a dragon and a knight."}
]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """An agent of its own: these tests kill its engine."""
    # Requests wait at most 0.3 s for a restarting engine, so "engine down" is observable as a 503.
    running = start_agent(tmp_path_factory.mktemp("lifecycle-home"), env={"THOX_ENGINE_READY_WAIT_SECONDS": "0.3"})
    yield running
    running.stop()


def sdk(agent: RunningAgent) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.inference_url, api_key="unused", max_retries=0, timeout=120)


def engine_pid(agent: RunningAgent) -> int:
    pid = agent.wait_healthy()["engine"]["pid"]
    assert isinstance(pid, int)
    return pid


def streams(agent: RunningAgent) -> int:
    """Streams the agent's engine is serving now."""
    count = agent.health()["engine"]["active_streams"]
    assert isinstance(count, int)
    return count


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def proc_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_health_reports_the_agent_process(agent: RunningAgent) -> None:
    process = agent.wait_healthy()["process"]
    pid = agent.process.pid
    assert process["pid"] == pid  # the agent itself, not its engine host child
    # Seen from outside at about the same moment; a connection opening or closing in between moves it a little.
    assert abs(process["open_fds"] - len(os.listdir(f"/proc/{pid}/fd"))) <= 4
    assert process["open_fds"] > 3
    assert abs(process["rss_bytes"] - proc_rss_bytes(pid)) <= 0.1 * proc_rss_bytes(pid)
    idle_tasks = process["asyncio_tasks"]
    assert idle_tasks > 1  # the health request's own task plus the agent's long-lived ones
    with sdk(agent).chat.completions.with_streaming_response.create(
        messages=LONG,
        model="smollm2-135m-instruct",
        max_tokens=1000,
        stream=True,
    ) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        # A stream in flight is served by a task of the agent's loop: the count must see it.
        assert agent.health()["process"]["asyncio_tasks"] > idle_tasks
    # The next tests count streams: let this one leave the engine first.
    eventually(lambda: streams(agent) == 0, "the closed stream leaving the engine")


def test_engine_killed_mid_stream_gives_an_error_event_and_recovers(agent: RunningAgent) -> None:
    pid = engine_pid(agent)
    restarts = agent.health()["engine"]["restarts"]
    stream = sdk(agent).chat.completions.create(
        messages=LONG, model="smollm2-135m-instruct", max_tokens=1000, stream=True
    )

    def read_all() -> None:
        for received, _ in enumerate(stream, start=1):
            if received == 3:
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(openai.APIError) as info:
        read_all()
    assert "engine" in info.value.message
    health = agent.health()
    assert health["status"] != "ok"
    assert health["engine"]["state"] in ("restarting", "starting")
    # The host is restarted on its own and the next request works.
    health = agent.wait_healthy(timeout=120)
    assert health["engine"]["restarts"] == restarts + 1
    assert health["engine"]["pid"] != pid
    reply = sdk(agent).chat.completions.create(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        model="smollm2-135m-instruct",
        temperature=0,
    )
    assert "Paris" in (reply.choices[0].message.content or "")


def test_engine_killed_during_a_plain_request_gives_503(agent: RunningAgent) -> None:
    pid = engine_pid(agent)
    result: dict[str, Any] = {}

    def call() -> None:
        result["reply"] = http_json(
            "POST", f"{agent.inference_url}/chat/completions", {"messages": LONG, "max_tokens": 1000}
        )

    caller = threading.Thread(target=call)
    caller.start()
    eventually(lambda: streams(agent) == 1, "the plain request reaching the engine", interval=0.01)
    os.kill(pid, signal.SIGKILL)  # the request is in the engine's hands: it dies mid-request
    caller.join(60)
    status, headers, body = result["reply"]
    assert status == 503
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "engine_crashed"
    assert headers["retry-after"] == "1"
    agent.wait_healthy(timeout=120)


def test_requests_while_the_engine_is_down_get_503(agent: RunningAgent) -> None:
    os.kill(engine_pid(agent), signal.SIGKILL)
    # Until the agent has seen the exit, a request still goes to the dead host and fails as engine_crashed.
    eventually(lambda: agent.health()["engine"]["state"] != "ready", "the agent noticing its engine host died")
    client = sdk(agent)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(messages=LONG, model="smollm2-135m-instruct", stream=stream)
        assert info.value.status_code == 503
        assert info.value.code == "engine_unavailable"
        assert info.value.response.headers["retry-after"] == "1"
    # /v1/health keeps answering meanwhile and says why.
    health = agent.health()
    assert health["status"] == "degraded"
    assert "exited with status -9" in health["engine"]["last_error"]
    agent.wait_healthy(timeout=120)


def test_client_disconnect_cancels_generation(agent: RunningAgent) -> None:
    agent.wait_healthy()
    client = sdk(agent)
    with client.chat.completions.with_streaming_response.create(
        messages=LONG,
        model="smollm2-135m-instruct",
        max_tokens=1000,
        stream=True,
    ) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert agent.health()["engine"]["active_streams"] == 1
    # Closing the connection ends the stream in the agent and frees its slot in the engine.
    eventually(lambda: streams(agent) == 0, "the disconnected stream leaving the engine")


def test_client_disconnect_cancels_a_plain_request(agent: RunningAgent) -> None:
    agent.wait_healthy()
    host, port = agent.inference_url.split("//")[1].split("/")[0].split(":")
    body = json.dumps({"messages": LONG, "max_tokens": 1000}).encode()
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        eventually(lambda: streams(agent) == 1, "the plain request reaching the engine", interval=0.01)
    eventually(lambda: streams(agent) == 0, "the disconnected plain request leaving the engine")


def test_sigterm_lets_in_flight_streams_finish(fresh_home: Path) -> None:
    running = start_agent(fresh_home)
    pid = engine_pid(running)
    stream = sdk(running).chat.completions.create(
        messages=LONG, model="smollm2-135m-instruct", max_tokens=40, stream=True
    )
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 2:
            running.process.send_signal(signal.SIGTERM)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert running.process.wait(60) == 0
    assert not alive(pid)
    assert not (fresh_home / "run" / "endpoints.json").exists()
