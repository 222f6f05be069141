"""Thermal policy pauses model builds: the engine host converting a model is stopped, then continues to ready."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.engine import EngineHost, EngineHostConfig, EngineState
from engines.convert.cache import sha256_file
from tests.bundled import smollm2_gguf


def _process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_a_paused_build_stops_the_converting_host_and_resumes_to_ready(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    sha256 = await asyncio.to_thread(sha256_file, gguf)
    host = EngineHost(
        EngineHostConfig(
            model_id="smollm2",
            gguf=gguf,
            sha256=sha256,
            cache_dir=tmp_path / "cache",  # empty: it must convert
            run_dir=tmp_path / "run",
            threads=2,
            max_context=512,
            max_batch=4,
            max_queue=4,
            kv_budget_tokens=2048,
            prefix_cache_tokens=0,
            start_timeout=120,
            ready_wait=1,
        )
    )
    host.controls.pause_builds(True)
    task = asyncio.create_task(host.run())
    try:
        for _ in range(600):  # the first progress frame of the conversion stops the host
            if host._pid is not None and await asyncio.to_thread(_process_state, host._pid) == "T":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the converting engine host was never stopped")
        stopped_pid = host._pid
        await asyncio.sleep(1.5)
        assert host.state is EngineState.STARTING  # nothing happened while paused, and no start timeout either
        assert await asyncio.to_thread(_process_state, stopped_pid) == "T"

        host.controls.pause_builds(False)
        for _ in range(1200):
            if host.state is EngineState.READY:
                break
            await asyncio.sleep(0.05)
        assert host.state is EngineState.READY
        assert host.pid == stopped_pid and host.restarts == 0  # the same process finished its build
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
