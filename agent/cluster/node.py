"""This box as a cluster member: its identity, its etcd member, its leader campaign and its published record.

On the first start a box founds its own single-box cluster (a new CA, its node certificate, a single-voter etcd);
later starts bring the same member back. A box joins another cluster by a token (`join`, or docking: dock_join.py),
and leaves its own behind (folder.py keeps it aside). While running, it campaigns, publishes its record, admits
others, keeps the voters and reaches etcd through its own member or a voter's client port.

What the cluster API reads and asks of the stack lives beside it: `views` (nodes, topology, health: views.py) and
`models` (placement and pulls: stack_models.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import structlog
from aiohttp import web
from zeroconf import Error as ZeroconfError

import agent
from agent.cluster import folder
from agent.cluster.admission import Admission, keep_voters
from agent.cluster.ca_custody import CaCustodian, CaKeyRefused, forget_retired_key, holders
from agent.cluster.discovery import Discovery
from agent.cluster.dock_join import DockJoin, Offering
from agent.cluster.etcd import EtcdMember, MemberRemoved
from agent.cluster.etcd_client import VoterEtcdClient
from agent.cluster.etcd_config import EtcdConfig, PeerTls
from agent.cluster.etcd_link import EtcdLink
from agent.cluster.etcd_members import EtcdError
from agent.cluster.join import JoinGrant, JoinRefused, JoinRequest, parse_server
from agent.cluster.join import forward as forward_join
from agent.cluster.join import join as join_cluster
from agent.cluster.membership import RPC_TIMEOUT_SECONDS, LeaderElection, LiveNodes, NodeRegistry
from agent.cluster.net import advertise_address, host_port
from agent.cluster.peer import build_peer_app, serve_peer_api
from agent.cluster.pki import (
    Identity,
    NodeKey,
    PkiError,
    ca_fingerprint,
    client_context_from_pem,
    read_identity,
    server_context_from_pem,
    write_identity,
)
from agent.cluster.replicas import ReplicaKeeper
from agent.cluster.router import Router
from agent.cluster.stack_models import StackModels
from agent.cluster.tokens import JoinToken, pins
from agent.cluster.views import ClusterUnavailable, ClusterViews, Connected
from agent.hardware.dock import DockPipeline
from agent.models.loader import ModelLoader
from agent.models.oci.client import OciRegistry
from agent.settings import Settings
from common.aio import wait_for

log = structlog.get_logger("agent.cluster")

CLUSTER_KEY = b"/thox/cluster"
DISCOVERY_WAIT_SECONDS = 5.0
SWITCH_WAIT_SECONDS = 3 * RPC_TIMEOUT_SECONDS  # stopping the cluster tasks may revoke a lease (one call)

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


@dataclass(frozen=True)
class Placement:
    """Where this box listens, as published to the others."""

    address: str
    inference_port: int
    cluster_port: int


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


async def _without_request_context(work: Coroutine[Any, Any, None]) -> None:
    # Tasks started while serving a request (a join) inherit its logging context; they outlive the request, so
    # their lines must not carry its request_id. The task runs in its own copy of the context: clearing it here
    # touches nothing else.
    structlog.contextvars.clear_contextvars()
    await work


class ClusterNode:
    """Owns this box's etcd member and its place in the cluster."""

    def __init__(
        self,
        settings: Settings,
        placement: Callable[[str], Placement],
        local_facts: Callable[[], Mapping[str, Any]],
        dock: Callable[[], DockPipeline | None] = lambda: None,
        inference_app: Callable[[], web.Application] | None = None,
        loader: ModelLoader | None = None,
    ) -> None:
        self.settings = settings
        self.loader = loader
        self.replicas: ReplicaKeeper | None = None
        self._dock = dock
        self.dock_join = DockJoin(self._offering, self.join)
        self._inference_app = inference_app
        self._live = LiveNodes()
        self._client_ssl: tuple[Identity, ssl.SSLContext] | None = None
        self.router = Router(lambda: self.node_id, lambda: self.live_nodes, self.client_ssl)
        self.discovery = Discovery()
        self._advertise = False
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
        self._spawn: Spawn | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._docking: asyncio.Task[None] | None = None
        self._link = EtcdLink(self)
        self._peer: contextlib.AsyncExitStack | None = None
        self._join_lock = asyncio.Lock()
        self.admission: Admission | None = None
        self.custodian: CaCustodian | None = None
        self.peer_port = 0
        self.unavailable_reason: str | None = None
        self.views = ClusterViews(self.connected, lambda: self.node_id, lambda: self.cluster_id)
        self.remote = OciRegistry(settings.registry.url)  # models no box has come from it (a reload sets its url)
        self.models = StackModels(self.connected, settings.engine.kv_budget_tokens, self.remote)

    @property
    def cluster_id(self) -> str | None:
        return self.identity.cluster_id if self.identity else None

    @property
    def live_nodes(self) -> dict[str, dict[str, Any]]:
        """The live nodes' records as last seen (kept current by a watch; no etcd read)."""
        return self._live.records

    async def connected(self) -> Connected:
        """The running cluster layer, for the views and the stack's models; ClusterUnavailable while there is none
        (once a switch of etcd client in progress, a fraction of a second, is over)."""
        with contextlib.suppress(TimeoutError):
            await wait_for(self._link.settled.wait(), SWITCH_WAIT_SECONDS)
        if self.election is None or self.registry is None or self._client is None:
            reason = self.unavailable_reason or "the cluster layer is disabled (cluster.enabled = false)"
            raise ClusterUnavailable(f"cluster unavailable: {reason}")
        return Connected(self.election, self.registry, self._client)

    # ------------------------------------------------------------------ start / stop

    async def start(self, spawn: Spawn) -> None:
        """Found or rejoin this box's cluster, then campaign and publish; failures leave the box standalone."""
        self._spawn = spawn
        try:
            await self._start()
        except (EtcdError, PkiError, OSError) as exc:
            self.unavailable_reason = str(exc)
            log.error("cluster_unavailable", error=str(exc))
            await self.stop()

    async def _start(self) -> None:
        settings = self.settings
        self.node_id = await asyncio.to_thread(folder.node_id_of, settings)
        self.address = await asyncio.to_thread(advertise_address, settings)
        self._memory_gb = await asyncio.to_thread(_memory_gb)
        identity = await asyncio.to_thread(read_identity, self._tls_dir)
        founding = identity is None
        if identity is None:
            identity = await asyncio.to_thread(folder.found_cluster, settings, self.node_id, self.address)
            log.info("cluster_founded", cluster_id=identity.cluster_id, node=self.node_id)
        if not founding and await asyncio.to_thread(folder.is_client_only, settings.cluster_dir):
            self.identity, self.member = identity, None  # a box beyond the fourth: no etcd member of its own
            await self._run(identity, None, founded=False)
        elif founding:
            member = self.member_for(identity)
            await member.start_new(identity.cluster_id)
            await self._run(identity, member, founded=True)
        else:
            member = self.member_for(identity)
            try:
                await member.start_existing()
            except MemberRemoved:
                await self._found_anew(identity)
            else:
                await self._run(identity, member, founded=False)
        self._watch_dock()

    def _watch_dock(self) -> None:
        dock = self._dock()
        if dock is not None:
            # Docked onto another box: join its cluster with the offer its NFC presents. Undocked: present ours.
            self._docking = self._spawn_task(self.dock_join.run(dock.subscribe()), "cluster-dock-join")
            dock.present_own_offers(self.dock_join.own_offer)

    def _offering(self) -> Offering | None:
        if self.admission is None or self.peer_port == 0:
            return None
        return Offering(self.admission, self.node_id, host_port(self.address, self.peer_port))

    async def _found_anew(self, removed_from: Identity) -> None:
        """This box was removed from its cluster (gone longer than the stack waits for a box): carry on as a box of
        its own, the old cluster kept aside; docking it again or `thox cluster join` brings it back."""
        previous = await asyncio.to_thread(folder.retire, self.settings.cluster_dir)
        await asyncio.to_thread(forget_retired_key, previous)  # the stack that removed us keeps its key to itself
        log.warning(
            "cluster_member_removed",
            cluster_id=removed_from.cluster_id,
            node=self.node_id,
            kept_in=str(previous),
            action="founding a cluster of its own; join the stack again",
        )
        identity = await asyncio.to_thread(folder.found_cluster, self.settings, self.node_id, self.address)
        log.info("cluster_founded", cluster_id=identity.cluster_id, node=self.node_id)
        member = self.member_for(identity)
        await member.start_new(identity.cluster_id)
        await self._run(identity, member, founded=True)

    async def _removed_while_running(self) -> None:
        async with self._join_lock:
            identity = self.identity
            await self._leave()
            if identity is not None:
                try:
                    await self._found_anew(identity)
                except (EtcdError, PkiError, OSError) as exc:
                    self.unavailable_reason = str(exc)
                    log.error("cluster_unavailable", error=str(exc))

    @property
    def _tls_dir(self) -> Path:
        return folder.tls_dir(self.settings.cluster_dir)

    def member_for(self, identity: Identity) -> EtcdMember:
        self.identity = identity
        cluster = self.settings.cluster
        self.member = EtcdMember(
            EtcdConfig(
                name=self.node_id,
                data_dir=self.settings.cluster_dir / "etcd",
                peer_host=self.address,
                tls=PeerTls(identity.ca_path, identity.cert_path, identity.key_path),
                peer_port=cluster.etcd_peer_port,
                client_port=cluster.etcd_client_port,
                client_tls_port=cluster.etcd_client_tls_port,
            )
        )
        self.member.on_removed = self._on_member_removed
        return self.member

    def forget_member(self) -> None:
        self.member = None

    @property
    def etcd_client(self) -> aetcd.Client | None:
        """The client the cluster layer uses now (own member or a voter's port); None while not running."""
        return self._client

    def _on_member_removed(self) -> None:
        self._spawn_task(self._removed_while_running(), "cluster-refound")

    async def _run(self, identity: Identity, member: EtcdMember | None, *, founded: bool) -> None:
        """With etcd serving: the peer API, then campaign, publish our record, admit others, keep the voters."""
        self.dock_join.forget_offer()
        client = await self._link.pick(identity, member)
        if founded:
            record = {"cluster_id": identity.cluster_id, "founded_by": self.node_id, "founded": time.time()}
            await wait_for(client.put(CLUSTER_KEY, json.dumps(record).encode()), RPC_TIMEOUT_SECONDS)
        context = await asyncio.to_thread(
            server_context_from_pem, identity.ca_pem, identity.cert_pem, identity.key_pem, require_client_cert=False
        )
        self._peer = contextlib.AsyncExitStack()
        await self.router.close()  # its connections use the previous identity (before a join)
        self._client_ssl = (
            identity,
            await asyncio.to_thread(client_context_from_pem, identity.ca_pem, identity.cert_pem, identity.key_pem),
        )
        inference = self._inference_app() if self._inference_app is not None else None
        self.peer_port = await self._peer.enter_async_context(
            serve_peer_api(
                build_peer_app(
                    self, identity.ca_pem, inference, self.loader.store if self.loader else None, ca_keys=self
                ),
                self.settings.bind_host,
                self.settings.cluster.peer_port,
                context,
            )
        )
        self.start_tasks(identity, client)
        self._keeper = self._spawn_task(self._link.keep(identity, member), "cluster-etcd-client")
        if self._advertise:  # in the background: mDNS probing takes a second or two, a join should not wait for it
            self._spawn_task(self._start_discovery(identity), "cluster-mdns")
        log.info(
            "cluster_member_started",
            cluster_id=identity.cluster_id,
            node=self.node_id,
            address=self.address,
            peer_port=self.peer_port,
            via=getattr(client, "endpoint", "own member"),
        )

    async def advertise(self) -> None:
        """Start mDNS once the APIs listen (their ports are known then); a later join re-advertises."""
        self._advertise = self.settings.cluster.mdns
        if self._advertise and self.identity is not None and self.election is not None:
            await self._start_discovery(self.identity)

    async def _start_discovery(self, identity: Identity) -> None:
        try:
            await self.discovery.start(
                node_id=self.node_id,
                address=self.address,
                peer_port=self.peer_port,
                inference_port=self._placement(self.address).inference_port,
                cluster_id=identity.cluster_id,
                ca_hash=ca_fingerprint(identity.ca_pem).removeprefix("sha256:"),
            )
        except (OSError, ValueError, ZeroconfError) as exc:  # e.g. no multicast interface: works without mDNS
            log.warning("mdns_unavailable", error=f"{type(exc).__name__}: {exc}")

    def _spawn_task(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._spawn is not None  # set by start()
        return self._spawn(_without_request_context(work), name)

    def start_tasks(self, identity: Identity, client: aetcd.Client) -> None:
        self._client = client
        ttl = self.settings.cluster.lease_ttl_seconds
        election = self.election = LeaderElection(client, self.node_id, ttl)
        self.registry = NodeRegistry(client, self.node_id, self.settings.cluster.node_ttl_seconds)
        self.admission = Admission(
            client, lambda: self.identity or identity, lambda: self.node_id if election.is_leader else None
        )
        self.custodian = CaCustodian(
            self.node_id,
            client,
            lambda: self.identity or identity,
            self._adopt_identity,
            lambda: self.live_nodes,
            self._leader_hint,
            self.router.session,
        )
        self._tasks = [
            self._spawn_task(election.run(), "cluster-leader"),
            self._spawn_task(self.custodian.run(), "cluster-ca-key"),
            self._spawn_task(self.registry.run(self._record), "cluster-node-record"),
            self._spawn_task(
                keep_voters(election, self.registry, client, self.settings.cluster.remove_after_seconds),
                "cluster-voters",
            ),
            self._spawn_task(self._live.follow(client), "cluster-node-view"),
        ]
        if self.loader is not None:
            self.replicas = ReplicaKeeper(
                self.node_id,
                self.loader,
                lambda: self.live_nodes,
                self._leader_hint,
                self.router.session,
                self._spawn_task,
                self.remote,
            )
            self._tasks += [
                self._spawn_task(self.replicas.run(client), "cluster-replicas"),
                self._spawn_task(
                    self.models.place(client, lambda: self.election, lambda: self.live_nodes), "cluster-placement"
                ),
            ]

    def _leader_hint(self) -> str | None:
        """The leader as last known, without asking etcd (a source to prefer, not a decision)."""
        if self.election is not None and self.election.is_leader:
            return self.node_id
        return self.models.last_leader

    def client_ssl(self) -> ssl.SSLContext | None:
        """The TLS context this box reaches other boxes' peer APIs with (its cluster certificate)."""
        return self._client_ssl[1] if self._client_ssl is not None else None

    async def stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.election = self.registry = None
        self.admission = None
        self.custodian = None

    async def admit(self, request: JoinRequest) -> JoinGrant:
        """The peer API's join endpoint (JoinAuthority): admitted here if this box holds the CA key, else relayed to
        a box that does (the leader first)."""
        if self.admission is None or self.identity is None:
            raise JoinRefused("this box's cluster layer is not running", code="cluster_unavailable", status=503)
        if self.identity.ca_key_pem is not None:
            return await self.admission.admit(request)
        sources = holders(self.live_nodes, self._leader_hint(), self.node_id)
        if not sources:
            raise JoinRefused(
                "no box of this cluster that holds its CA key is live to admit the join; retry shortly",
                code="cluster_unavailable",
                status=503,
            )
        log.info("join_forwarded", node=request.node_id, to=sources[0])
        return await forward_join(self.router.session(), sources[0], request)

    async def ca_key_for(self, caller: str) -> bytes:
        """The peer API's CA key endpoint (CaKeySource)."""
        if self.custodian is None:
            raise CaKeyRefused("this box's cluster layer is not running", code="cluster_unavailable", status=503)
        return await self.custodian.key_for(caller)

    def _adopt_identity(self, identity: Identity) -> None:
        """The custodian received or dropped the CA key: the same identity, with or without it."""
        self.identity = identity

    async def _leave(self, *, withdraw_mdns: bool = True) -> None:
        """Stop taking part: tasks (revoking leases hands leadership over at once), peer API, etcd.

        A join keeps the mDNS advertisement (`withdraw_mdns=False`): the one for the new cluster replaces it in the
        background, and stopping it here would wait for a first registration still probing (up to 2 s).
        """
        if withdraw_mdns:
            await self.discovery.stop()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await self.stop_tasks()
        if isinstance(self._client, VoterEtcdClient):
            await self._client.close()
        self._client = None
        if self._peer is not None:
            peer, self._peer = self._peer, None
            await peer.aclose()
        if self.member is not None:
            await self.member.stop()

    async def stop(self) -> None:
        docking, self._docking = self._docking, None
        if docking is not None:
            docking.cancel()
            await asyncio.gather(docking, return_exceptions=True)
        await self._leave()
        await self.router.close()

    # ------------------------------------------------------------------ joining another cluster

    async def issue_token(self, ttl_seconds: float) -> dict[str, Any]:
        """A one-time join token for this cluster and where a joiner reaches us with it."""
        if self.admission is None:
            raise ClusterUnavailable(f"cluster unavailable: {self.unavailable_reason or 'not running'}")
        token, expires = await self.admission.issue_token(ttl_seconds)
        return {
            "token": str(token),
            "server": host_port(self.address, self.peer_port),
            "expires_at": int(expires),
            "cluster_id": self.cluster_id,
        }

    async def join(self, token_text: str, server: str | None = None) -> dict[str, Any]:
        """Leave this box's own (single-box) cluster and join the one the token names; refusals change nothing.

        Without `server`, a box of that cluster is looked for by mDNS (its advertised CA must match the token).
        """
        async with self._join_lock:
            token = JoinToken.parse(token_text)  # TokenError (token_malformed) for anything unreadable
            if server is None:
                peer = await self.discovery.find(token.ca_hash, DISCOVERY_WAIT_SECONDS)
                if peer is None:
                    raise JoinRefused(
                        "no box of that cluster was found on this network by mDNS within "
                        f"{DISCOVERY_WAIT_SECONDS:.0f} s; give its address with --server",
                        code="unreachable",
                        status=503,
                    )
                server = host_port(peer.address, peer.port)
            host, port = parse_server(server, self.settings.cluster.peer_port)
            if self.identity is not None and self.identity.ca_pem and pins(token, self.identity.ca_pem):
                raise JoinRefused(
                    f"this box is already a member of cluster {self.cluster_id}", code="already_member", status=409
                )
            others = [n for n in await self.views.nodes() if n["id"] != self.node_id]
            if others:
                raise JoinRefused(
                    f"this box is in cluster {self.cluster_id} with {len(others)} other box(es); "
                    "it can only join another cluster on its own",
                    code="already_in_cluster",
                    status=409,
                )
            key = await asyncio.to_thread(NodeKey.create)
            grant = await join_cluster(
                host,
                port,
                token,
                node_id=self.node_id,
                key_pem=key,
                address=self.address,
                etcd_peer_port=self.settings.cluster.etcd_peer_port,
            )
            await self._leave(withdraw_mdns=False)
            previous = await asyncio.to_thread(folder.retire, self.settings.cluster_dir)
            await asyncio.to_thread(folder.save_voter_urls, self.settings.cluster_dir, grant.client_urls)
            self._link.member_count = len(grant.members)
            await asyncio.to_thread(
                write_identity,
                self._tls_dir,
                grant.ca_cert_pem.encode(),
                grant.node_cert_pem.encode(),
                key,
                None if grant.ca_key_pem is None else grant.ca_key_pem.encode(),
            )
            identity = await asyncio.to_thread(read_identity, self._tls_dir)
            assert identity is not None  # just written
            member: EtcdMember | None = None
            if grant.role == "client":  # beyond the fourth box: no etcd member, the voters' client ports only
                await asyncio.to_thread(folder.set_client_only, self.settings.cluster_dir, True)
                self.identity, self.member = identity, None
            else:
                member = self.member_for(identity)
                await self._start_joining(member, grant, previous)
            await self._run(identity, member, founded=False)
            await asyncio.to_thread(forget_retired_key, previous)  # our own old cluster is gone for good now
            log.info(
                "cluster_joined", cluster_id=grant.cluster_id, node=self.node_id, role=grant.role, members=grant.members
            )
            return {
                "cluster_id": grant.cluster_id,
                "role": grant.role,
                "members": grant.members,
                "leader": grant.leader,
            }

    async def _start_joining(self, member: EtcdMember, grant: JoinGrant, previous: Path) -> None:
        """Start this box's member in the cluster it was admitted to; on failure put its own cluster back."""
        try:
            await member.start_joining(grant.initial_cluster)
        except EtcdError as exc:
            log.error("cluster_join_start_failed", cluster_id=grant.cluster_id, error=str(exc))
            await member.stop()
            await asyncio.to_thread(folder.restore, self.settings.cluster_dir, previous)
            restored = await asyncio.to_thread(read_identity, self._tls_dir)
            if restored is not None:
                old = self.member_for(restored)
                await old.start_existing()
                await self._run(restored, old, founded=False)
            raise JoinRefused(
                f"this box could not start as a member of {grant.cluster_id} and stays in its own "
                "cluster; see `thox logs --filter etcd`",
                code="cluster_unavailable",
                status=503,
            ) from None

    def _record(self) -> dict[str, Any]:
        place = self._placement(self.address)
        offered = self.settings.cluster.model_memory_gb or self._memory_gb
        return {
            "address": place.address,
            "inference_port": place.inference_port,
            "cluster_port": place.cluster_port,
            "peer_port": self.peer_port,
            "ram_gb": self._memory_gb,
            "model_memory_gb": offered,
            "version": agent.__version__,
            "updated": round(time.time(), 3),
            **self._local_facts(),
            "holds_ca_key": self.identity is not None and self.identity.ca_key_pem is not None,
            **({"store": self.loader.store_facts} if self.loader is not None else {}),
            **(self.replicas.report() if self.replicas is not None else {}),
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
