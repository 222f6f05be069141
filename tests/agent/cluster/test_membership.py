"""Leader lease and node liveness against a real etcd: one leader, fast handover, no stale claims."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aetcd
import pytest

from agent.cluster.membership import CLAIM_MARGIN_SECONDS, DEFAULT_TTL_SECONDS, LeaderElection, NodeRegistry
from agent.cluster.views import ClusterViews, Connected
from tests import waiting
from tests.agent_process import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None,
    reason="etcd is not installed (Debian etcd-server; scripts/system-deps.sh installs it)",
)
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """One plain etcd on loopback with the agent's timing (heartbeat 50 ms, election 500 ms)."""
    client, peer = free_port(), free_port()
    process = subprocess.Popen(
        [
            "etcd",
            "--name",
            "solo",
            "--data-dir",
            str(tmp_path / "etcd"),
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"solo=http://127.0.0.1:{peer}",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", client), timeout=0.2):
            break
        assert time.monotonic() < deadline and process.poll() is None, "etcd did not start"
        time.sleep(0.05)  # the poll interval of a loop with a deadline
    try:
        yield process, client
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(10)


@contextlib.asynccontextmanager
async def contenders(port: int, count: int) -> AsyncIterator[list[LeaderElection]]:
    clients = [aetcd.Client("127.0.0.1", port) for _ in range(count)]
    elections = [LeaderElection(client, f"node-{i}") for i, client in enumerate(clients)]
    tasks = [asyncio.create_task(election.run()) for election in elections]
    try:
        yield elections
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()


async def until(condition: Callable[[], bool], what: str, timeout: float) -> float:
    """tests.waiting.until, timed: the seconds it took (several tests bound them)."""
    started = time.monotonic()
    await waiting.until(condition, what, timeout)
    return time.monotonic() - started


async def nodes_become(registry: NodeRegistry, expected: set[str], timeout: float) -> None:
    async def listed() -> bool:
        return set(await registry.nodes()) == expected

    await waiting.until(listed, f"the registry listing {sorted(expected)}", timeout, interval=0.05)


def child(script: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        stdout=stdout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


async def test_one_leader_and_everyone_agrees(etcd: tuple[subprocess.Popen[bytes], int]) -> None:
    async with contenders(etcd[1], 3) as elections:
        await until(lambda: any(e.is_leader for e in elections), "a leader", 30)
        # A window in which no second leader may appear: nothing later would prove it did not, so it stays a
        # bounded window.
        await asyncio.sleep(0.5)
        assert sum(e.is_leader for e in elections) == 1
        leader = next(e.node_id for e in elections if e.is_leader)
        assert {await e.current_leader() for e in elections} == {leader}


async def test_an_orderly_stop_hands_over_at_once(etcd: tuple[subprocess.Popen[bytes], int]) -> None:
    clients = [aetcd.Client("127.0.0.1", etcd[1]) for _ in range(2)]
    first, second = LeaderElection(clients[0], "first"), LeaderElection(clients[1], "second")
    first_task = asyncio.create_task(first.run())
    await until(lambda: first.is_leader, "the first leading", 30)
    second_task = asyncio.create_task(second.run())
    await asyncio.sleep(0.3)  # a window in which the second must not take over (bounded, as above)
    assert not second.is_leader
    first_task.cancel()
    await asyncio.gather(first_task, return_exceptions=True)
    # The lease was revoked: no waiting for the TTL.
    handover = await until(lambda: second.is_leader, "the handover", 1.0)
    assert handover < 0.5
    second_task.cancel()
    await asyncio.gather(second_task, return_exceptions=True)
    for client in clients:
        await client.close()


async def test_a_killed_leader_is_replaced_within_its_ttl(etcd: tuple[subprocess.Popen[bytes], int]) -> None:
    doomed = child(
        f"""
        import asyncio, aetcd
        from agent.cluster.membership import LeaderElection
        async def main():
            election = LeaderElection(aetcd.Client("127.0.0.1", {etcd[1]}), "doomed")
            task = asyncio.create_task(election.run())
            while not election.is_leader:
                await asyncio.sleep(0.01)  # the child's poll; the parent waits for its line, within the test timeout
            print("leading", flush=True)
            await task
        asyncio.run(main())
    """,
        stdout=subprocess.PIPE,
    )
    try:
        assert doomed.stdout is not None
        while doomed.stdout.readline().strip() != b"leading":  # (its log lines come first, on stdout too)
            assert doomed.poll() is None
        async with contenders(etcd[1], 2) as elections:
            # Lets the contenders start campaigning before the kill. Not a wait the test depends on: a contender
            # that campaigns later meets the same key and the same lease expiry, so the bound below holds either way.
            await asyncio.sleep(0.2)
            assert {await e.current_leader() for e in elections} == {"doomed"}
            doomed.send_signal(signal.SIGKILL)  # no revoke: only the lease's expiry frees the key
            took = await until(lambda: any(e.is_leader for e in elections), "a new leader", DEFAULT_TTL_SECONDS + 1.0)
            assert took < 3.0
    finally:
        doomed.kill()
        doomed.wait()
        if doomed.stdout is not None:
            doomed.stdout.close()


async def test_a_leader_cut_off_from_etcd_stops_claiming_before_its_lease_can_expire(
    etcd: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = etcd
    async with contenders(port, 1) as (election,):
        await until(lambda: election.is_leader, "leading", 30)
        # A few keepalives acknowledged, for realism. Not a wait the test depends on: freezing earlier only moves
        # the end of the claim earlier, and the bound below is measured from the freeze.
        await asyncio.sleep(0.5)
        process.send_signal(signal.SIGSTOP)  # etcd frozen: keepalives go unanswered, as in a partition
        gave_up = await until(lambda: not election.is_leader, "the claim ending", DEFAULT_TTL_SECONDS)
        # The last acknowledged keepalive was sent at most a third of the TTL before the freeze; the claim ends at
        # that send time + TTL - margin, strictly before etcd could expire the lease (TTL after it *received* it).
        assert gave_up <= DEFAULT_TTL_SECONDS - CLAIM_MARGIN_SECONDS + 0.05, gave_up
        assert await election.current_leader() is None  # and it cannot learn a leader either
        process.send_signal(signal.SIGCONT)
        await until(lambda: election.is_leader, "leading again after etcd thawed", 30)


async def test_a_killed_node_leaves_the_registry_within_its_ttl(etcd: tuple[subprocess.Popen[bytes], int]) -> None:
    doomed = child(f"""
        import asyncio, aetcd
        from agent.cluster.membership import NodeRegistry
        async def main():
            await NodeRegistry(aetcd.Client("127.0.0.1", {etcd[1]}), "doomed").run(lambda: {{"ram_gb": 8}})
        asyncio.run(main())
    """)
    client = aetcd.Client("127.0.0.1", etcd[1])
    registry = NodeRegistry(client, "observer")
    observer = asyncio.create_task(registry.run(lambda: {"ram_gb": 16}))
    try:
        await nodes_become(registry, {"doomed", "observer"}, 10)
        assert (await registry.nodes())["doomed"]["ram_gb"] == 8
        doomed.send_signal(signal.SIGKILL)
        killed = time.monotonic()

        await nodes_become(registry, {"observer"}, DEFAULT_TTL_SECONDS + 2)
        assert time.monotonic() - killed <= DEFAULT_TTL_SECONDS + 1.0
    finally:
        doomed.kill()
        doomed.wait()
        observer.cancel()
        await asyncio.gather(observer, return_exceptions=True)
        await client.close()


async def test_a_cluster_view_whose_etcd_client_is_closed_under_it_reads_again_on_the_current_client(
    etcd: tuple[subprocess.Popen[bytes], int],
) -> None:
    """A learner promoted to voter retires its voter's client; a GET /v1/topology in flight on it must still
    answer (it used to end in CancelledError, and the API dropped the connection without a response)."""
    loop = asyncio.get_running_loop()
    with socket.socket() as silent:  # the retired client's server: accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.setblocking(False)
        retired = aetcd.Client("127.0.0.1", silent.getsockname()[1], timeout=30)
        current = aetcd.Client("127.0.0.1", etcd[1])
        registry = NodeRegistry(current, "solo")  # the name of the etcd member, so the view lists one voter
        publishing = asyncio.create_task(registry.run(lambda: {"address": "127.0.0.1"}))
        layers = iter(
            [
                Connected(LeaderElection(retired, "solo"), NodeRegistry(retired, "solo"), retired),
                Connected(LeaderElection(current, "solo"), registry, current),
            ]
        )

        async def connected() -> Connected:
            return next(layers)

        try:
            await nodes_become(registry, {"solo"}, 30)
            views = ClusterViews(connected, lambda: "solo", lambda: "test-cluster")
            reading = asyncio.create_task(views.topology())
            connection, _ = await asyncio.wait_for(loop.sock_accept(silent), 10)  # the read is in flight
            await retired.close()
            topology = await asyncio.wait_for(reading, 30)
            connection.close()
            assert [(node["id"], node["role"], node["alive"]) for node in topology["nodes"]] == [
                ("solo", "voter", True)
            ]
            assert topology["node_count"] == 1
        finally:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            await current.close()
