"""kill -9 of a process in the middle of writing config.toml, 200 times: the file always loads afterwards."""

from __future__ import annotations

import os
import random
import select
import signal
import time
from pathlib import Path

from agent.config_file import ConfigFile
from agent.settings import load_settings

CRASH_ROUNDS = 200
# Each round writes ports from its own range, so its first write always changes the file.
PORTS_PER_ROUND = 250


def _write_forever(home: Path, started: int, first_port: int) -> None:
    config = ConfigFile(home, env={})
    port = first_port
    while True:
        port = port + 1 if port < first_port + PORTS_PER_ROUND - 1 else first_port
        config.set("api.inference_port", str(port))
        if started >= 0:  # the first write is done: the parent may kill from now on, at a random moment
            os.write(started, b"w")
            os.close(started)
            started = -1
        config.set("hardware.pd", "none" if port % 2 else "sim")


def test_sigkill_while_writing_config_never_leaves_a_broken_file(tmp_path: Path) -> None:
    rng = random.Random(7)
    ConfigFile(tmp_path, env={}).set("engine.threads", "2")
    changed = 0
    for round_ in range(CRASH_ROUNDS):
        before = (tmp_path / "config.toml").read_bytes()
        started, signalled = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child writes until it is killed; it never returns into pytest
            try:
                os.close(started)
                _write_forever(tmp_path, signalled, 1024 + round_ * PORTS_PER_ROUND)
            finally:
                os._exit(1)
        os.close(signalled)
        # Wait for the child's first write (a loaded machine may take a while to run it), not for a fixed time.
        ready, _, _ = select.select([started], [], [], 60)
        assert ready and os.read(started, 1) == b"w", "the writer never wrote"
        os.close(started)
        time.sleep(rng.uniform(0.0, 0.01))  # a random kill point is what is tested, not a wait
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        settings = load_settings(home=tmp_path, env={})  # parses and validates, or the test fails
        assert settings.engine.threads == 2  # untouched keys survive every write
        changed += (tmp_path / "config.toml").read_bytes() != before
    assert changed == CRASH_ROUNDS, "every round's first write reached the file"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 1, leftovers  # killed writes' temp files are swept by the next write
