"""The fault suite's tools: small disks (tmpfs) standing in for a full one, and killing agents with their children."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.agent_process import RunningAgent
from tests.waiting import eventually

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="a small disk is a tmpfs mount, which needs root and mount(8) (run the suite as root to include it)",
)


class Tmpfs:
    """A tmpfs mounted on a folder: a disk of a chosen size that can be grown while files stay on it."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def resize(self, megabytes: int) -> None:
        """Make the disk bigger or smaller (its files stay): "making room" after it filled up."""
        subprocess.run(["mount", "-o", f"remount,size={megabytes}m", str(self.where)], check=True, timeout=30)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.where).free


def children_of(pid: int) -> list[int]:
    """The processes `pid` started (its engine hosts, its etcd member), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_agent(agent: RunningAgent) -> None:
    """SIGKILL an agent and make sure its children went with it (they are meant to exit on their own)."""
    children = children_of(agent.process.pid)
    if agent.process.poll() is None:
        agent.process.send_signal(signal.SIGKILL)
    agent.process.wait(30)
    for child in children:

        def gone(child: int = child) -> bool:
            return not alive(child)

        try:
            eventually(gone, f"child {child} of the killed agent exiting", 30)
        except AssertionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)  # still fail the test: a child outliving its agent is a defect
            raise


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stopped(pid: int) -> bool:
    """Whether every thread of `pid` has stopped after a SIGSTOP (a write in flight then has finished)."""
    return all(
        stat.read_text().rsplit(")", 1)[1].split()[0] == "T" for stat in Path(f"/proc/{pid}/task").glob("*/stat")
    )
