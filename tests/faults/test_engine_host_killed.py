"""Fault: the engine host is SIGKILLed while 16 SSE streams are decoding on it.

What the user must see: every stream ends (none hangs) with an error event carrying code `engine_crashed` (or
normally, had it finished before the kill); the agent itself keeps running (same process, no restart), its
health says the engine is restarting, and once the engine host is back the next request is served.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agent_process import RunningAgent, start_agent
from tests.faults.harness import alive, kill_agent
from tests.waiting import until

STREAMS = 16
MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Tell me a very long story about a dragon and a knight."}]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    """An agent of its own (its engine host gets killed), with a batch wide enough for every stream."""
    running = start_agent(tmp_path / "home", env={"THOX_ENGINE_MAX_BATCH": str(STREAMS)})
    try:
        yield running
        assert running.stop() == 0  # and it still stops cleanly
    finally:
        kill_agent(running)  # only if it did not stop


class Stream:
    """One SSE chat stream: its events as they come, and how it ended."""

    def __init__(self) -> None:
        self.content_chunks = 0
        self.events: list[dict[str, Any]] = []
        self.done = False  # the `[DONE]` sentinel came

    @property
    def error(self) -> dict[str, Any] | None:
        return next((e["error"] for e in self.events if "error" in e), None)

    @property
    def finish_reason(self) -> str | None:
        return next((c["finish_reason"] for e in self.events for c in e.get("choices", []) if c["finish_reason"]), None)


async def read_stream(session: aiohttp.ClientSession, url: str, stream: Stream) -> None:
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 500, "stream": True}
    async with session.post(f"{url}/chat/completions", json=body) as answer:
        assert answer.status == 200, await answer.text()
        async for raw in answer.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                stream.done = True
                continue
            event = json.loads(data)
            stream.events.append(event)
            if any(c["delta"].get("content") for c in event.get("choices", [])):
                stream.content_chunks += 1


async def test_sixteen_streams_end_with_engine_crashed_and_the_next_request_is_served(agent: RunningAgent) -> None:
    before = await asyncio.to_thread(agent.health)
    engine_pid, restarts = before["engine"]["pid"], before["engine"]["restarts"]
    agent_pid = agent.process.pid
    assert before["process"]["pid"] == agent_pid
    streams = [Stream() for _ in range(STREAMS)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=240)) as session:
        readers = [asyncio.create_task(read_stream(session, agent.inference_url, s)) for s in streams]
        try:
            # Kill only once every stream is decoding in the engine (each has had generated text).
            await until(
                lambda: all(s.content_chunks for s in streams) or any(r.done() for r in readers),
                "every stream producing text",
                timeout=120,
            )
            assert not any(r.done() for r in readers), [r.exception() for r in readers if r.done()]
            os.kill(engine_pid, signal.SIGKILL)
            # None hangs: each reader returns once its stream has ended.
            await asyncio.wait_for(asyncio.gather(*readers), 60)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

        for number, stream in enumerate(streams):
            if stream.error is None:  # only acceptable for a stream that had completed before the kill
                assert stream.done and stream.finish_reason in ("stop", "length"), (number, stream.events[-3:])
                continue
            assert stream.error["code"] == "engine_crashed", (number, stream.error)
            assert stream.error["type"] == "server_error" and "retry" in stream.error["message"]
            assert stream.events[-1] == {"error": stream.error}  # the error is the stream's last word
            assert not stream.done  # an error is not followed by [DONE], which would read as success
        assert any(s.error is not None for s in streams), "every stream had finished before the kill"

        # The agent lived through it: same process, restarted only its engine host, and serves the next request.
        health = await asyncio.to_thread(agent.wait_healthy, 120)
        assert agent.process.poll() is None and health["process"]["pid"] == agent_pid
        assert health["engine"]["restarts"] == restarts + 1 and health["engine"]["pid"] != engine_pid
        assert not alive(engine_pid)  # the killed host is gone, not somehow still serving
        assert health["uptime_seconds"] > before["uptime_seconds"]
        reply_body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 16,
        }
        async with session.post(f"{agent.inference_url}/chat/completions", json=reply_body) as answer:
            assert answer.status == 200, await answer.text()
            reply = await answer.json()
        assert "Paris" in reply["choices"][0]["message"]["content"]
    assert sum(1 for line in agent.log_lines() if line.get("event") == "agent_starting") == 1
    assert await asyncio.to_thread(agent.health)  # still answering after the crash and the restart
