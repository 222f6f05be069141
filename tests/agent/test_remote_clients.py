"""Auth policy for clients that are not on this device: a network namespace joined by a veth pair plays the LAN.

The test creates the namespace and the veth pair itself and removes both; it never touches the machine's own
interfaces. It needs root (to create namespaces) and iproute2, and is skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import RunningAgent, http_json, start_agent

HOST_ADDRESS = "10.254.77.1"
PEER_ADDRESS = "10.254.77.2"

_CLIENT = """
import http.client, json, sys
host, port, path, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
conn = http.client.HTTPConnection(host, port, timeout=30)
headers = {"Authorization": f"Bearer {key}"} if key else {}
conn.request("GET", path, headers=headers)
response = conn.getresponse()
print(json.dumps({"status": response.status, "body": json.loads(response.read() or b"null")}))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def lan() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`) to create a network namespace")
    name = f"thoxtest{os.getpid()}"
    host_end, peer_end = f"th{os.getpid() % 100000}h", f"th{os.getpid() % 100000}p"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.strip()}")
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", peer_end)
        _ip("link", "set", peer_end, "netns", name)
        _ip("addr", "add", f"{HOST_ADDRESS}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{PEER_ADDRESS}/30", "dev", peer_end)
        _ip("netns", "exec", name, "ip", "link", "set", peer_end, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _from_lan(lan: str, url: str, path: str, key: str = "") -> tuple[int, dict[str, Any]]:
    port = int(url.split(":")[2].split("/")[0])
    result = subprocess.run(
        ["ip", "netns", "exec", lan, sys.executable, "-c", _CLIENT, HOST_ADDRESS, str(port), path, key],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = json.loads(result.stdout)
    return answer["status"], answer["body"]


def _agent(home: Path, **settings: str) -> RunningAgent:
    return start_agent(home, env={"THOX_API_BIND": "0.0.0.0", **settings})


def _key(agent: RunningAgent, scope: str = "inference") -> str:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "api-key", "generate", "--scope", scope, "--home", str(agent.home)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_remote_policy_needs_keys_from_the_lan_only(lan: str, tmp_path: Path) -> None:
    agent = _agent(tmp_path / "home")
    try:
        key, admin = _key(agent), _key(agent, "admin")
        status, body = _from_lan(lan, agent.inference_url, "/v1/models")
        assert status == 401 and body["error"]["code"] == "missing_api_key"
        assert _from_lan(lan, agent.inference_url, "/v1/models", key)[0] == 200
        assert http_json("GET", f"{agent.inference_url}/models")[0] == 200  # this device itself: no key
        status, body = _from_lan(lan, agent.cluster_url, "/v1/power/contract", key)
        assert status == 403 and body["error"]["code"] == "insufficient_scope"
        assert _from_lan(lan, agent.cluster_url, "/v1/power/contract", admin)[0] == 200
    finally:
        assert agent.stop() == 0


def test_allow_list_and_always_policy(lan: str, tmp_path: Path) -> None:
    agent = _agent(tmp_path / "home", THOX_API_ALLOW="loopback", THOX_API_AUTH="always")
    try:
        key = _key(agent)
        status, body = _from_lan(lan, agent.inference_url, "/v1/models", key)
        assert status == 403 and body["error"]["code"] == "address_not_allowed"
        status, _, body = http_json("GET", f"{agent.inference_url}/models")
        assert status == 401  # always: this device too
        assert http_json("GET", f"{agent.inference_url}/models", headers={"Authorization": f"Bearer {key}"})[0] == 200
    finally:
        assert agent.stop() == 0
