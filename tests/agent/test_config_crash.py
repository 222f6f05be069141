"""kill -9 of a process in the middle of writing config.toml, 200 times: the file always loads afterwards."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from agent.config_file import ConfigFile
from agent.settings import load_settings

CRASH_ROUNDS = 200


def _write_forever(home: Path) -> None:
    config = ConfigFile(home, env={})
    port = 1024
    while True:
        port = port + 1 if port < 60000 else 1024
        config.set("api.inference_port", str(port))
        config.set("hardware.pd", "none" if port % 2 else "sim")


def test_sigkill_while_writing_config_never_leaves_a_broken_file(tmp_path: Path) -> None:
    rng = random.Random(7)
    ConfigFile(tmp_path, env={}).set("engine.threads", "2")
    changed = 0
    for _ in range(CRASH_ROUNDS):
        before = (tmp_path / "config.toml").read_bytes()
        pid = os.fork()
        if pid == 0:  # the child writes until it is killed; it never returns into pytest
            try:
                _write_forever(tmp_path)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        settings = load_settings(home=tmp_path, env={})  # parses and validates, or the test fails
        assert settings.engine.threads == 2  # untouched keys survive every write
        changed += (tmp_path / "config.toml").read_bytes() != before
    assert changed >= CRASH_ROUNDS // 2, "the writer hardly wrote: the test proved little"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 1, leftovers  # killed writes' temp files are swept by the next write
