"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from hypothesis import HealthCheck, settings

from tests.agent_process import RunningAgent, start_agent

# Property tests (the *_fuzz.py suites among them): `make test` runs a small, derandomized sample so CI is
# reproducible and fast; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs many more random examples. No example
# database: failures are reported with their inputs and become @example regression cases, not hidden state.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None)
settings.register_profile(
    "fuzz",
    max_examples=5000,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
