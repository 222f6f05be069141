"""The model registry through a real agent (a one-box cluster) and the `thox` CLI, against a real registry:
push, list --remote, pull with progress, status, serve the pulled model, remove it, and the refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.cluster.stack import call, needs_etcd
from tests.agent.cluster.test_single_box import wait_for_leader
from tests.agent_process import RunningAgent, cluster_env, free_port, http_json, start_agent
from tests.bundled import smollm2_gguf
from tests.model_registry import model_registry, needs_registry
from tests.waiting import eventually

pytestmark = [needs_etcd, needs_registry]

DEFAULT = "smollm2-135m-instruct"
PUBLISHED = "tiny-chat:v1"


def thox(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningAgent, str]]:
    """A one-box cluster whose registry.url (set in its config file, so it can change live) is a fresh registry;
    one for the module (the last test points registry.url elsewhere)."""
    tmp_path = tmp_path_factory.mktemp("registry-box")
    with model_registry(tmp_path / "registry") as url:
        home = tmp_path / "home"
        assert thox(home, "config", "set", "registry.url", url).returncode == 0
        agent = start_agent(home, env=cluster_env())
        try:
            wait_for_leader(agent)
            yield agent, url
        finally:
            agent.stop()


def manifest(agent: RunningAgent) -> dict[str, dict[str, Any]]:
    data = json.loads((agent.home / "models" / "manifest.json").read_text())
    return {m["id"]: m for m in data["models"]}


def test_push_list_pull_serve_and_remove_a_model(box: tuple[RunningAgent, str]) -> None:
    agent, url = box
    gguf = smollm2_gguf()
    pushed = thox(agent.home, "models", "push", DEFAULT, "--as", PUBLISHED)
    assert pushed.returncode == 0 and f"{PUBLISHED}: pushed to {url}" in pushed.stdout, pushed

    remote = thox(agent.home, "models", "list", "--remote", "--json")
    assert remote.returncode == 0, remote.stderr
    (row,) = json.loads(remote.stdout)["data"]
    assert row["model"] == PUBLISHED and row["size"] == gguf.stat().st_size, row
    assert (row["format"], row["family"], row["quantization"], row["context_length"]) == ("gguf", "llama", "Q4_1", 8192)
    assert {"chat.completions", "tools", "json"} <= set(row["capabilities"]), row

    pulled = thox(agent.home, "models", "pull", PUBLISHED)
    assert pulled.returncode == 0 and f"{PUBLISHED}: pulled" in pulled.stdout, (pulled.stdout, pulled.stderr)
    progress = [line for line in pulled.stderr.splitlines() if "MB/s" in line]
    assert progress and "ETA" in progress[-1] and "(100%)" in progress[-1], pulled.stderr
    entry = manifest(agent)[PUBLISHED]
    assert entry["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest() and PUBLISHED in entry["source"]
    assert not (agent.home / "models" / ".partial" / PUBLISHED).exists()

    status = thox(agent.home, "models", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert [(r["model"], r["state"]) for r in json.loads(status.stdout)["data"]] == [(PUBLISHED, "done")]

    # Served beside the default model, under its registry name.
    answer = call(agent, "POST", "/models/load", {"model": PUBLISHED, "options": {"context_length": 512}})
    assert answer[0] == 200 and answer[1]["status"] == "ready", answer
    code, _, chat = http_json(
        "POST",
        f"{agent.inference_url}/chat/completions",
        {"model": PUBLISHED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert code == 200 and chat["model"] == PUBLISHED, chat

    refused = thox(agent.home, "models", "rm", PUBLISHED)
    assert refused.returncode == 1 and "error 409" in refused.stderr and "served on this box" in refused.stderr
    assert thox(agent.home, "models", "rm", DEFAULT).returncode == 1  # the default model stays
    assert call(agent, "POST", "/models/unload", {"model": PUBLISHED})[0] == 200
    removed = thox(agent.home, "models", "rm", PUBLISHED)
    assert removed.returncode == 0 and "removed" in removed.stdout, removed.stderr
    assert PUBLISHED not in manifest(agent) and not (agent.home / "models" / PUBLISHED).exists()
    eventually(
        lambda: PUBLISHED not in (call(agent, "GET", "/topology")[1]["nodes"][0].get("store") or {}),
        "the box's record no longer listing the model",
        10,
    )

    # A model no box has: loading it pulls it from the registry first (its size from the registry's card).
    assert thox(agent.home, "models", "push", DEFAULT, "--as", "only-in-registry").returncode == 0
    loaded = call(agent, "POST", "/models/load", {"model": "only-in-registry:latest", "timeout_seconds": 300})
    assert loaded[0] == 200 and loaded[1]["status"] == "ready", loaded
    assert manifest(agent)["only-in-registry"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    code, _, chat = http_json(
        "POST",
        f"{agent.inference_url}/chat/completions",
        {"model": "only-in-registry", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert code == 200 and chat["model"] == "only-in-registry", chat


def test_unknown_models_and_an_unreachable_registry_are_refused_clearly(box: tuple[RunningAgent, str]) -> None:
    agent, url = box
    assert thox(agent.home, "models", "push", DEFAULT, "--as", PUBLISHED).returncode == 0
    unknown = call(agent, "POST", "/models/pull", {"model": "no-such-model", "stream": False})
    assert unknown[0] == 404 and unknown[1]["error"]["code"] == "model_not_found", unknown
    assert "its models: " in unknown[1]["error"]["message"] and "tiny-chat" in unknown[1]["error"]["message"], unknown
    tag = thox(agent.home, "models", "pull", "tiny-chat:v2")
    assert tag.returncode == 1 and "error 404" in tag.stderr and "its tags: v1" in tag.stderr, tag.stderr

    down = f"http://127.0.0.1:{free_port()}"
    changed = thox(agent.home, "config", "set", "registry.url", down)
    assert changed.returncode == 0 and "the running agent applied it" in changed.stdout, changed
    unreachable = call(agent, "POST", "/models/pull", {"model": PUBLISHED, "stream": False})
    assert unreachable[0] == 503 and unreachable[1]["error"]["code"] == "registry_unavailable", unreachable
    assert down in unreachable[1]["error"]["message"], unreachable
    listing = thox(agent.home, "models", "list", "--remote")
    assert listing.returncode == 1 and "error 503" in listing.stderr and down in listing.stderr, listing.stderr
    assert PUBLISHED not in manifest(agent)
