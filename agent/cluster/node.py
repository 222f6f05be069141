"""This box as a cluster member: its identity, its etcd member, its leader campaign and its published record.

On the first start a box founds its own single-box cluster (a new CA, its node certificate, a single-voter etcd);
later starts bring the same member back. The views (`topology()`, `summary()`, `nodes()`) are what the cluster API
serves; they read etcd linearizably, so a box cut off from the quorum answers "no quorum" rather than stale data.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import structlog

import agent
from agent.cluster import etcd as etcd_members
from agent.cluster.etcd import EtcdConfig, EtcdError, EtcdMember, MemberInfo, PeerTls
from agent.cluster.membership import RPC_TIMEOUT_SECONDS, LeaderElection, NodeRegistry
from agent.cluster.pki import ClusterCA, Identity, NodeKey, PkiError, make_csr, read_identity, write_identity
from agent.settings import Settings
from drivers.aio import wait_for

log = structlog.get_logger("agent.cluster")

CLUSTER_KEY = b"/thox/cluster"
NODE_ID_FILE = "node-id"
MAX_VOTERS = 3

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


class ClusterUnavailable(Exception):
    """The cluster layer is not running (disabled, etcd missing) or cannot answer now (no quorum)."""


@dataclass(frozen=True)
class Placement:
    """Where this box listens, as published to the others."""

    address: str
    inference_port: int
    cluster_port: int


def _first_lan_address() -> str:
    """The address the default route leaves from (no packet is sent), or loopback on a box without a network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere, only used to pick the interface
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def advertise_address(settings: Settings) -> str:
    """The address other boxes reach this one at (blocking: may consult the routing table)."""
    if settings.cluster.advertise:
        return settings.cluster.advertise
    if settings.bind_host not in ("0.0.0.0", "::"):  # noqa: S104 - comparing, not binding
        return settings.bind_host
    return _first_lan_address()


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _node_id(settings: Settings) -> str:
    """The configured node id, else the one generated on the first start and kept in the cluster folder."""
    if settings.cluster.node_id:
        return settings.cluster.node_id
    path = settings.cluster_dir / NODE_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        node_id = f"thox-{secrets.token_hex(4)}"
        settings.cluster_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(node_id + "\n")
        return node_id


def found_cluster(settings: Settings, node_id: str, address: str) -> Identity:
    """Blocking: a new cluster CA and this node's certificate, written to the cluster folder."""
    cluster_id = f"stack-{secrets.token_hex(4)}"
    ca = ClusterCA.create(cluster_id)
    key = NodeKey.create()
    cert = ca.issue(make_csr(key, node_id), node_id, _addresses(address), [node_id, socket.gethostname()])
    write_identity(settings.cluster_dir / "tls", ca.cert_pem, cert, key, ca.key_pem)
    identity = read_identity(settings.cluster_dir / "tls")
    assert identity is not None  # just written
    return identity


def _addresses(address: str) -> list[str]:
    return sorted({address, "127.0.0.1"})


class ClusterNode:
    """Owns this box's etcd member and its place in the cluster."""

    def __init__(self, settings: Settings, placement: Callable[[str], Placement],
                 local_facts: Callable[[], Mapping[str, Any]]) -> None:
        self.settings = settings
        self._placement = placement
        self._local_facts = local_facts
        self.node_id = ""
        self.address = ""
        self.identity: Identity | None = None
        self.member: EtcdMember | None = None
        self.election: LeaderElection | None = None
        self.registry: NodeRegistry | None = None
        self._client: aetcd.Client | None = None
        self._memory_gb = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.unavailable_reason: str | None = None

    @property
    def cluster_id(self) -> str | None:
        return self.identity.cluster_id if self.identity else None

    # ------------------------------------------------------------------ start / stop

    async def start(self, spawn: Spawn) -> None:
        """Found or rejoin this box's cluster, then campaign and publish; failures leave the box standalone."""
        try:
            await self._start(spawn)
        except (EtcdError, PkiError, OSError) as exc:
            self.unavailable_reason = str(exc)
            log.error("cluster_unavailable", error=str(exc))
            await self.stop()

    async def _start(self, spawn: Spawn) -> None:
        settings = self.settings
        self.node_id = await asyncio.to_thread(_node_id, settings)
        address = self.address = await asyncio.to_thread(advertise_address, settings)
        self._memory_gb = await asyncio.to_thread(_memory_gb)
        identity = await asyncio.to_thread(read_identity, settings.cluster_dir / "tls")
        founding = identity is None
        if identity is None:
            identity = await asyncio.to_thread(found_cluster, settings, self.node_id, address)
            log.info("cluster_founded", cluster_id=identity.cluster_id, node=self.node_id)
        self.identity = identity
        self.member = EtcdMember(EtcdConfig(
            name=self.node_id, data_dir=settings.cluster_dir / "etcd", peer_host=address,
            tls=PeerTls(identity.ca_path, identity.cert_path, identity.key_path),
            peer_port=settings.cluster.etcd_peer_port, client_port=settings.cluster.etcd_client_port))
        if founding:
            await self.member.start_new(identity.cluster_id)
        else:
            await self.member.start_existing()
        self._client = await self.member.client()
        if founding:
            record = {"cluster_id": identity.cluster_id, "founded_by": self.node_id, "founded": time.time()}
            await wait_for(self._client.put(CLUSTER_KEY, json.dumps(record).encode()), RPC_TIMEOUT_SECONDS)
        ttl = settings.cluster.lease_ttl_seconds
        self.election = LeaderElection(self._client, self.node_id, ttl)
        self.registry = NodeRegistry(self._client, self.node_id, ttl)
        self._tasks = [spawn(self.election.run(), "cluster-leader"),
                       spawn(self.registry.run(self._record), "cluster-node-record")]
        log.info("cluster_member_started", cluster_id=identity.cluster_id, node=self.node_id, address=address)

    async def stop(self) -> None:
        """Leave (revoking the leases hands leadership over at once), then stop etcd."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.election = self.registry = None
        if self.member is not None:
            await self.member.stop()

    def _record(self) -> dict[str, Any]:
        place = self._placement(self.address)
        return {
            "address": place.address, "inference_port": place.inference_port, "cluster_port": place.cluster_port,
            "ram_gb": self._memory_gb, "version": agent.__version__,
            "updated": round(time.time(), 3), **self._local_facts(),
        }

    # ------------------------------------------------------------------ views

    def _require(self) -> tuple[LeaderElection, NodeRegistry, aetcd.Client]:
        if self.election is None or self.registry is None or self._client is None:
            reason = self.unavailable_reason or "the cluster layer is disabled (cluster.enabled = false)"
            raise ClusterUnavailable(f"cluster unavailable: {reason}")
        return self.election, self.registry, self._client

    async def _members(self, client: aetcd.Client) -> list[MemberInfo]:
        return await wait_for(etcd_members.members(client), RPC_TIMEOUT_SECONDS * 2)

    async def nodes(self) -> list[dict[str, Any]]:
        """Every member with its role; live ones with their published record and when it was last refreshed."""
        election, registry, client = self._require()
        try:
            live, members = await registry.nodes(), await self._members(client)
        except (aetcd.exceptions.ClientError, EtcdError, TimeoutError) as exc:
            raise ClusterUnavailable(f"cluster state cannot be read (no quorum reachable?): {exc}") from exc
        roles = {member.name: "learner" if member.is_learner else "voter" for member in members if member.name}
        now = time.time()
        found = []
        for node_id in sorted(set(live) | set(roles)):
            record = dict(live.get(node_id, {}))
            updated = record.pop("updated", None)
            found.append({
                **record, "id": node_id, "role": roles.get(node_id, "client"), "alive": node_id in live,
                "last_seen_seconds_ago": round(now - updated, 3) if isinstance(updated, (int, float)) else None,
            })
        return found

    async def topology(self) -> dict[str, Any]:
        election = self._require()[0]
        nodes = await self.nodes()
        return {"cluster_id": self.cluster_id, "node_count": sum(n["alive"] for n in nodes),
                "leader": await election.current_leader(), "nodes": nodes}

    async def summary(self) -> dict[str, Any]:
        """GET /v1/cluster: health of the whole stack and its pooled resources."""
        election = self._require()[0]
        try:
            nodes = await self.nodes()
        except ClusterUnavailable:
            return {"status": "no_quorum", "cluster_id": self.cluster_id, "node_id": self.node_id}
        alive = [n for n in nodes if n["alive"]]
        voters = [n for n in nodes if n["role"] == "voter"]
        expected = 1 if len(nodes) <= 2 else MAX_VOTERS
        leader = await election.current_leader()
        if leader is None:
            status = "no_quorum"
        elif sum(n["alive"] for n in voters) < expected or len(alive) < len(nodes):
            status = "degraded"
        else:
            status = "healthy"
        tops = [n.get("tops") for n in alive]
        models = sorted({m for n in alive for m in n.get("models", [])})
        return {
            "status": status, "cluster_id": self.cluster_id, "leader": leader, "node_count": len(alive),
            "member_count": len(nodes), "voters": {"alive": sum(n["alive"] for n in voters), "expected": expected},
            "total_ram_gb": round(sum(float(n.get("ram_gb") or 0) for n in alive), 1),
            "total_tops": sum(t for t in tops if isinstance(t, (int, float))) if any(tops) else None,
            "active_model": models[0] if len(models) == 1 else (models or None),
        }


@asynccontextmanager
async def cluster_subsystem(node: ClusterNode, spawn: Spawn) -> AsyncIterator[None]:
    """The supervisor's view: start the member, and stop etcd after the tasks using it are cancelled."""
    await node.start(spawn)
    try:
        yield
    finally:
        await node.stop()
        log.info("cluster_member_stopped", node=node.node_id)
