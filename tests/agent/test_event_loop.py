"""The agent runs in this test's own event loop with BlockBuster armed (tests/conftest.py): a blocking call fails.

This covers start-up, chat (plain, SSE, WebSocket), health, and shutdown by SIGTERM, so a blocking file read,
sleep or socket call slipped into the serving path is caught here rather than as latency on the device.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from agent.service import serve
from agent.settings import load_settings
from tests.agent_process import TEST_MODEL_CACHE


@pytest.mark.allow_blocking("load_settings before the agent starts; serve() and all it runs stay checked")
async def test_serving_never_blocks_the_event_loop(tmp_path: Path) -> None:
    settings = load_settings(
        {"api.inference_port": 0, "api.cluster_port": 0, "engine.threads": 2, "cache_dir": str(TEST_MODEL_CACHE)},
        home=tmp_path,
        env={},
    )
    endpoints = settings.run_dir / "endpoints.json"
    question = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12}
    agent_task = asyncio.create_task(serve(settings))
    while not await asyncio.to_thread(endpoints.exists):
        assert not agent_task.done(), agent_task
        await asyncio.sleep(0.05)
    record = json.loads(await asyncio.to_thread(endpoints.read_text))
    base, cluster = record["inference_url"], record["cluster_url"]
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            async with session.get(f"{cluster}/health") as response:
                if (await response.json())["status"] == "ok":
                    break
            await asyncio.sleep(0.1)
        async with session.post(f"{base}/chat/completions", json=question) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["usage"]["completion_tokens"] > 0
        async with session.post(f"{base}/chat/completions", json={**question, "stream": True}) as response:
            body = await response.text()
            assert body.rstrip().endswith("data: [DONE]")
        async with session.ws_connect(base.replace("http", "ws") + "/stream") as ws:
            await ws.send_json(question)
            while (event := await ws.receive_json(timeout=60))["type"] == "chunk":
                pass
            assert event["type"] == "done"
        async with session.get(f"{base}/nope") as response:
            assert response.status == 404
    os.kill(os.getpid(), signal.SIGTERM)  # the agent's own handler turns this into an orderly stop
    await asyncio.wait_for(agent_task, 60)
