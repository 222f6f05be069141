"""kill -9 during key-store writes never leaves an unreadable, empty or half-written file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.security.keys import KeyStore

# Each round starts a writer, kills it at a random moment and loads what it left. More rounds probe more moments;
# 50 keeps the test at a few seconds.
CRASH_ROUNDS = 200
# How long a writer runs before SIGKILL, chosen uniformly in [0, this) seconds after it reports ready.
MAX_KILL_DELAY = 0.03

REPO_ROOT = Path(__file__).resolve().parents[3]

# The writer loops over every kind of write: generate, last-used flush, regenerate, revoke.
WRITER = """
import sys
from collections import deque
from pathlib import Path
from agent.security.keys import KeyStore

store = KeyStore(Path(sys.argv[1]), flush_interval=0.0)
store.load()
ids = deque(record.id for record in store.list())
print("ready", flush=True)
n = 0
while True:
    record, _ = store.generate(f"loop-{n}")
    ids.append(record.id)
    store.touch_last_used(record.id)
    store.flush_last_used(force=True)
    store.regenerate(record.id)
    if len(ids) > 10:
        store.revoke(ids.popleft())
    n += 1
"""


def test_sigkill_during_writes_never_leaves_a_broken_store(tmp_path: Path) -> None:
    path = tmp_path / "api-keys.json"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    rounds_that_wrote = 0
    rounds_killed_mid_write = 0
    last_size = 0
    for round_number in range(CRASH_ROUNDS):
        writer = subprocess.Popen(
            [sys.executable, "-S", "-c", WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert writer.stdout is not None
        ready = writer.stdout.readline()
        assert ready == b"ready\n", (ready, writer.communicate()[1].decode())
        time.sleep(rng.uniform(0, MAX_KILL_DELAY))  # a random kill point is what is tested, not a wait
        writer.send_signal(signal.SIGKILL)
        writer.communicate()
        assert writer.returncode == -signal.SIGKILL

        if any(tmp_path.glob(".api-keys.json.*.tmp")):
            rounds_killed_mid_write += 1
        assert path.exists() or round_number == rounds_that_wrote == 0
        if not path.exists():
            continue
        size = path.stat().st_size
        assert size > 0, f"round {round_number}: empty store file"
        store = KeyStore(path)
        store.load()  # raises KeyStoreCorruptError on a torn or half-written file
        assert len(store.list()) >= 1
        rounds_that_wrote += size != last_size
        last_size = size

    assert rounds_that_wrote >= CRASH_ROUNDS // 2, "the writers hardly wrote: the test proved little"
    # Some kills must have landed inside a write (a temp file left behind), or the test proved nothing.
    assert rounds_killed_mid_write >= 1
    # The next write under the lock sweeps temp files left by killed writers.
    store = KeyStore(path)
    store.load()
    store.generate("after the crashes")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".api-keys.json.lock", "api-keys.json"]
