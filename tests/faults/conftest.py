"""Fixtures for the fault suite: small tmpfs mounts standing in for a full disk (always unmounted afterwards) and
stacks of real agents (always killed, with their children, before the mounts go)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent_process import RunningAgent, cluster_env, start_agent
from tests.faults.harness import Tmpfs, kill_agent


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, int], Tmpfs]]:
    """Mount tmpfs disks (`tmpfs(folder, megabytes)`); every one is unmounted at the end, pass or fail."""
    mounted: list[Path] = []

    def mount(where: Path, megabytes: int) -> Tmpfs:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0755", "tmpfs", str(where)], check=True, timeout=30
        )
        mounted.append(where)
        return Tmpfs(where)

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            # Lazy: a process the test left behind may still hold a file open; the mount goes once it lets go.
            subprocess.run(["umount", "--lazy", str(where)], check=False, timeout=30)


@pytest.fixture
def boxes(tmp_path: Path, tmpfs: Callable[[Path, int], Tmpfs]) -> Iterator[Callable[..., RunningAgent]]:
    """Start real agents with the cluster layer on (`boxes(name, env)`; a name started before is the same box
    started again: same home, same ports); all are killed at the end, before any tmpfs is unmounted (this fixture
    depends on `tmpfs` so it is torn down first)."""
    started: list[RunningAgent] = []
    envs: dict[str, dict[str, str]] = {}

    def box(name: str, extra: dict[str, str] | None = None) -> RunningAgent:
        env = envs.setdefault(name, {**(extra or {}), **cluster_env(name), "THOX_ENGINE_THREADS": "1"})
        started.append(start_agent(tmp_path / name, env=env))
        return started[-1]

    try:
        yield box
    finally:
        for agent in started:
            kill_agent(agent)
