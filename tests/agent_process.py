"""Starts the real agent (`thox serve`) as a child process on free ports, the way a user runs it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# Shared with the engine tests so the model is converted once per checkout, not once per agent started.
TEST_MODEL_CACHE = REPO / ".cache" / "test-models"
# Set by tests/conftest.py when a test's call phase failed, so fixtures can add what explains the failure.
CALL_FAILED = pytest.StashKey[bool]()


def http_json(
    method: str, url: str, body: bytes | dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """One raw HTTP request (no SDK in the way); returns status, headers and the decoded JSON body."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname, url
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        connection.request(method, parts.path, body=payload, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw) if raw else None
    finally:
        connection.close()


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cluster_env(node_id: str | None = None) -> dict[str, str]:
    """Environment for an agent with the cluster layer on, on ports of its own (several run side by side)."""
    ports = {
        f"THOX_CLUSTER_{name}": str(free_port())
        for name in ("PEER_PORT", "ETCD_PEER_PORT", "ETCD_CLIENT_PORT", "ETCD_CLIENT_TLS_PORT")
    }
    return {"THOX_CLUSTER_ENABLED": "true", **ports, **({"THOX_CLUSTER_NODE_ID": node_id} if node_id else {})}


@dataclass
class RunningAgent:
    """A `thox serve` child process and where it listens."""

    home: Path
    process: subprocess.Popen[bytes]
    inference_url: str
    cluster_url: str
    log_path: Path

    def health(self) -> dict[str, Any]:
        status, _, body = http_json("GET", f"{self.cluster_url}/health")
        assert status == 200, body
        assert isinstance(body, dict), body
        return body

    def wait_healthy(self, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["status"] == "ok":
                return health
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent not healthy after {timeout}s: {health}")
            time.sleep(0.1)  # the poll interval of a loop with a deadline

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                continue  # the engine host's own plain-text lines
        return lines

    def log_tail(self, lines: int = 60) -> str:
        """The end of the agent's log, for a failed test's report."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_agent(
    home: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
    command_prefix: list[str] | None = None,
    wait_healthy: bool = True,
) -> RunningAgent:
    """Start `thox serve` with ports 0 and wait until its endpoints file appears and the engine is ready.

    `command_prefix` runs the agent under another command (`ip netns exec NS`: a box of its own network);
    `wait_healthy=False` returns once the APIs listen, whatever the engine is doing (a test of a failing start).
    """
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "agent.log"
    child_env = {
        **os.environ,
        "THOX_HOME": str(home),
        "THOX_CACHE_DIR": str(TEST_MODEL_CACHE),
        "THOX_LOG_FORMAT": "json",
        "THOX_ENGINE_THREADS": "2",
        # The cluster layer runs an etcd member on fixed ports; tests that are about the cluster turn it on with
        # their own ports, so agents started side by side never fight over them.
        "THOX_CLUSTER_ENABLED": "false",
        **(env or {}),
    }
    endpoints = home / "run" / "endpoints.json"
    endpoints.unlink(missing_ok=True)  # left behind by an agent of this home that was killed
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(command_prefix or []),
                sys.executable,
                "-m",
                "agent.cli",
                "serve",
                "--inference-port",
                "0",
                "--cluster-port",
                "0",
            ],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    deadline = time.monotonic() + timeout
    while not endpoints.exists():
        if process.poll() is not None:
            raise RuntimeError(f"agent exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"agent did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.05)  # the poll interval of a loop with a deadline (and a check that the agent still runs)
    record = json.loads(endpoints.read_text())
    running = RunningAgent(home, process, record["inference_url"], record["cluster_url"], log_path)
    if wait_healthy:
        running.wait_healthy(timeout=max(deadline - time.monotonic(), 1.0))
    return running
