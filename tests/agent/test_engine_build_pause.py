"""Thermal policy pauses model builds: the engine host converting a model is stopped, then continues to ready."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.engine import EngineHost, EngineHostConfig, EngineState
from engines.convert.cache import sha256_file
from tests.bundled import smollm2_gguf
from tests.waiting import until


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

        async def stopped() -> int:  # the first progress frame of the conversion stops the host (0: not yet)
            pid = host._pid
            return pid if pid is not None and await asyncio.to_thread(_process_state, pid) == "T" else 0

        stopped_pid = await until(stopped, "the converting engine host stopped (SIGSTOP)", timeout=60)
        # A window in which nothing may happen (it stays STARTING and stopped): there is no later event to wait
        # for instead, so this is a bounded pause, not a wait for a condition.
        await asyncio.sleep(1.5)
        assert host.state is EngineState.STARTING  # nothing happened while paused, and no start timeout either
        assert await asyncio.to_thread(_process_state, stopped_pid) == "T"

        host.controls.pause_builds(False)

        def ready() -> bool:  # a def, not a lambda: mypy would carry the STARTING narrowing above into a lambda
            return host.state is EngineState.READY

        await until(ready, "the resumed build reaching READY", timeout=120)
        assert host.pid == stopped_pid and host.restarts == 0  # the same process finished its build
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
