"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.agent_process import RunningAgent, start_agent


@pytest.fixture(scope="session")
def running_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """One real agent for the session's read-mostly API tests."""
    agent = start_agent(tmp_path_factory.mktemp("agent-home"))
    yield agent
    assert agent.stop() == 0


@pytest.fixture
def client(running_agent: RunningAgent) -> openai.OpenAI:
    """The official OpenAI SDK pointed at the agent (no retries, so errors surface as they are)."""
    return openai.OpenAI(base_url=running_agent.inference_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def fresh_home(tmp_path: Path) -> Path:
    return tmp_path / "home"
