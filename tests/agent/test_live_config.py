"""A running agent applies config changes that are safe live, names the ones that need a restart, refuses bad files.

Real `thox serve` processes and the real `thox config` CLI; the LiveConfig unit tests pin the all-or-nothing rule.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.live_config import ConfigReloadError, LiveConfig
from agent.settings import Settings, load_settings
from tests.agent_process import RunningAgent, http_json, start_agent
from tests.waiting import eventually


def thox(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("THOX_")}
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=child_env,
    )


def models(agent: RunningAgent, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    return http_json("GET", f"{agent.inference_url}/models", headers=headers)


@pytest.fixture
def limited_agent(tmp_path: Path) -> Iterator[RunningAgent]:
    # Loopback clients are rate-limited too here, so this test (on loopback) sees the limits.
    agent = start_agent(tmp_path / "home", env={"THOX_API_RATE_LIMIT_LOOPBACK": "true"})
    try:
        yield agent
    finally:
        agent.stop()


def test_rate_limit_change_applies_at_once_and_engine_change_waits_for_restart(limited_agent: RunningAgent) -> None:
    agent, home = limited_agent, limited_agent.home
    assert models(agent)[1]["x-ratelimit-limit-requests"] == "100"

    changed = thox(home, "config", "set", "api.rate_limit", "3")
    assert changed.returncode == 0, changed.stderr
    assert "the running agent applied it" in changed.stdout
    statuses = [models(agent) for _ in range(4)]
    assert [s[1]["x-ratelimit-limit-requests"] for s in statuses[:3]] == ["3", "3", "3"]
    assert statuses[3][0] == 429 and statuses[3][2]["error"]["code"] == "rate_limit_exceeded"

    later = thox(home, "config", "set", "engine.max_batch", "4")
    assert later.returncode == 0 and "after a restart" in later.stdout, later.stdout
    status, _, config = http_json("GET", f"{agent.cluster_url}/config")
    assert status == 200
    assert config["restart_required"] == ["engine.max_batch"]
    assert config["settings"]["engine.max_batch"] == 16  # the value in force, not the one on disk
    assert config["settings"]["api.rate_limit"] == 3
    assert agent.health()["config"]["restart_required"] == ["engine.max_batch"]
    status_text = thox(home, "status").stdout
    assert "restart needed for engine.max_batch" in status_text and "limits 3/min inference" in status_text


def test_a_hand_edited_file_that_does_not_validate_changes_nothing(limited_agent: RunningAgent) -> None:
    agent, home = limited_agent, limited_agent.home
    (home / "config.toml").write_text('[api]\nrate_limit = 0\nauth = "always"\n')
    status, _, body = http_json("POST", f"{agent.cluster_url}/config/reload")
    assert status == 422 and body["error"]["code"] == "invalid_config"
    assert "api.rate_limit" in body["error"]["message"]
    # Neither the bad key nor the good one beside it was applied: loopback still needs no key, limit still 100.
    answered = models(agent)
    assert answered[0] == 200 and answered[1]["x-ratelimit-limit-requests"] == "100"
    reload = thox(home, "config", "reload")
    assert reload.returncode == 1 and "api.rate_limit" in reload.stderr.replace("\n", " ")


def test_thermal_thresholds_apply_live(limited_agent: RunningAgent) -> None:
    agent, home = limited_agent, limited_agent.home
    assert agent.health()["hardware"]["thermal"]["level"] == "normal"  # the simulated box idles in the 30s
    # A warm threshold below the box's temperature: the governor must go to WARM at its next poll.
    assert thox(home, "config", "set", "hardware.warm_c", "20").returncode == 0
    eventually(lambda: agent.health()["hardware"]["thermal"]["level"] == "warm", "the thermal level WARM")
    assert any(
        line.get("event") == "thermal_thresholds_changed" and line.get("warm_c") == 20.0 for line in agent.log_lines()
    )


def test_sighup_applies_the_file_and_environment_pins_are_reported(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "home", env={"THOX_API_RATE_LIMIT": "50", "THOX_API_RATE_LIMIT_LOOPBACK": "1"})
    try:
        home = agent.home
        pinned = thox(home, "config", "set", "api.rate_limit", "5")
        assert pinned.returncode == 0
        assert "THOX_API_RATE_LIMIT" in pinned.stderr and "overrides the file" in pinned.stderr
        assert models(agent)[1]["x-ratelimit-limit-requests"] == "50"

        # `systemctl reload thox-agent` sends SIGHUP after the file was edited by hand.
        with (home / "config.toml").open("a") as config:
            config.write('auth = "always"\n')  # appended to the [api] section written by `config set`
        agent.process.send_signal(signal.SIGHUP)
        refused = eventually(lambda: (r := models(agent))[0] == 401 and r, "401s once auth is always")
        assert refused[2]["error"]["type"] == "authentication_error"
        assert agent.process.poll() is None  # SIGHUP reloads; it does not stop the agent
        assert any(
            line.get("event") == "config_reloaded" and line.get("applied") == ["api.auth"] for line in agent.log_lines()
        )
    finally:
        agent.stop()


# ------------------------------------------------------------------------------ in-process


def _settings(home: Path, text: str) -> Settings:
    (home / "config.toml").write_text(text)
    return load_settings(home=home, env={})


@pytest.mark.allow_blocking("_settings writes config.toml and loads it in the test; reload() stays checked")
async def test_reload_is_all_or_nothing(tmp_path: Path) -> None:
    live = LiveConfig(_settings(tmp_path, "[api]\nrate_limit = 10\n"), env={})
    committed: list[str] = []

    def accepting(settings: Settings) -> Callable[[], None]:
        return lambda: committed.append(f"first {settings.api.rate_limit}")

    def refusing(settings: Settings) -> Callable[[], None]:
        if settings.api.rate_limit > 100:
            raise ValueError("api.rate_limit: too generous for this test")
        return lambda: committed.append(f"second {settings.api.rate_limit}")

    live.add_applier(accepting)
    live.add_applier(refusing)
    (tmp_path / "config.toml").write_text("[api]\nrate_limit = 500\n")
    with pytest.raises(ConfigReloadError, match="too generous"):
        await live.reload()
    assert committed == [] and live.running.api.rate_limit == 10

    (tmp_path / "config.toml").write_text("[api]\nrate_limit = 20\n[engine]\nmax_batch = 2\n")
    report = await live.reload()
    assert committed == ["first 20", "second 20"]
    assert (report.applied, report.restart_required) == (["api.rate_limit"], ["engine.max_batch"])
    assert live.running.api.rate_limit == 20 and live.running.engine.max_batch == 16
    assert live.restart_required == ["engine.max_batch"]
