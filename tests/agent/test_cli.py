"""The `thox` command line against a real running agent, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import agent
from tests.agent_process import REPO, RunningAgent


def thox(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("THOX_", "OPENAI_"))}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**clean, "COLUMNS": "200", **(env or {})},
    )


def test_version() -> None:
    result = thox("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"thox {agent.__version__}"


def test_models_list_shows_size_and_sha256(running_agent: RunningAgent) -> None:
    result = thox("models", "list", "--json", "--home", str(running_agent.home))
    assert result.returncode == 0, result.stderr
    chat, embeddings = json.loads(result.stdout)
    assert (chat["id"], embeddings["id"]) == ("smollm2-135m-instruct", "all-minilm-l6-v2")
    assert chat["size"] == Path(chat["path"]).stat().st_size == 98362432
    assert embeddings["size"] > 90_000_000 and embeddings["format"] == "safetensors"
    model = chat
    assert len(model["sha256"]) == 64
    table = thox("--home", str(running_agent.home), "models", "list")
    assert table.returncode == 0
    assert "smollm2-135m-instruct" in table.stdout and model["sha256"] in table.stdout.replace("\n", "")


def test_models_list_on_an_empty_home(tmp_path: Path) -> None:
    result = thox("models", "list", "--home", str(tmp_path))
    assert result.returncode == 0
    assert "No models installed" in result.stdout


def test_status_finds_the_running_agent(running_agent: RunningAgent) -> None:
    result = thox("status", "--home", str(running_agent.home))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "smollm2-135m-instruct" in result.stdout
    as_json = json.loads(thox("status", "--json", "--home", str(running_agent.home)).stdout)
    assert as_json["engine"]["state"] == "ready"


def test_status_without_an_agent_says_so(tmp_path: Path) -> None:
    result = thox("status", "--home", str(tmp_path), env={"THOX_CLUSTER_URL": "http://127.0.0.1:9/v1"})
    assert result.returncode == 1
    assert "no agent answers" in result.stderr


def test_chat_streams_an_answer(running_agent: RunningAgent) -> None:
    result = thox("chat", "What is the capital of France?", "--home", str(running_agent.home))
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_honours_openai_environment(running_agent: RunningAgent, tmp_path: Path) -> None:
    result = thox(
        "chat",
        "What is the capital of France?",
        "--max-tokens",
        "3",
        "--home",
        str(tmp_path),
        env={"OPENAI_API_BASE": running_agent.inference_url},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    bad = thox("chat", "hi", "--model", "gpt-9", env={"THOX_API_URL": running_agent.inference_url})
    assert bad.returncode == 1
    assert "gpt-9" in bad.stderr


def test_serve_refuses_bad_settings(tmp_path: Path) -> None:
    result = thox("serve", "--home", str(tmp_path), env={"THOX_API_INFERENCE_PORT": "eighty"})
    assert result.returncode == 2
    assert "api.inference_port" in result.stderr
    (tmp_path / "config.toml").write_text("[api]\ninference_prot = 1\n")
    result = thox("serve", "--home", str(tmp_path))
    assert result.returncode == 2
    assert "unknown setting 'api.inference_prot'" in result.stderr


def test_serve_explains_a_corrupt_model(tmp_path: Path) -> None:
    from agent.models import ModelStore

    model, _ = ModelStore(tmp_path / "models").ensure_bundled()
    with model.path.open("r+b") as handle:  # same size, broken header: not something a reinstall would catch
        handle.write(b"GGUF\x09\x00\x00\x00")
    result = thox("serve", "--home", str(tmp_path), "--inference-port", "0", "--cluster-port", "0")
    assert result.returncode == 1
    assert "smollm2-135m-instruct" in result.stderr and "cannot be used" in result.stderr


def test_models_prepare_converts_every_installed_model(tmp_path: Path) -> None:
    from tests.agent_process import TEST_MODEL_CACHE

    result = thox("models", "prepare", "--home", str(tmp_path), env={"THOX_CACHE_DIR": str(TEST_MODEL_CACHE)})
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m-instruct: ready" in result.stderr and "all-minilm-l6-v2: ready" in result.stderr
