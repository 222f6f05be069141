"""A box on its own founds a one-box cluster: real `thox serve`, real etcd, the cluster API's views."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import RunningAgent, cluster_env, http_json, start_agent
from tests.waiting import eventually

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None,
    reason="etcd is not installed (Debian etcd-server; scripts/system-deps.sh installs it)",
)


def get(agent: RunningAgent, path: str) -> dict[str, Any]:
    status, _, body = http_json("GET", f"{agent.cluster_url}{path}")
    assert status == 200, body
    assert isinstance(body, dict), body
    return body


def wait_for_leader(agent: RunningAgent, timeout: float = 30.0) -> dict[str, Any]:
    def led() -> dict[str, Any]:
        topology = get(agent, "/topology")
        # (records refresh every second: the one published before the engine was ready may still be current)
        assert topology["leader"] is not None and all(n.get("engine_state") == "ready" for n in topology["nodes"]), (
            topology
        )
        return topology

    result: dict[str, Any] = eventually(led, "a leader and every engine ready", timeout)
    return result


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_lone_box_founds_a_cluster_and_keeps_it_across_restarts(tmp_path: Path) -> None:
    env = cluster_env()
    agent = start_agent(tmp_path / "home", env=env)
    try:
        topology = wait_for_leader(agent)
        (node,) = topology["nodes"]
        assert topology["node_count"] == 1 and topology["leader"] == node["id"]
        assert node["role"] == "voter" and node["alive"] and node["ram_gb"] > 0
        assert node["models"] == ["smollm2-135m-instruct"] and node["engine_state"] == "ready"
        assert node["inference_port"] == int(agent.inference_url.rsplit(":", 1)[1].split("/")[0])
        summary = get(agent, "/cluster")
        assert summary["status"] == "healthy" and summary["node_count"] == 1
        assert summary["total_ram_gb"] == node["ram_gb"] and summary["active_model"] == "smollm2-135m-instruct"
        assert summary["total_tops"] is None  # unknown on this board: not invented
        health = agent.health()["cluster"]
        assert health == {
            "node_id": node["id"],
            "cluster_id": topology["cluster_id"],
            "running": True,
            "is_leader": True,
        }
        status_text = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "--home", str(agent.home)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
        assert f"cluster  {topology['cluster_id']}   node {node['id']}   leader" in status_text, status_text
        nodes = get(agent, "/nodes")["data"]
        assert [n["id"] for n in nodes] == [node["id"]] and nodes[0]["last_seen_seconds_ago"] < 3
    finally:
        assert agent.stop() == 0
    etcd_pid = (
        int((agent.home / "cluster" / "etcd.pid").read_text())
        if (agent.home / "cluster" / "etcd.pid").exists()
        else None
    )
    assert etcd_pid is None or not pid_alive(etcd_pid)  # an orderly stop stops etcd too

    again = start_agent(agent.home, env=env)
    try:
        topology_again = wait_for_leader(again)
        assert topology_again["cluster_id"] == topology["cluster_id"]  # the same cluster, not a new one
        assert [n["id"] for n in topology_again["nodes"]] == [node["id"]]
        etcd_pid = int((again.home / "cluster" / "etcd.pid").read_text())
        again.process.send_signal(signal.SIGKILL)  # a yanked box: its etcd must not live on without it
        again.process.wait(10)
        eventually(lambda: not pid_alive(etcd_pid), "etcd exiting after its agent was killed", 15)
    finally:
        again.stop()


def test_cluster_views_answer_503_when_the_cluster_layer_is_off(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "home")  # THOX_CLUSTER_ENABLED=false
    try:
        status, _, body = http_json("GET", f"{agent.cluster_url}/topology")
        assert status == 404, body  # no cluster layer: the routes do not exist
        assert "cluster" not in agent.health()
    finally:
        agent.stop()
