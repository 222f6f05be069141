"""`thox logs`: the agent's own log file (filtered, followed across rotation) and the journal under systemd."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cli.logs import LineSelector, topic_matches
from tests.agent_process import start_agent
from tests.waiting import eventually


def thox(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("THOX_") and k != "JOURNAL_STREAM"}
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=child_env,
    )


def follower(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("THOX_")}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "logs", "--follow", *args, "--home", str(home)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait(10)
    if process.stdout is not None:
        process.stdout.close()


def read_until(process: subprocess.Popen[str], wanted: str, timeout: float = 20.0) -> list[str]:
    """Lines from a follower until one contains `wanted` (os.read on the pipe with a deadline, no thread)."""
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    deadline, buffer = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            chunk = os.read(process.stdout.fileno(), 65536).decode()
        except BlockingIOError:
            chunk = ""
        buffer += chunk
        if wanted in buffer:
            return buffer.splitlines()
        time.sleep(0.05)  # the poll interval of a loop with a deadline
    raise AssertionError(f"{wanted!r} not seen in:\n{buffer}")


def at_end_of(process: subprocess.Popen[str], path: Path) -> bool:
    """Whether `process` sleeps holding `path` open at its current end (/proc: the fd's offset against the size).

    Asleep, not only at the end: the history pass also reaches the end, but closes the file without sleeping.
    """
    if Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
        return False
    target, size = str(path.resolve()), path.stat().st_size
    for fd in Path(f"/proc/{process.pid}/fd").iterdir():
        try:
            if os.readlink(fd) != target:
                continue
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{process.pid}/fdinfo/{fd.name}").read_text().splitlines()
            )
        except OSError:  # closed meanwhile
            continue
        if int(fields["pos"]) >= size > 0:
            return True
    return False


def test_topics_are_whole_dotted_components() -> None:
    assert topic_matches("agent.hardware.thermal", "thermal")
    assert topic_matches("agent.hardware.thermal", "hardware")
    assert topic_matches("agent.hardware.thermal", "hardware.thermal")
    assert not topic_matches("agent.hardware.thermal", "therm")
    assert not topic_matches("agent.api.security", "hardware")
    selector = LineSelector(["engine"], "warning")
    assert selector.wants({"logger": "agent.engine", "level": "error", "event": "x"})
    assert not selector.wants({"logger": "agent.engine", "level": "info", "event": "x"})
    assert not selector.wants(None)  # a foreign line is shown only when nothing filters
    assert LineSelector([], "debug").wants(None)


def test_logs_of_a_running_agent_filtered_and_followed(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "home")
    home = agent.home
    try:
        log_file = home / "logs" / "agent.log"
        assert stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700
        everything = thox(home, "logs", "-n", "0", "--json")
        assert everything.returncode == 0, everything.stderr
        records = [json.loads(line) for line in everything.stdout.splitlines()]
        assert any(r["event"] == "agent_ready" and r["logger"] == "agent.service" for r in records)

        last_two = thox(home, "logs", "-n", "2").stdout.splitlines()
        assert len(last_two) == 2

        follow = follower(home, "--filter", "thermal", "-n", "0")
        try:
            eventually(lambda: at_end_of(follow, log_file), "the follower reading at the end of the log file")
            assert thox(home, "config", "set", "hardware.warm_c", "60").returncode == 0
            lines = read_until(follow, "thermal_thresholds_changed")
        finally:
            stop(follow)
        assert all("hardware.thermal" in line for line in lines), lines  # nothing but the thermal topic

        only_config = thox(home, "logs", "-n", "0", "--filter", "config", "--json").stdout.splitlines()
        assert only_config and all(json.loads(line)["logger"] == "agent.config" for line in only_config)
        warnings = thox(home, "logs", "-n", "0", "--level", "warning", "--json").stdout.splitlines()
        assert all(json.loads(line)["level"] in ("warning", "error", "critical") for line in warnings)
    finally:
        agent.stop()


def test_follow_continues_across_a_rotation(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "agent.log"
    log_file.parent.mkdir()

    def line(n: int) -> str:
        return json.dumps({"event": f"event_{n}", "logger": "agent.service", "level": "info"}) + "\n"

    log_file.write_text(line(0))
    follow = follower(tmp_path, "--source", "file", "-n", "1", "--json")
    try:
        seen = read_until(follow, "event_0")
        with log_file.open("a") as handle:
            handle.write(line(1))
        log_file.rename(log_file.with_name("agent.log.1"))  # what RotatingFileHandler does
        log_file.write_text(line(2) + line(3))
        seen += read_until(follow, "event_3")
    finally:
        stop(follow)
    events = [json.loads(text)["event"] for text in seen]
    assert events == ["event_0", "event_1", "event_2", "event_3"]


def test_the_journal_is_read_under_systemd(tmp_path: Path) -> None:
    # A journalctl double on PATH: prints canned lines the way `--output=cat` does and records its arguments.
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    lines = [
        json.dumps({"event": f"thermal_{n}", "logger": "agent.hardware.thermal", "level": "info"}) for n in range(3)
    ] + [json.dumps({"event": "api_listening", "logger": "agent.service", "level": "info"})]
    script = bin_dir / "journalctl"
    script.write_text(
        f"#!/bin/sh\necho \"$@\" >> {calls}\ncat <<'EOF'\n" + "\n".join(lines) + "\n-- cursor: s=abc;i=4\nEOF\n"
    )
    script.chmod(0o755)
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    # A running agent under systemd says so in its endpoints file; `thox logs` then reads the journal.
    (home / "run" / "endpoints.json").write_text(json.dumps({"logs": "journald"}))
    result = thox(
        home, "logs", "--filter", "thermal", "-n", "2", "--json", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(text)["event"] for text in result.stdout.splitlines()] == ["thermal_1", "thermal_2"]
    arguments = calls.read_text().split()
    assert "--unit=thox-agent.service" in arguments and "--output=cat" in arguments
    assert "--lines=all" in arguments and "--show-cursor" in arguments  # a filter needs the whole history


@pytest.mark.parametrize("matching", [True, False])
def test_journald_is_detected_from_journal_stream(tmp_path: Path, matching: bool) -> None:
    target = tmp_path / "stderr"
    target.touch()
    info = target.stat()
    stream = f"{info.st_dev}:{info.st_ino}" if matching else f"{info.st_dev}:{info.st_ino + 1}"
    with target.open("w") as stderr:
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from agent.logs import under_journald; print(under_journald(), file=sys.stdout)",
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            check=True,
            env={**os.environ, "JOURNAL_STREAM": stream},
        )
    assert result.stdout.strip() == str(matching)


def test_no_log_file_is_a_clear_error(tmp_path: Path) -> None:
    result = thox(tmp_path, "logs", "--source", "file")
    assert result.returncode == 1 and "no log file at" in result.stderr
