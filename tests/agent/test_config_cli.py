"""`thox config get|set|unset|list`: typed, validated, atomic, and honest about where a value comes from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def thox(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("THOX_")}
    child_env.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=child_env,
    )


def test_set_get_unset_round_trip_with_types(tmp_path: Path) -> None:
    assert thox(tmp_path, "set", "api.inference_port", "9090").returncode == 0
    assert thox(tmp_path, "set", "hardware.hysteresis_c", "4").returncode == 0
    text = (tmp_path / "config.toml").read_text()
    assert "inference_port = 9090" in text and "hysteresis_c = 4.0" in text  # stored as int and float, not strings
    assert (tmp_path / "config.toml").stat().st_mode & 0o777 == 0o600
    got = thox(tmp_path, "get", "api.inference_port")
    assert got.returncode == 0 and "9090" in got.stdout and "(file)" in got.stdout
    assert thox(tmp_path, "unset", "api.inference_port").returncode == 0
    got = thox(tmp_path, "get", "api.inference_port")
    assert "8080" in got.stdout and "(default)" in got.stdout
    assert "hysteresis_c" in (tmp_path / "config.toml").read_text()  # other keys untouched


def test_bad_keys_and_values_are_refused_and_the_file_is_unchanged(tmp_path: Path) -> None:
    assert thox(tmp_path, "set", "engine.max_batch", "8").returncode == 0
    before = (tmp_path / "config.toml").read_bytes()
    for args, message in [
        (("set", "engine.max_batch", "0"), "engine.max_batch"),
        (("set", "api.inference_port", "eighty"), "api.inference_port"),
        (("set", "api.nope", "1"), "unknown setting 'api.nope'"),
        (("set", "profile", "laptop"), "profile"),
        (("get", "nothing.here"), "unknown setting"),
    ]:
        result = thox(tmp_path, *args)
        assert result.returncode == 2, args
        assert message in result.stderr.replace("\n", " "), (args, result.stderr)
    assert (tmp_path / "config.toml").read_bytes() == before


def test_environment_overrides_are_reported(tmp_path: Path) -> None:
    thox(tmp_path, "set", "engine.threads", "2")
    got = thox(tmp_path, "get", "engine.threads", env={"THOX_ENGINE_THREADS": "1"})
    assert "1" in got.stdout and "(environment)" in got.stdout
    listed = json.loads(thox(tmp_path, "list", "--json").stdout)
    assert listed["engine.threads"] == {"value": 2, "source": "file"}
    assert listed["api.cluster_port"] == {"value": 5381, "source": "default"}


def test_values_the_agent_could_not_start_with_are_refused(tmp_path: Path) -> None:
    for args, message in [
        (("set", "api.allow", "loopback,bogus"), "'bogus' is neither a keyword"),
        (("set", "api.allow", "10.0.0.1/8"), "did you mean 10.0.0.0/8"),
        (("set", "hardware.warm_c", "85"), "throttle_c (80.0) must be above warm_c (85.0)"),
        (("set", "hardware.hysteresis_c", "9"), "hysteresis_c (9.0) must be smaller"),
    ]:
        result = thox(tmp_path, *args)
        assert result.returncode == 2, args
        assert message in result.stderr.replace("\n", " "), (args, result.stderr)
    assert not (tmp_path / "config.toml").exists()
