"""Fault: the disk holding the converted-model cache fills up while the engine host converts the model (GGUF ->
ONNX at start; the cache is a small tmpfs, fresh, so the conversion really runs).

What the user must see: the agent stays up; /v1/health says the engine cannot start and why (no space, in which
folder, what to do), and so does the 503 a request gets meanwhile; no half-written ONNX entry is left in the cache
for a later start to take as finished; once there is room, the same agent (no restart) converts and serves.
A cache far too small is refused before the conversion spends minutes of CPU on a device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engines.convert import ensure_converted
from engines.convert.cache import CacheSpaceError
from tests.agent_process import RunningAgent, http_json, start_agent
from tests.bundled import smollm2_gguf
from tests.faults.harness import Tmpfs, kill_agent, needs_root
from tests.waiting import eventually

pytestmark = needs_root

MIB = 1 << 20


@pytest.fixture
def agents(tmpfs: Callable[[Path, int], Tmpfs]) -> Iterator[list[RunningAgent]]:
    """Agents started by the test, stopped at the end before any tmpfs is unmounted (depends on `tmpfs`)."""
    started: list[RunningAgent] = []
    try:
        yield started
    finally:
        for agent in started:
            kill_agent(agent)


def entries(cache: Path) -> list[str]:
    """Finished cache entries: what a start would load (onnx/<digest>/<flavour>, never a .tmp- folder)."""
    onnx = cache / "onnx"
    return sorted(f"{d.parent.name[:12]}/{d.name}" for d in onnx.glob("*/*") if d.is_dir()) if onnx.exists() else []


def onnx_files(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())


def test_a_conversion_that_fills_the_disk_is_reported_and_retried_once_there_is_room(
    tmp_path: Path,
    tmpfs: Callable[[Path, int], Tmpfs],
    agents: list[RunningAgent],
) -> None:
    # Room for the check made before converting (about the GGUF's size), not for the whole entry (~117 MB): the
    # disk fills up in the middle of writing the weights.
    disk = tmpfs(tmp_path / "cache", 100)
    # Requests wait at most 0.3 s for the (failing) engine, so the 503 they get is quick to see.
    agent = start_agent(
        tmp_path / "home",
        env={"THOX_CACHE_DIR": str(disk.where), "THOX_ENGINE_READY_WAIT_SECONDS": "0.3"},
        wait_healthy=False,
    )
    agents.append(agent)

    def failed_for_space() -> dict[str, Any] | None:
        health = agent.health()
        error = health["engine"]["last_error"] or ""
        return health if "no space left in the model cache" in error else None

    health = eventually(failed_for_space, "the engine reporting the full cache", 120)
    error = health["engine"]["last_error"]
    assert health["status"] == "degraded" and health["engine"]["state"] in ("restarting", "starting"), health
    assert str(disk.where) in error and "SmolLM2-135M-Instruct.Q4_1.gguf" in error, error
    assert "free space there" in error and "THOX_CACHE_DIR" in error, error
    assert agent.process.poll() is None and health["process"]["pid"] == agent.process.pid
    # A request meanwhile gets a 503 that says the same, not a hang or a 500.
    status, _, body = http_json(
        "POST",
        f"{agent.inference_url}/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert status == 503 and body["error"]["code"] == "engine_unavailable", body
    assert (
        "no space left in the model cache" in body["error"]["message"]
        or "not enough space in the model cache" in body["error"]["message"]
    ), body
    # Nothing a later start would take for a finished conversion (a retry may be writing its temp folder now).
    assert entries(disk.where) == []
    assert all("/.tmp-" in f"/{f}" for f in onnx_files(disk.where)), onnx_files(disk.where)

    # Room made: the engine host's next try converts and the same agent serves.
    disk.resize(400)
    agent.wait_healthy(timeout=180)
    reply = http_json(
        "POST",
        f"{agent.inference_url}/chat/completions",
        {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        },
    )
    assert reply[0] == 200 and "Paris" in reply[2]["choices"][0]["message"]["content"], reply
    assert agent.process.poll() is None
    assert sum(1 for line in agent.log_lines() if line.get("event") == "agent_starting") == 1
    assert sorted(e.split("/")[1] for e in entries(disk.where)) == ["bert-encoder", "fused-last"]
    assert not [f for f in onnx_files(disk.where) if ".tmp-" in f]  # every unfinished try cleaned up


def test_a_cache_far_too_small_is_refused_before_converting(
    tmp_path: Path, tmpfs: Callable[[Path, int], Tmpfs]
) -> None:
    disk = tmpfs(tmp_path / "cache", 16)
    stages: list[str] = []
    gguf = smollm2_gguf()
    with pytest.raises(CacheSpaceError, match="not enough space in the model cache") as info:
        ensure_converted(gguf, disk.where, sha256="0" * 64, progress=lambda stage, done, total: stages.append(stage))
    assert stages == []  # refused before reading the model, let alone converting it
    assert f"at least {math.floor(gguf.stat().st_size * 0.9) / 1e6:.1f} MB" in str(info.value), info.value
    assert "THOX_CACHE_DIR" in str(info.value)
    assert entries(disk.where) == [] and onnx_files(disk.where) == []
