"""Shared by the pull fault tests: two-box stacks where only the first box holds a model, and the pull API."""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.agent.cluster.stack import eventually, join, token_for, topology
from tests.agent_process import RunningAgent
from tests.bundled import install_alias, smollm2_gguf

ALIAS = "smollm2-alias"  # the bundled chat model under an id only the source box holds
DEFAULT = "smollm2-135m-instruct"


def model_sha256() -> str:
    return hashlib.sha256(smollm2_gguf().read_bytes()).hexdigest()


def two_boxes(
    tmp_path: Path, boxes: Callable[..., RunningAgent], receiver_env: dict[str, str] | None = None
) -> tuple[RunningAgent, RunningAgent]:
    """box-a (leading, the only holder of ALIAS) and box-b (joined to it), both live in the topology."""
    install_alias(tmp_path / "box-a", ALIAS)
    source = boxes("box-a", {"THOX_DEFAULT_MODEL": DEFAULT})
    receiver = boxes("box-b", receiver_env)
    eventually(lambda: topology(source)["leader"] == "box-a", 15, "box-a leading")
    status, answer = join(receiver, token_for(source))
    assert status == 200, answer
    eventually(lambda: topology(source)["node_count"] == 2, 60, "two live boxes")
    return source, receiver


def pull(agent: RunningAgent, model: str, node: str) -> list[dict[str, Any]]:
    """POST /v1/models/pull with a progress stream; its NDJSON lines (the contract in agent/api/cluster/models.py)."""
    parts = urllib.parse.urlsplit(f"{agent.cluster_url}/models/pull")
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        connection.request(
            "POST",
            parts.path,
            body=json.dumps({"model": model, "nodes": [node]}),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200, response.read()
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]
    finally:
        connection.close()


def manifest(agent: RunningAgent) -> dict[str, dict[str, Any]]:
    """The box's model manifest by model id; it must always parse (it is written atomically)."""
    data = json.loads((agent.home / "models" / "manifest.json").read_text())
    assert data["version"] == 1
    return {entry["id"]: entry for entry in data["models"]}


def staging(agent: RunningAgent, model: str) -> Path:
    """The folder a pull assembles `model` in (agent/models/store.py)."""
    return agent.home / "models" / ".partial" / model


def staged_bytes(agent: RunningAgent, model: str) -> int:
    folder = staging(agent, model)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def store_files(agent: RunningAgent) -> set[str]:
    """Every file under the box's model store, relative to it (temp files and staging included)."""
    root = agent.home / "models"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def box_lines(lines: list[dict[str, Any]], node: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("node") == node]
