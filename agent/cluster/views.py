"""What the cluster API shows of the stack: its nodes, its topology and its health (GET /v1/nodes, /v1/topology,
/v1/cluster).

The views read etcd linearizably, so a box cut off from the quorum answers "no quorum" rather than stale data. A
read whose etcd client was retired under it (a learner promoted to voter moves to its own member) is read again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd

from agent.cluster import etcd_members
from agent.cluster.admission import desired_voters
from agent.cluster.etcd_members import EtcdError
from agent.cluster.membership import RPC_TIMEOUT_SECONDS, LeaderElection, NodeRegistry
from agent.errors import ThoxError
from common.aio import Interrupted, wait_for

_T = TypeVar("_T")


class ClusterUnavailable(ThoxError):
    """The cluster layer is not running (disabled, etcd missing) or cannot answer now (no quorum)."""


@dataclass(frozen=True)
class Connected:
    """This box's running cluster layer: its campaign, its node registry and the etcd client they use."""

    election: LeaderElection
    registry: NodeRegistry
    client: aetcd.Client

    async def live_records(self) -> dict[str, dict[str, Any]]:
        """The live nodes' records, read now; ClusterUnavailable without a quorum."""
        try:
            return await self.registry.nodes()
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise ClusterUnavailable(f"cluster state cannot be read (no quorum reachable?): {exc}") from exc


class ClusterViews:
    """The read side of the cluster API. `connected()` raises ClusterUnavailable while the layer is not running."""

    def __init__(
        self,
        connected: Callable[[], Awaitable[Connected]],
        node_id: Callable[[], str],
        cluster_id: Callable[[], str | None],
    ) -> None:
        self._connected = connected
        self._node_id = node_id
        self._cluster_id = cluster_id

    async def _read(self, view: Callable[[Connected], Awaitable[_T]]) -> _T:
        """`view` on the running layer; once more, on the layer's current client, if its client was retired."""
        try:
            return await view(await self._connected())
        except Interrupted:
            return await view(await self._connected())

    async def nodes(self) -> list[dict[str, Any]]:
        """Every member with its role; live ones with their published record and when it was last refreshed."""
        return await self._read(self._nodes)

    async def topology(self) -> dict[str, Any]:
        """GET /v1/topology: cluster id, node count, the leader (only while its lease is current) and the nodes."""
        return await self._read(self._topology)

    async def summary(self) -> dict[str, Any]:
        """GET /v1/cluster: healthy / degraded / no_quorum, pooled RAM and TOPS, the active model."""
        return await self._read(self._summary)

    async def _nodes(self, connected: Connected) -> list[dict[str, Any]]:
        try:
            live = await connected.registry.nodes()
            members = await wait_for(etcd_members.members(connected.client), RPC_TIMEOUT_SECONDS * 2)
        except Interrupted:
            raise
        except (aetcd.exceptions.ClientError, EtcdError, TimeoutError) as exc:
            raise ClusterUnavailable(f"cluster state cannot be read (no quorum reachable?): {exc}") from exc
        roles = {member.name: "learner" if member.is_learner else "voter" for member in members if member.name}
        now = time.time()
        found = []
        for node_id in sorted(set(live) | set(roles)):
            record = dict(live.get(node_id, {}))
            updated = record.pop("updated", None)
            found.append(
                {
                    **record,
                    "id": node_id,
                    "role": roles.get(node_id, "client"),
                    "alive": node_id in live,
                    "last_seen_seconds_ago": round(now - updated, 3) if isinstance(updated, (int, float)) else None,
                }
            )
        return found

    async def _topology(self, connected: Connected) -> dict[str, Any]:
        nodes = await self._nodes(connected)
        return {
            "cluster_id": self._cluster_id(),
            "node_count": sum(n["alive"] for n in nodes),
            "leader": await connected.election.current_leader(),
            "nodes": nodes,
        }

    async def _summary(self, connected: Connected) -> dict[str, Any]:
        election = connected.election
        try:
            nodes = await self._nodes(connected)
        except ClusterUnavailable:
            return {"status": "no_quorum", "cluster_id": self._cluster_id(), "node_id": self._node_id()}
        alive = [n for n in nodes if n["alive"]]
        voters = [n for n in nodes if n["role"] == "voter"]
        expected = desired_voters(len(nodes))
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
            "status": status,
            "cluster_id": self._cluster_id(),
            "leader": leader,
            "node_count": len(alive),
            "member_count": len(nodes),
            "voters": {"alive": sum(n["alive"] for n in voters), "expected": expected},
            "total_ram_gb": round(sum(float(n.get("ram_gb") or 0) for n in alive), 1),
            "total_tops": sum(t for t in tops if isinstance(t, (int, float))) if any(tops) else None,
            "active_model": models[0] if len(models) == 1 else (models or None),
        }
