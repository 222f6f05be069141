"""Fault: the receiving box's disk is full during a model pull (its model store is a small tmpfs).

What the user must see: the pull stream ends with a `failed` line for the box whose error says it ran out of disk
space (how much is needed, how much is free, what to do), then `error`; the agent keeps running; nothing is
half-installed (the manifest still parses and does not list the model, no partial copy is left holding the disk
or waiting to be trusted); once there is room, the same pull succeeds and the model's sha256 matches the source.
Both ways a disk is full: too small from the start, and filled up by something else in the middle of the copy.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.atomic import atomic_write_bytes, file_sha256, tree_size
from agent.models.bundled import BUNDLED_MODELS
from agent.models.pull import PullError
from agent.models.pull import pull as pull_model
from agent.models.store import ModelStore
from tests.agent.cluster.stack import needs_etcd
from tests.agent.cluster.test_model_pull import source as peer_source
from tests.agent_process import RunningAgent
from tests.bundled import minilm_dir, smollm2_gguf
from tests.faults.harness import Tmpfs, needs_root, stopped
from tests.faults.pulling import ALIAS, box_lines, manifest, model_sha256, pull, staged_bytes, staging, two_boxes
from tests.waiting import eventually

pytestmark = needs_root

MIB = 1 << 20


def assert_nothing_half_installed(receiver: RunningAgent, store_before: dict[str, dict[str, Any]]) -> None:
    assert receiver.process.poll() is None, "the agent died of a full disk"
    assert manifest(receiver) == store_before  # still readable, unchanged: the model is not listed
    assert not staging(receiver, ALIAS).exists()  # no partial copy holding the disk or waiting to be resumed
    assert not (receiver.home / "models" / ALIAS).exists()
    leftovers = [p.name for p in (receiver.home / "models").iterdir() if p.name.startswith(".manifest.json.")]
    assert not leftovers, leftovers  # no temp manifest


def fill(filler: Path, disk: Tmpfs, leave: int = 64 * 1024) -> None:
    """Take all but `leave` bytes of the disk's free space, at once."""
    with filler.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, disk.free_bytes() - leave)


def open_files_under(pid: int, root: Path) -> list[str]:
    """Files under `root` that process `pid` holds open (a deleted one still holds its disk space)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith(f"{root}/"):
            held.append(target)
    return held


@needs_etcd
def test_a_pull_onto_a_full_disk_fails_clearly_and_succeeds_once_there_is_room(
    tmp_path: Path,
    tmpfs: Callable[[Path, int], Tmpfs],
    boxes: Callable[..., RunningAgent],
) -> None:
    size = smollm2_gguf().stat().st_size
    bundled = size + tree_size(minilm_dir())  # every box copies the bundled models into its store at start
    # box-b's store: room for what it holds already and 16 MiB more, far from the model's ~94 MiB.
    disk = tmpfs(tmp_path / "box-b" / "models", math.ceil(bundled / MIB) + 16)
    source, receiver = two_boxes(tmp_path, boxes)
    store_before = manifest(receiver)
    assert ALIAS not in store_before

    # Too small from the start: refused before a byte is written, saying how much is missing.
    lines = pull(source, ALIAS, "box-b")
    failed = box_lines(lines, "box-b")[-1]
    assert failed["status"] == "failed", lines
    assert "not enough disk space" in failed["error"] and "MB free" in failed["error"], failed
    assert "free space" in failed["error"] and str(receiver.home / "models") in failed["error"], failed
    assert lines[-1] == {"status": "error", "model": ALIAS, "nodes": ["box-b"], "errors": {"box-b": failed["error"]}}
    assert_nothing_half_installed(receiver, store_before)

    # Room at the start, but something else fills the disk while the copy runs.
    disk.resize(math.ceil(bundled / MIB) + math.ceil(size / MIB) + 32)
    filler = disk.where / "filler"
    result: dict[str, list[dict[str, Any]]] = {}
    puller = threading.Thread(target=lambda: result.setdefault("lines", pull(source, ALIAS, "box-b")))
    puller.start()
    try:
        eventually(lambda: staged_bytes(receiver, ALIAS) > 0, "the copy under way", 60, interval=0.002)
        # Freeze the copy while the disk fills, so it is cut in the middle whatever the machine's speed.
        receiver.process.send_signal(signal.SIGSTOP)
        try:
            eventually(lambda: stopped(receiver.process.pid), "box-b stopped", 10, interval=0.001)
            assert staged_bytes(receiver, ALIAS) < size, "the copy was complete before the disk could fill up"
            fill(filler, disk)
        finally:
            receiver.process.send_signal(signal.SIGCONT)
    finally:
        puller.join(120)
    lines = result["lines"]
    failed = box_lines(lines, "box-b")[-1]
    assert failed["status"] == "failed", lines
    assert "disk" in failed["error"] and "filled up" in failed["error"] and "pull again" in failed["error"], failed
    assert 0 < failed["completed"] < size, failed  # it broke off in the middle
    assert lines[-1]["status"] == "error"
    assert_nothing_half_installed(receiver, store_before)
    assert not open_files_under(receiver.process.pid, disk.where)  # nor a deleted one the agent still holds

    # Room made: the same pull now goes through, and the copy is verified against the source's digest.
    filler.unlink()
    lines = pull(source, ALIAS, "box-b")
    assert box_lines(lines, "box-b")[-1] == {
        "status": "done",
        "model": ALIAS,
        "node": "box-b",
        "completed": size,
        "total": size,
        "progress": 1.0,
    }, lines
    assert lines[-1] == {"status": "success", "model": ALIAS, "nodes": ["box-b"]}
    installed = manifest(receiver)[ALIAS]
    assert installed["sha256"] == model_sha256() and installed["size"] == size
    assert file_sha256(receiver.home / "models" / installed["file"]) == model_sha256()  # the bytes on box-b's disk
    assert not staging(receiver, ALIAS).exists()
    assert {k: v for k, v in manifest(receiver).items() if k != ALIAS} == store_before  # nothing else touched
    assert receiver.process.poll() is None


@pytest.mark.allow_blocking("its progress callback fills the disk, it reads the manifest; pull() stays checked")
async def test_a_copy_whose_manifest_entry_cannot_be_written_is_not_left_in_the_store(
    tmp_path: Path,
    tmpfs: Callable[[Path, int], Tmpfs],
) -> None:
    # The disk fills up after the last byte came and before the manifest names the model: the pulled file must
    # not stay behind unlisted, holding the (now full) disk.
    source_store = ModelStore(tmp_path / "source" / "models")
    await asyncio.to_thread(source_store.install_bundled, BUNDLED_MODELS[0])
    disk = tmpfs(tmp_path / "receiver", math.ceil(smollm2_gguf().stat().st_size / MIB) + 32)
    target = ModelStore(disk.where / "models")
    await asyncio.to_thread(
        atomic_write_bytes, disk.where / "models" / "manifest.json", json.dumps({"version": 1, "models": []}).encode()
    )
    filler = disk.where / "filler"

    def fill_at_the_end(done: int, total: int) -> None:
        if done == total:
            fill(filler, disk, leave=0)

    async with peer_source(source_store) as (url, session, _):
        with pytest.raises(PullError, match="could not be installed") as info:
            await pull_model(session, url, BUNDLED_MODELS[0].id, target, fill_at_the_end)
    assert "No space left on device" in str(info.value) and "was not installed" in str(info.value)
    assert target.installed() == []  # the manifest is intact and lists nothing
    assert sorted(p.name for p in (disk.where / "models").iterdir()) == [".partial", "manifest.json"]
    assert not any((disk.where / "models" / ".partial").iterdir())
