"""EtcdMember against real etcd processes on loopback ports, peers over mutual TLS from a throwaway CA."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aetcd
import pytest
from structlog.testing import capture_logs

from agent.cluster.etcd import NOT_INSTALLED, EtcdMember, _BoundedLog
from agent.cluster.etcd_config import EtcdConfig, PeerTls
from agent.cluster.etcd_members import EtcdError, add_learner, members, promote, remove, status
from tests import waiting
from tests.agent.cluster.conftest import TestCa

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason=NOT_INSTALLED)

MakeMember = Callable[..., EtcdMember]


@pytest.fixture
async def make_member(
    tmp_path: Path, free_ports: Callable[[int], list[int]], cluster_ca: TestCa
) -> AsyncIterator[MakeMember]:
    """Members on fresh loopback ports with certificates from the cluster CA; all stopped at the end."""
    made: list[EtcdMember] = []
    used: set[int] = set()

    def make(name: str, *, tls: PeerTls | None = None, **overrides: Any) -> EtcdMember:
        ports = [p for p in free_ports(6) if p not in used][:2]
        used.update(ports)
        config = EtcdConfig(
            name=name,
            data_dir=tmp_path / name / "etcd",
            peer_host="127.0.0.1",
            tls=tls or cluster_ca.issue(name),
            client_port=ports[0],
            peer_port=ports[1],
            start_timeout_s=20,
            **overrides,
        )
        member = EtcdMember(config)
        made.append(member)
        return member

    yield make
    # SIGKILL: a graceful stop of a leader whose peers stop too waits for a leadership transfer (about 6 s).
    await asyncio.gather(*(member.stop(graceful=False) for member in made))


def alive(pid: int) -> bool:
    """True while a process with this pid exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
    """tests.waiting.until with the argument order used here (timeout before what)."""
    await waiting.until(condition, what, timeout, interval=0.05)


async def listening(port: int) -> bool:
    """Whether something accepts TCP connections on the loopback `port` (a connection opened and closed)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def grow(first: EtcdMember, *others: EtcdMember, voters: bool = True) -> None:
    """Add each member as a learner through `first`, start it joining, and promote it if `voters`."""
    client = await first.client()
    for member in others:
        member_id, initial_cluster = await add_learner(client, member.config.name, member.config.peer_url)
        await member.start_joining(initial_cluster)
        if voters:
            await promote(client, member_id)


async def test_single_member_serves_restarts_from_its_data_and_leaves_no_process(make_member: MakeMember) -> None:
    member = make_member("solo")
    answer = await member.start_new("cluster-1")
    assert answer.leader_id == answer.member_id and not answer.is_learner and answer.version.startswith("3.")
    client = await member.client()
    await client.put(b"/thox/k", b"v1")
    assert (await client.get(b"/thox/k")).value == b"v1"
    pid = member.pid
    assert pid is not None and alive(pid)
    assert member.config.pid_file.read_text().strip() == str(pid)

    await member.stop()
    assert member.pid is None and not alive(pid)
    assert not member.config.pid_file.exists()
    assert member.config.log_file.stat().st_size > 0  # etcd's stderr went to the bounded log file

    with pytest.raises(EtcdError, match="already holds a member"):
        await member.start_new("cluster-1")
    await member.start_existing()
    assert (await (await member.client()).get(b"/thox/k")).value == b"v1"
    pid = member.pid
    assert pid is not None
    await member.stop()
    assert not alive(pid)


async def test_three_members_join_as_learners_become_voters_and_read_linearizably(make_member: MakeMember) -> None:
    first, second, third = make_member("n1"), make_member("n2"), make_member("n3")
    await first.start_new("cluster-3")
    client = await first.client()
    member_id, initial_cluster = await add_learner(client, "n2", second.config.peer_url)
    assert sorted(initial_cluster.split(",")) == [f"n1={first.config.peer_url}", f"n2={second.config.peer_url}"]
    joined = await second.start_joining(initial_cluster)
    assert joined.is_learner and joined.member_id == member_id
    await promote(client, member_id)
    await promote(client, member_id)  # a repeated promote (lost answer) is not an error
    await grow(first, third)

    listed = await members(client)
    assert sorted(m.name for m in listed) == ["n1", "n2", "n3"]
    assert not any(m.is_learner for m in listed)
    assert {m.peer_urls for m in listed} == {(m.config.peer_url,) for m in (first, second, third)}
    await client.put(b"/thox/topology", b"three")
    got = await (await third.client()).get(b"/thox/topology")  # linearizable: goes through the leader
    assert got is not None and got.value == b"three"


async def _tls_probe(port: int, ca: Path, cert: PeerTls | None) -> bytes:
    """Open TLS 1.2 to a peer port (client cert optional) and GET /version; TLS 1.2 so a refusal fails the handshake."""

    def context() -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
        return ctx

    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=await asyncio.to_thread(context), server_hostname="127.0.0.1"), 5
    )
    try:
        writer.write(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.readuntil(b"}"), 5)  # the JSON body's end; etcd keeps the connection
    finally:
        writer.close()


async def test_peer_port_refuses_certificates_from_another_ca(
    make_member: MakeMember, cluster_ca: TestCa, other_ca: TestCa
) -> None:
    member = make_member("n1")
    await member.start_new("cluster-tls")
    port = member.config.peer_port

    # A cluster certificate gets in (so the refusals below are about the certificate, not the probe).
    assert b"etcdserver" in await _tls_probe(port, cluster_ca.ca_file, cluster_ca.issue("probe"))
    with pytest.raises(ssl.SSLError):
        await _tls_probe(port, cluster_ca.ca_file, other_ca.issue("intruder"))
    with pytest.raises(ssl.SSLError):
        await _tls_probe(port, cluster_ca.ca_file, None)

    # A whole etcd with another CA's certificate, even when added as a member, cannot join.
    client = await member.client()
    intruder = make_member("intruder", tls=other_ca.issue("intruder"))
    intruder_id, initial_cluster = await add_learner(client, "intruder", intruder.config.peer_url)
    with pytest.raises(EtcdError, match="intruder .*certificate signed by unknown authority"):
        await intruder.start_joining(initial_cluster, timeout=15)
    assert intruder.pid is None
    with pytest.raises(EtcdError, match="never started"):  # the stale entry must go before another joins
        await add_learner(client, "n2", "https://127.0.0.1:1")
    await remove(client, intruder_id)
    assert [m.name for m in await members(client)] == ["n1"]
    await client.put(b"/thox/k", b"still-writable")


async def test_client_ports_refuse_clients_without_a_cluster_certificate(
    make_member: MakeMember, free_ports: Callable[[int], list[int]], cluster_ca: TestCa, other_ca: TestCa
) -> None:
    # Loopback included: on a shared box any local user can reach 127.0.0.1, only the agent's user holds the key.
    member = make_member("n1", client_tls_port=free_ports(1)[0])
    await member.start_new("cluster-clients")
    await (await member.client()).put(b"/thox/k", b"v")
    for port in (member.config.client_port, member.config.client_tls_port):
        assert port is not None
        assert b"etcdserver" in await _tls_probe(port, cluster_ca.ca_file, cluster_ca.issue("probe"))
        with pytest.raises(ssl.SSLError):
            await _tls_probe(port, cluster_ca.ca_file, other_ca.issue("intruder"))
        with pytest.raises(ssl.SSLError):
            await _tls_probe(port, cluster_ca.ca_file, None)
    plain = aetcd.Client("127.0.0.1", member.config.client_port, timeout=2)
    try:
        with pytest.raises(aetcd.exceptions.ClientError):
            await plain.put(b"/thox/k", b"overwritten")
    finally:
        await plain.close()
    assert (await (await member.client()).get(b"/thox/k")).value == b"v"
    status_ = await status(await member.client())
    [me] = await members(await member.client())
    assert me.id == status_.member_id and me.client_urls == (member.config.client_tls_url,)  # loopback not offered


async def test_sigkill_of_the_leader_fails_over_within_three_seconds(make_member: MakeMember) -> None:
    nodes = [make_member(name) for name in ("n1", "n2", "n3")]
    await nodes[0].start_new("cluster-failover")
    await grow(nodes[0], nodes[1], nodes[2])
    by_id = {(await status(await node.client())).member_id: node for node in nodes}
    leader = by_id[(await status(await nodes[0].client())).leader_id]
    survivors = [node for node in nodes if node is not leader]
    survivor_client = await survivors[0].client()

    old_leader = (await status(survivor_client)).leader_id
    started = time.monotonic()
    await leader.stop(graceful=False)  # SIGKILL, and no restart by the watcher
    new_leader = old_leader
    while new_leader in (0, old_leader):  # Status answers at once, leader or not: poll it for the election
        assert time.monotonic() - started < 10, "no new leader within 10 s of the leader's death"
        await asyncio.sleep(0.01)  # the poll interval of a loop with a deadline (the loop times the election)
        new_leader = (await status(survivor_client, timeout=0.5)).leader_id
    elected = time.monotonic() - started
    await asyncio.wait_for(survivor_client.put(b"/thox/after-failover", b"ok"), 2)
    failover = time.monotonic() - started
    print(f"etcd failover after leader SIGKILL: new leader {elected:.2f} s, put accepted {failover:.2f} s")  # noqa: T201
    assert by_id.get(new_leader) in survivors
    assert failover < 3.0, f"failover took {failover:.2f} s"

    # With two of three voters gone, the last one cannot be ready: the start times out, says why, kills etcd.
    await survivors[1].stop()
    last = survivors[0]
    await last.stop()
    with pytest.raises(EtcdError, match=r"did not become ready .* within 2s .*etcd said") as failure:
        await last.start_existing(timeout=2)
    assert last.pid is None
    assert "n3" in str(failure.value) or "n2" in str(failure.value) or "n1" in str(failure.value)

    # Cancelled while starting (the agent shutting down): etcd is killed, not left behind.
    task = asyncio.create_task(last.start_existing())
    await until(lambda: last.pid is not None, 10, "etcd launched")
    pid = last.pid
    assert pid is not None
    # Launched and up (its client port open): the start is waiting for a readiness that cannot come.
    await until(lambda: listening(last.config.client_port), 30, "the relaunched etcd listening")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert last.pid is None and not alive(pid)


async def test_watcher_restarts_etcd_after_kill_9(make_member: MakeMember) -> None:
    member = make_member("solo")
    await member.start_new("cluster-crash")
    client = await member.client()
    await client.put(b"/thox/k", b"kept")
    pid = member.pid
    assert pid is not None
    with capture_logs() as logs:
        os.kill(pid, signal.SIGKILL)
        await until(lambda: member.pid not in (None, pid), 10, "etcd restarted")
        answer = await member.wait_ready(10)
    assert answer.leader_id == answer.member_id
    assert member.restarts == 1
    assert (await client.get(b"/thox/k")).value == b"kept"  # the same client reconnects on its own
    events = [entry for entry in logs if entry["event"].startswith("etcd_")]
    exited = next(entry for entry in events if entry["event"] == "etcd_exited")
    assert exited["code"] == -signal.SIGKILL and isinstance(exited["stderr_tail"], list)
    assert [e["event"] for e in events][:3] == ["etcd_exited", "etcd_restarting", "etcd_started"]
    assert next(e for e in events if e["event"] == "etcd_restarting")["delay_s"] == 0.5


async def test_force_new_cluster_two_voters_survivor_keeps_its_data(make_member: MakeMember) -> None:
    gone, survivor = make_member("n1"), make_member("n2")
    await gone.start_new("cluster-pair")
    await grow(gone, survivor)
    await (await gone.client()).put(b"/thox/placement", b"before")
    client = await survivor.client()
    assert (await client.get(b"/thox/placement")).value == b"before"

    await gone.stop(graceful=False)
    with pytest.raises((aetcd.exceptions.ClientError, asyncio.TimeoutError)):  # 1 of 2 voters: no quorum
        await asyncio.wait_for(client.put(b"/thox/placement", b"lost"), 1.5)

    answer = await survivor.force_new_cluster()
    assert answer.leader_id == answer.member_id
    client = await survivor.client()
    assert [(m.name, m.is_learner) for m in await members(client)] == [("n2", False)]
    assert (await client.get(b"/thox/placement")).value == b"before"
    await client.put(b"/thox/placement", b"after")

    # The flag was for that one launch: the watcher restarts a crashed member plainly.
    pid = survivor.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: survivor.pid not in (None, pid), 10, "etcd restarted")
    new_pid = survivor.pid
    assert new_pid is not None
    assert b"--force-new-cluster" not in await asyncio.to_thread(Path(f"/proc/{new_pid}/cmdline").read_bytes)
    await survivor.wait_ready(10)
    assert (await client.get(b"/thox/placement")).value == b"after"


async def test_force_new_cluster_from_a_learner_reforms_from_its_copy(make_member: MakeMember) -> None:
    voter, learner = make_member("n1"), make_member("n2")
    await voter.start_new("cluster-pair")
    await grow(voter, learner, voters=False)
    voter_client = await voter.client()
    await voter_client.put(b"/thox/placement/m1", b"n1")
    lease = await voter_client.lease(30)
    await voter_client.put(b"/thox/leader", b"n1", lease=lease.id)
    client = await learner.client()

    async def copied() -> bool:
        return await client.get(b"/thox/leader", serializable=True) is not None

    await until(copied, 5, "learner caught up")
    await voter.stop(graceful=False)

    with pytest.raises(EtcdError, match="learner"):
        await learner.force_new_cluster()
    answer = await learner.force_new_cluster(cluster_id="cluster-pair")
    assert answer.leader_id == answer.member_id
    client = await learner.client()
    assert [(m.name, m.is_learner) for m in await members(client)] == [("n2", False)]
    assert (await client.get(b"/thox/placement/m1")).value == b"n1"
    assert await client.get(b"/thox/leader") is None  # the dead voter's leased claim is not carried over
    await client.put(b"/thox/placement/m1", b"n2")
    assert (learner.config.data_dir.parent / "etcd.replaced").is_dir()


async def test_start_refuses_clearly(make_member: MakeMember, tmp_path: Path) -> None:
    missing = make_member("a", etcd_binary=str(tmp_path / "no-etcd"))
    with pytest.raises(EtcdError, match=r"etcd is not installed \(Debian package etcd-server; scripts/system-deps.sh"):
        await missing.start_new("c")

    busy = make_member("c")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy.config.client_port))
        holder.listen()
        with pytest.raises(EtcdError, match=f"cannot listen on 127.0.0.1:{busy.config.client_port}: .* in use"):
            await busy.start_new("c")
    assert busy.pid is None

    (tmp_path / "d").write_text("a file where the data dir should go")
    unusable = make_member("d")
    with pytest.raises(EtcdError, match="data dir .* is unusable"):
        await unusable.start_new("c")

    with pytest.raises(EtcdError, match="holds no member"):
        await make_member("e").start_existing()
    with pytest.raises(EtcdError, match="does not list this member"):
        await make_member("f").start_joining("g=https://127.0.0.1:1")
    with pytest.raises(ValueError, match="member name"):
        EtcdConfig(name="a,b", data_dir=tmp_path, peer_host="127.0.0.1", tls=missing.config.tls)


async def test_start_reaps_an_etcd_left_behind_by_a_dead_agent(make_member: MakeMember) -> None:
    member = make_member("solo")
    await member.start_new("cluster-orphan")
    await (await member.client()).put(b"/thox/k", b"v")
    await member.stop()
    cfg = member.config
    # What a SIGKILLed agent leaves: its etcd still running on the data dir and ports, and the pid file.
    orphan = await asyncio.create_subprocess_exec(
        shutil.which("etcd") or "etcd",
        *cfg.flags(),  # the very command line the agent had started it with
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await asyncio.to_thread(cfg.pid_file.write_text, f"{orphan.pid}\n")
        await until(lambda: listening(cfg.client_port), 30, "the orphaned etcd serving its client port")
        assert orphan.returncode is None
        with capture_logs() as logs:
            await member.start_existing()
        assert await asyncio.wait_for(orphan.wait(), 5) == -signal.SIGKILL
        assert {"event": "etcd_stale_killed", "member": "solo", "pid": orphan.pid, "log_level": "warning"} in logs
        assert (await (await member.client()).get(b"/thox/k")).value == b"v"
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()


def test_etcd_log_file_is_size_bounded(tmp_path: Path) -> None:
    log_file = _BoundedLog(tmp_path / "etcd.log", max_bytes=100)
    for i in range(30):
        log_file.append(f"line {i:02d}\n".encode())
    assert (tmp_path / "etcd.log").stat().st_size <= 100
    assert (tmp_path / "etcd.log.1").stat().st_size <= 100
    assert (tmp_path / "etcd.log").read_text().endswith("line 29\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["etcd.log", "etcd.log.1"]
