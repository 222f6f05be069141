"""Shared by the tests that run stacks of real agents: starting boxes, forming clusters, waiting for states."""

from __future__ import annotations

import http.client
import json
import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import waiting
from tests.agent_process import RunningAgent, cluster_env, http_json, start_agent

needs_etcd = pytest.mark.skipif(
    shutil.which("etcd") is None,
    reason="etcd is not installed (Debian etcd-server; scripts/system-deps.sh installs it)",
)


def start_box(tmp_path: Path, name: str, extra: dict[str, str] | None = None) -> RunningAgent:
    return start_agent(tmp_path / name, env={**(extra or {}), **cluster_env(name), "THOX_ENGINE_THREADS": "1"})


def call(agent: RunningAgent, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    status, _, answer = http_json(method, f"{agent.cluster_url}{path}", body)
    return status, answer


def holds_ca_key(agent: RunningAgent) -> bool:
    """Whether the box keeps the cluster CA's private key (only voters and a two-box stack's standby do)."""
    return (agent.home / "cluster" / "tls" / "ca-key.pem").exists()


def token_for(agent: RunningAgent, ttl: float = 600) -> dict[str, Any]:
    status, answer = call(agent, "POST", "/cluster/tokens", {"ttl_seconds": ttl})
    assert status == 200, answer
    assert isinstance(answer, dict), answer
    return answer


def join(agent: RunningAgent, token: dict[str, Any]) -> tuple[int, Any]:
    return call(agent, "POST", "/cluster/join", {"token": token["token"], "server": token["server"]})


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """tests.waiting.eventually with the argument order the stack tests use (timeout before what)."""
    return waiting.eventually(check, what, timeout)


def topology(agent: RunningAgent) -> dict[str, Any]:
    status, answer = call(agent, "GET", "/topology")
    assert status == 200, answer
    assert isinstance(answer, dict), answer
    return answer


def http_raw(url: str, body: dict[str, Any]) -> bytes:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname, url
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", parts.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        connection.close()
