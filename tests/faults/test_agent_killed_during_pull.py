"""Fault: the receiving box's agent is SIGKILLed while its copy of a model is partly written, then started again
with the same home.

What the user must see: nothing to do but restart it: the box takes the pull request up again by itself, resumes
the copy where it stopped (a Range request from the bytes it already had, not a fresh download), checks the
result against the source's sha256 and lists the model; the partial copy is gone afterwards. The copy is frozen
(SIGSTOP) at a byte count the test has read before the kill, so the resume point is known exactly.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from agent.cluster.replicas import ReplicaKeeper
from agent.models.bundled import BUNDLED_MODELS
from agent.models.loader import ModelLoader
from agent.models.oci.client import OciRegistry
from agent.models.store import ModelStore
from tests.agent.cluster.stack import needs_etcd, topology
from tests.agent.cluster.test_model_pull import source as peer_source
from tests.agent_process import RunningAgent
from tests.bundled import smollm2_gguf
from tests.faults.harness import kill_agent, stopped
from tests.faults.pulling import ALIAS, box_lines, manifest, model_sha256, pull, staged_bytes, staging, two_boxes
from tests.waiting import eventually


@needs_etcd
def test_a_pull_cut_by_a_killed_agent_resumes_after_restart_and_is_verified(
    tmp_path: Path,
    boxes: Callable[..., RunningAgent],
) -> None:
    size = smollm2_gguf().stat().st_size
    source, receiver = two_boxes(tmp_path, boxes)

    # The stream is asked of box-a, so it outlives box-b; it is not what this test is about.
    stream: dict[str, list[dict[str, Any]]] = {}
    watcher = threading.Thread(target=lambda: stream.setdefault("lines", pull(source, ALIAS, "box-b")))
    watcher.start()
    try:
        eventually(lambda: staged_bytes(receiver, ALIAS) > 0, "the copy under way", 60, interval=0.002)
        receiver.process.send_signal(signal.SIGSTOP)  # freeze the copy where it is, then read how far it got
        eventually(lambda: stopped(receiver.process.pid), "box-b stopped", 10, interval=0.001)
        had = staged_bytes(receiver, ALIAS)
        assert 0 < had < size, f"the copy was not cut in the middle: {had} of {size} bytes"
        kill_agent(receiver)
    finally:
        watcher.join(150)
    # The watcher saw box-b go (or, had it come back within its lease, finish): never a hang or a wrong success.
    last = box_lines(stream["lines"], "box-b")[-1]
    assert last["status"] == "failed" and last["error"] == "box-b left the cluster", last
    assert staged_bytes(receiver, ALIAS) == had and ALIAS not in manifest(receiver)  # nothing listed half-done

    # Started again, same home and ports: the pull request is still in etcd, and the box carries it out.
    again = boxes("box-b")
    eventually(lambda: ALIAS in manifest(again), "the model installed on box-b", 120)
    installed = manifest(again)[ALIAS]
    assert installed["sha256"] == model_sha256() and installed["size"] == size
    assert (again.home / "models" / installed["file"]).read_bytes() == smollm2_gguf().read_bytes()
    assert not staging(again, ALIAS).exists()
    # It resumed from exactly what it had: its own log says so, and the source was asked only for the rest.
    resumed = [line for line in again.log_lines() if line.get("event") == "model_pull_resumed"]
    assert [(line["from_bytes"], line["size"]) for line in resumed] == [(had, size)], resumed
    served = [
        line.get("range")
        for line in source.log_lines()
        if line.get("event") == "model_file_served" and line.get("model") == ALIAS
    ]
    assert served == [None, f"bytes={had}-"], served
    assert any(line.get("event") == "model_pulled" and line.get("model") == ALIAS for line in again.log_lines())
    # And the stack sees it: box-b is live again and its record lists the model in its store.
    eventually(
        lambda: ALIAS in (next(n for n in topology(source)["nodes"] if n["id"] == "box-b").get("store") or {}),
        "box-b's record listing the model",
        30,
    )


class StoreOnly:
    """The part of ModelLoader a copy uses: the store, and telling the cluster it changed."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.refreshed = 0

    async def refresh_store_facts(self) -> None:
        self.refreshed += 1


async def test_a_pull_taken_up_before_the_box_sees_the_cluster_waits_for_a_source(tmp_path: Path) -> None:
    # A restarted box reads its pull request from etcd at once; its view of the other boxes (a snapshot read by
    # another task) may come a moment later. The copy must wait for a holder to show up, not fail on "no box".
    source_store = ModelStore(tmp_path / "source" / "models")
    await asyncio.to_thread(source_store.install_bundled, BUNDLED_MODELS[0])
    model = BUNDLED_MODELS[0].id
    loader = StoreOnly(ModelStore(tmp_path / "box-b" / "models"))
    async with peer_source(source_store) as (url, session, _):
        host, port = url.removeprefix("https://").rsplit(":", 1)
        views = 0

        def live_nodes() -> dict[str, dict[str, Any]]:
            nonlocal views
            views += 1
            if views <= 3:
                return {}  # the node view not loaded yet
            return {"box-a": {"address": host, "peer_port": int(port), "store": {model: {"size": 1}}}}

        keeper = ReplicaKeeper(
            "box-b",
            cast(ModelLoader, loader),
            live_nodes,
            lambda: "box-a",
            lambda: session,
            lambda work, name: asyncio.create_task(work, name=name),
            OciRegistry("http://127.0.0.1:9"),  # no registry answers: the copy must come from a box
        )
        state: dict[str, Any] = {}
        await keeper._copy(model, state)
    assert views > 3 and loader.refreshed == 1
    installed = await asyncio.to_thread(loader.store.get, model)
    assert installed is not None and installed.sha256 == model_sha256()
    assert state["completed"] == state["total"] == smollm2_gguf().stat().st_size
