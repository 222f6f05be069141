"""How this box reaches etcd, and keeping that right while it runs.

A box uses its own etcd member when that member is a voter. A learner (admitted, not yet promoted) and a box beyond
the fourth (no member of its own) use a voter's client port over mutual TLS instead, and then: follow membership,
move to another voter when the one in use stops answering, go back to their own member once promoted, turn into
the stack's standby when it has none (a client box), and, in a two-box stack whose voter is gone, re-form alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any, Protocol

import aetcd
import structlog

from agent.cluster import etcd_members, folder
from agent.cluster.admission import voter_client_urls
from agent.cluster.etcd import EtcdMember
from agent.cluster.etcd_client import ClientTls, VoterEtcdClient
from agent.cluster.etcd_config import EtcdConfig
from agent.cluster.etcd_members import EtcdError, MemberInfo
from agent.cluster.membership import RPC_TIMEOUT_SECONDS
from agent.cluster.net import host_port
from agent.cluster.pki import Identity
from agent.settings import Settings
from common.aio import wait_for

log = structlog.get_logger("agent.cluster")

CLIENT_CHECK_SECONDS = 1.0
# A learner of a two-box stack re-forms alone after its voter has been unreachable this long (a few lease TTLs:
# a voter that is merely slow or restarting comes back well within it).
REFORM_AFTER_SECONDS = 5.0
# A client replaced by another stays open this long for the reads already using it (a cluster API view makes at
# most a few etcd calls of RPC_TIMEOUT_SECONDS each).
RETIRED_CLIENT_GRACE_SECONDS = 5 * RPC_TIMEOUT_SECONDS


class LinkedNode(Protocol):
    """What the link needs of the node it serves (agent/cluster/node.py)."""

    settings: Settings
    node_id: str
    address: str

    @property
    def live_nodes(self) -> Mapping[str, Any]: ...

    @property
    def etcd_client(self) -> aetcd.Client | None: ...

    def member_for(self, identity: Identity) -> EtcdMember: ...

    def forget_member(self) -> None: ...

    def start_tasks(self, identity: Identity, client: aetcd.Client) -> None: ...

    async def stop_tasks(self) -> None: ...


class EtcdLink:
    """Chooses this box's etcd client (`pick`) and keeps it right (`keep`, a task while the node runs)."""

    def __init__(self, node: LinkedNode) -> None:
        self._node = node
        self.settled = asyncio.Event()  # clear while the cluster tasks move from one etcd client to another
        self.settled.set()
        self.member_count = 0  # as last seen; 0 = unknown (a box that restarted as a learner never re-forms)

    async def pick(self, identity: Identity, member: EtcdMember | None) -> aetcd.Client:
        """Our own member if it is a voter; a voter's client port over mutual TLS while ours is a learner, or for
        good on a box that runs no member (beyond the fourth)."""
        if member is not None:
            local = await member.client()
            if not (await etcd_members.status(local, timeout=RPC_TIMEOUT_SECONDS)).is_learner:
                return local
        urls = await asyncio.to_thread(folder.load_voter_urls, self._node.settings.cluster_dir)
        if not urls:
            raise EtcdError("this box reaches the cluster through a voter and no voter's client URL is known")
        return VoterEtcdClient(
            urls, ClientTls(identity.ca_pem, identity.cert_pem, identity.key_pem), timeout=EtcdConfig.request_timeout_s
        )

    async def keep(self, identity: Identity, member: EtcdMember | None) -> None:
        """While using a voter's port, every second: see the module docstring. Runs until cancelled."""
        failures, unreachable_since = 0, None
        while True:
            await asyncio.sleep(CLIENT_CHECK_SECONDS)
            client = self._node.etcd_client
            if not isinstance(client, VoterEtcdClient):
                continue
            try:
                if member is not None and await self._promoted(member):
                    await self._switch_to_own_member(identity, member, client)
                    continue
                current = await wait_for(etcd_members.members(client), RPC_TIMEOUT_SECONDS)
                failures, unreachable_since = 0, None
                self.member_count = len(current)
                urls = voter_client_urls(current)
                await client.use_endpoints(urls)
                await asyncio.to_thread(folder.save_voter_urls, self._node.settings.cluster_dir, urls)
                if member is None and (stale := self._own_member(current)) is not None:
                    await self._remove_stale_member(client, stale)
                elif member is None and self._first_client_without_standby(current):
                    member = await self._become_standby(identity, client)
            except (aetcd.exceptions.ClientError, EtcdError, TimeoutError) as exc:
                failures += 1
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if member is not None and self.member_count == 2 and now - unreachable_since >= REFORM_AFTER_SECONDS:
                    await self._reform_alone(identity, member, client)
                    continue
                if failures >= 2 and len(client.endpoints) > 1:
                    log.info("etcd_client_unanswered", endpoint=client.endpoint, error=str(exc))
                    await client.rotate()
                    failures = 0

    async def _switch_to_own_member(self, identity: Identity, member: EtcdMember, client: VoterEtcdClient) -> None:
        """Promoted to voter: move the cluster tasks onto our own member, then retire the voter's client.

        Readers wait for the switch (`settled`) instead of finding no cluster layer, and the old client closes only
        after the reads that took it before the switch have had time to finish: closing a grpc channel cancels
        its calls, and a request of the cluster API would end without an answer.
        """
        log.info("etcd_client_switched", node=self._node.node_id, to="own member (promoted to voter)")
        self.settled.clear()
        try:
            await self._node.stop_tasks()
            self._node.start_tasks(identity, await member.client())
        finally:
            self.settled.set()
        try:
            await asyncio.sleep(RETIRED_CLIENT_GRACE_SECONDS)
        finally:
            await client.close()

    @staticmethod
    async def _promoted(member: EtcdMember) -> bool:
        own = await etcd_members.status(await member.client(), timeout=RPC_TIMEOUT_SECONDS)
        return not own.is_learner

    def _own_member(self, members: list[MemberInfo]) -> MemberInfo | None:
        """A member of this box's in the cluster although this box runs none: left by a box killed while it was
        turning into the standby (added, maybe started, but its folder still says client)."""
        node = self._node
        peer_url = f"https://{host_port(node.address, node.settings.cluster.etcd_peer_port)}"
        return next((m for m in members if m.name == node.node_id or peer_url in m.peer_urls), None)

    async def _remove_stale_member(self, client: VoterEtcdClient, stale: MemberInfo) -> None:
        """Remove it: it takes etcd's one learner place and no box will ever run it; the box becomes the standby
        again afresh on a later round."""
        await etcd_members.remove(client, stale.id)
        log.warning("stale_member_removed", node=self._node.node_id, member_id=f"{stale.id:x}")

    def _first_client_without_standby(self, members: list[MemberInfo]) -> bool:
        """A client box should become the standby member: the stack has none, and this is the live client with
        the lowest id (the others wait their turn, so they do not race for etcd's one learner place)."""
        if any(m.is_learner or not m.name for m in members):
            return False
        named = {m.name for m in members}
        clients = sorted(node_id for node_id in self._node.live_nodes if node_id not in named)
        return bool(clients) and clients[0] == self._node.node_id

    async def _become_standby(self, identity: Identity, client: VoterEtcdClient) -> EtcdMember | None:
        """Turn this client box into the stack's standby (a learner the leader promotes when a vote is free)."""
        node, cluster_dir = self._node, self._node.settings.cluster_dir
        peer_url = f"https://{host_port(node.address, node.settings.cluster.etcd_peer_port)}"
        try:
            member_id, initial_cluster = await etcd_members.add_learner(client, node.node_id, peer_url)
        except EtcdError as exc:
            log.info("standby_not_added", node=node.node_id, error=str(exc))
            return None
        member = node.member_for(identity)
        try:
            await member.start_joining(initial_cluster)
        except EtcdError as exc:
            log.error("standby_start_failed", node=node.node_id, error=str(exc))
            await member.stop()
            node.forget_member()
            with contextlib.suppress(aetcd.exceptions.ClientError, EtcdError, TimeoutError):
                await wait_for(etcd_members.remove(client, member_id), RPC_TIMEOUT_SECONDS)
            await asyncio.to_thread(folder.remove_member_data, cluster_dir)
            return None
        await asyncio.to_thread(folder.set_client_only, cluster_dir, False)
        log.info("client_became_member", node=node.node_id, role="learner")
        return member

    async def _reform_alone(self, identity: Identity, member: EtcdMember, client: VoterEtcdClient) -> None:
        """The voter of a two-box stack is gone: carry on as a one-box cluster from this box's copy of the state.

        Topology and placement are soft state, so a copy that may miss the last writes is acceptable; the
        alternative is a box that serves no cluster at all until an operator steps in.
        """
        log.warning(
            "cluster_voter_lost",
            node=self._node.node_id,
            unreachable_s=REFORM_AFTER_SECONDS,
            action="re-forming a single-box cluster from this box's copy",
        )
        await self._node.stop_tasks()
        await client.close()
        await member.force_new_cluster(cluster_id=identity.cluster_id)
        self.member_count = 1
        self._node.start_tasks(identity, await member.client())
        log.info("cluster_reformed", node=self._node.node_id, cluster_id=identity.cluster_id)
