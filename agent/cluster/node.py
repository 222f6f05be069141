"""This box as a cluster member: its identity, its etcd member, its leader campaign and its published record.

On the first start a box founds its own single-box cluster (a new CA, its node certificate, a single-voter etcd);
later starts bring the same member back. The views (`topology()`, `summary()`, `nodes()`) are what the cluster API
serves; they read etcd linearizably, so a box cut off from the quorum answers "no quorum" rather than stale data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import socket
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
from agent.atomic import atomic_write_bytes
from agent.cluster import etcd_members
from agent.cluster.admission import (
    AbsenceClock,
    Admission,
    desired_voters,
    reconcile_voters,
    remove_departed,
    voter_client_urls,
)
from agent.cluster.ca_custody import CaCustodian, CaKeyRefused, forget_retired_key, holders
from agent.cluster.discovery import Discovery
from agent.cluster.etcd import EtcdMember, MemberRemoved
from agent.cluster.etcd_client import ClientTls, VoterEtcdClient
from agent.cluster.etcd_config import EtcdConfig, PeerTls
from agent.cluster.etcd_members import EtcdError, MemberInfo
from agent.cluster.join import JoinGrant, JoinRefused, JoinRequest
from agent.cluster.join import forward as forward_join
from agent.cluster.join import join as join_cluster
from agent.cluster.membership import NODES_PREFIX, RPC_TIMEOUT_SECONDS, LeaderElection, NodeRegistry
from agent.cluster.net import host_port
from agent.cluster.peer import build_peer_app, serve_peer_api
from agent.cluster.pki import (
    ClusterCA,
    Identity,
    NodeKey,
    PkiError,
    ca_fingerprint,
    client_context_from_pem,
    make_csr,
    read_identity,
    server_context_from_pem,
    write_identity,
)
from agent.cluster.placement import (
    PLACEMENT_PREFIX,
    ClusterPlacement,
    PlacementRefused,
    PlacementSpec,
    Placer,
    assignment_key,
    check_fits,
    pull_key,
    replica_state,
    view,
)
from agent.cluster.replicas import ReplicaKeeper
from agent.cluster.router import Router
from agent.cluster.tokens import JoinToken, TokenError, check_pin
from agent.errors import ThoxError
from agent.hardware.dock import DockPipeline, JoinOfferEvent
from agent.models.loader import ModelLoader
from agent.settings import Settings
from common.aio import wait_for
from drivers.base import JoinOffer

log = structlog.get_logger("agent.cluster")

CLUSTER_KEY = b"/thox/cluster"
NODE_ID_FILE = "node-id"
VOTER_CHECK_SECONDS = 2.0
# The token a box presents by NFC: long enough that presenting does not churn etcd, renewed before it lapses.
OFFER_TOKEN_TTL_SECONDS = 600.0
OFFER_RENEW_BEFORE_SECONDS = 60.0
PLACEMENT_CHECK_SECONDS = 1.0
CLIENT_CHECK_SECONDS = 1.0
# A learner of a two-box stack re-forms alone after its voter has been unreachable this long (a few lease TTLs:
# a voter that is merely slow or restarting comes back well within it).
REFORM_AFTER_SECONDS = 5.0
DISCOVERY_WAIT_SECONDS = 5.0
VOTERS_FILE = "voters.json"  # the voters' client URLs, for a learner that restarts
CLIENT_FILE = "client-only"  # present on a box beyond the fourth: it runs no etcd member of its own

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


class ClusterUnavailable(ThoxError):
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


def _split_server(server: str, default_port: int) -> tuple[str, int]:
    """ "host", "host:port" or "[v6]:port" -> (host, port); JoinRefused for anything else."""
    text = server.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        port = 0
    if not host or not 0 < port < 65536:
        raise JoinRefused(
            f"{server!r} is not a server address; use HOST or HOST:PORT (the peer port, default {default_port})",
            code="bad_request",
            status=400,
        )
    return host, port


def _pins(token: JoinToken, ca_pem: bytes) -> bool:
    try:
        check_pin(token, ca_pem)
    except TokenError:
        return False
    return True


def _record_of(raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


async def _without_request_context(work: Coroutine[Any, Any, None]) -> None:
    # Tasks started while serving a request (a join) inherit its logging context; they outlive the request, so
    # their lines must not carry its request_id. The task runs in its own copy of the context: clearing it here
    # touches nothing else.
    structlog.contextvars.clear_contextvars()
    await work


def _load_voter_urls(cluster_dir: Path) -> list[str]:
    try:
        urls = json.loads((cluster_dir / VOTERS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [url for url in urls if isinstance(url, str)] if isinstance(urls, list) else []


def _save_voter_urls(cluster_dir: Path, urls: list[str]) -> None:
    if urls and urls != _load_voter_urls(cluster_dir):
        atomic_write_bytes(cluster_dir / VOTERS_FILE, json.dumps(urls).encode())


def _retire(cluster_dir: Path) -> Path:
    """Blocking: move this box's own cluster (etcd data, certificates) aside before it joins another."""
    previous = cluster_dir / f"previous-{int(time.time())}"
    previous.mkdir(mode=0o700)
    for name in ("etcd", "tls", "etcd.pid", "etcd.log", VOTERS_FILE, CLIENT_FILE):
        if (cluster_dir / name).exists():
            (cluster_dir / name).rename(previous / name)
    return previous


def _restore(cluster_dir: Path, previous: Path) -> None:
    """Blocking: a join that failed after the switch puts the box's own cluster back."""
    for name in ("etcd", "tls", "etcd.pid", "etcd.log", VOTERS_FILE, CLIENT_FILE):
        if (cluster_dir / name).exists():
            shutil.rmtree(cluster_dir / name) if (cluster_dir / name).is_dir() else (cluster_dir / name).unlink()
        if (previous / name).exists():
            (previous / name).rename(cluster_dir / name)
    previous.rmdir()


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
        self._offered: tuple[str, float] | None = None  # the token this box presents by NFC, and its expiry
        self._inference_app = inference_app
        self.live_nodes: dict[str, dict[str, Any]] = {}  # node records, kept current by a watch
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
        self._member_count = 0  # as last seen; 0 = unknown (a box that restarted as a learner never re-forms)
        self._peer: contextlib.AsyncExitStack | None = None
        self._join_lock = asyncio.Lock()
        self.admission: Admission | None = None
        self.custodian: CaCustodian | None = None
        self.peer_port = 0
        self.unavailable_reason: str | None = None
        self._last_leader: str | None = None  # as last read by the placement loop (pull sources prefer it)

    @property
    def cluster_id(self) -> str | None:
        return self.identity.cluster_id if self.identity else None

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
        self.node_id = await asyncio.to_thread(_node_id, settings)
        self.address = await asyncio.to_thread(advertise_address, settings)
        self._memory_gb = await asyncio.to_thread(_memory_gb)
        identity = await asyncio.to_thread(read_identity, self._tls_dir)
        founding = identity is None
        if identity is None:
            identity = await asyncio.to_thread(found_cluster, settings, self.node_id, self.address)
            log.info("cluster_founded", cluster_id=identity.cluster_id, node=self.node_id)
        if not founding and await asyncio.to_thread((settings.cluster_dir / CLIENT_FILE).exists):
            self.identity, self.member = identity, None  # a box beyond the fourth: no etcd member of its own
            await self._run(identity, None, founded=False)
        elif founding:
            member = self._member_for(identity)
            await member.start_new(identity.cluster_id)
            await self._run(identity, member, founded=True)
        else:
            member = self._member_for(identity)
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
            self._docking = self._spawn_task(self._join_on_dock(dock.subscribe()), "cluster-dock-join")
            dock.present_own_offers(self.own_join_offer)

    async def own_join_offer(self, fresh: bool) -> JoinOffer | None:
        """The join offer this box presents on its NFC antenna: a one-time token, new once the last was read."""
        if self.admission is None or self.peer_port == 0:
            return None
        now = time.time()
        if fresh or self._offered is None or self._offered[1] - now < OFFER_RENEW_BEFORE_SECONDS:
            try:
                token, expires = await self.admission.issue_token(OFFER_TOKEN_TTL_SECONDS)
            except (aetcd.exceptions.ClientError, TimeoutError, JoinRefused) as exc:
                log.info("join_offer_unavailable", error=str(exc))
                return None
            self._offered = (str(token), expires)
        token_text, expires = self._offered
        return JoinOffer(
            node_id=self.node_id,
            endpoint=host_port(self.address, self.peer_port),
            token=token_text,
            expires_at=int(expires),
        )

    async def _found_anew(self, removed_from: Identity) -> None:
        """This box was removed from its cluster (gone longer than the stack waits for a box): carry on as a box of
        its own, the old cluster kept aside; docking it again or `thox cluster join` brings it back."""
        previous = await asyncio.to_thread(_retire, self.settings.cluster_dir)
        await asyncio.to_thread(forget_retired_key, previous)  # the stack that removed us keeps its key to itself
        log.warning(
            "cluster_member_removed",
            cluster_id=removed_from.cluster_id,
            node=self.node_id,
            kept_in=str(previous),
            action="founding a cluster of its own; join the stack again",
        )
        identity = await asyncio.to_thread(found_cluster, self.settings, self.node_id, self.address)
        log.info("cluster_founded", cluster_id=identity.cluster_id, node=self.node_id)
        member = self._member_for(identity)
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
        return self.settings.cluster_dir / "tls"

    def _member_for(self, identity: Identity) -> EtcdMember:
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

    def _on_member_removed(self) -> None:
        self._spawn_task(self._removed_while_running(), "cluster-refound")

    async def _run(self, identity: Identity, member: EtcdMember | None, *, founded: bool) -> None:
        """With etcd serving: the peer API, then campaign, publish our record, admit others, keep the voters."""
        self._offered = None  # a token of the cluster this box was in before is worth nothing now
        client = await self._pick_client(identity, member)
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
        self._start_tasks(identity, client)
        self._keeper = self._spawn_task(self._keep_client(identity, member), "cluster-etcd-client")
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

    def _start_tasks(self, identity: Identity, client: aetcd.Client) -> None:
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
            self._spawn_task(self._keep_voters(), "cluster-voters"),
            self._spawn_task(self._follow_nodes(client), "cluster-node-view"),
        ]
        if self.loader is not None:
            self.replicas = ReplicaKeeper(
                self.node_id,
                self.loader,
                lambda: self.live_nodes,
                self._leader_hint,
                self.router.session,
                self._spawn_task,
            )
            self._tasks += [
                self._spawn_task(self.replicas.run(client), "cluster-replicas"),
                self._spawn_task(self._place_models(client), "cluster-placement"),
            ]

    def _leader_hint(self) -> str | None:
        """The leader as last known, without asking etcd (a source to prefer, not a decision)."""
        if self.election is not None and self.election.is_leader:
            return self.node_id
        return self._last_leader

    def client_ssl(self) -> ssl.SSLContext | None:
        """The TLS context this box reaches other boxes' peer APIs with (its cluster certificate)."""
        return self._client_ssl[1] if self._client_ssl is not None else None

    async def _follow_nodes(self, client: aetcd.Client) -> None:
        """Keep `live_nodes` equal to the live records: a snapshot, then every change from a watch."""
        while True:
            try:
                snapshot = await wait_for(client.get_prefix(NODES_PREFIX), RPC_TIMEOUT_SECONDS)
                self.live_nodes = {kv.key[len(NODES_PREFIX) :].decode(): _record_of(kv.value) for kv in snapshot}
                watch = await wait_for(
                    client.watch_prefix(NODES_PREFIX, start_revision=snapshot.header.revision + 1), RPC_TIMEOUT_SECONDS
                )
                try:
                    async for event in watch:
                        node_id = event.kv.key[len(NODES_PREFIX) :].decode()
                        if event.kind == "DELETE":
                            self.live_nodes.pop(node_id, None)
                        else:
                            self.live_nodes[node_id] = _record_of(event.kv.value)
                finally:
                    await watch.cancel()
            except (aetcd.exceptions.ClientError, TimeoutError) as exc:
                # Unknown is not alive: route nowhere rather than to a node that may have gone meanwhile.
                self.live_nodes = {}
                log.info("node_view_lost", error=str(exc))
                await asyncio.sleep(0.5)

    async def _stop_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.election = self.registry = None
        self.admission = None
        self.custodian = None

    async def _pick_client(self, identity: Identity, member: EtcdMember | None) -> aetcd.Client:
        """Our own member if it is a voter; a voter's client port over mutual TLS while ours is a learner, or for
        good on a box that runs no member (beyond the fourth)."""
        if member is not None:
            local = await member.client()
            if not (await etcd_members.status(local, timeout=RPC_TIMEOUT_SECONDS)).is_learner:
                return local
        urls = await asyncio.to_thread(_load_voter_urls, self.settings.cluster_dir)
        if not urls:
            raise EtcdError("this box reaches the cluster through a voter and no voter's client URL is known")
        return VoterEtcdClient(
            urls, ClientTls(identity.ca_pem, identity.cert_pem, identity.key_pem), timeout=EtcdConfig.request_timeout_s
        )

    async def _keep_client(self, identity: Identity, member: EtcdMember | None) -> None:
        """While using a voter's port: follow membership, move to another voter when it stops answering, go back
        to our own member once promoted, and, in a two-box stack whose voter is gone, re-form alone."""
        failures, unreachable_since = 0, None
        while True:
            await asyncio.sleep(CLIENT_CHECK_SECONDS)
            client = self._client
            if not isinstance(client, VoterEtcdClient):
                continue
            try:
                if member is not None:
                    own = await etcd_members.status(await member.client(), timeout=RPC_TIMEOUT_SECONDS)
                    if not own.is_learner:
                        log.info("etcd_client_switched", node=self.node_id, to="own member (promoted to voter)")
                        await self._switch_to_own_member(identity, member, client)
                        continue
                current = await wait_for(etcd_members.members(client), RPC_TIMEOUT_SECONDS)
                failures, unreachable_since = 0, None
                self._member_count = len(current)
                urls = voter_client_urls(current)
                await client.use_endpoints(urls)
                await asyncio.to_thread(_save_voter_urls, self.settings.cluster_dir, urls)
                if member is None and self._first_client_without_standby(current):
                    member = await self._become_member(identity, client)
            except (aetcd.exceptions.ClientError, EtcdError, TimeoutError) as exc:
                failures += 1
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if member is not None and self._member_count == 2 and now - unreachable_since >= REFORM_AFTER_SECONDS:
                    await self._reform_alone(identity, member, client)
                    continue
                if failures >= 2 and len(client.endpoints) > 1:
                    log.info("etcd_client_unanswered", endpoint=client.endpoint, error=str(exc))
                    await client.rotate()
                    failures = 0

    def _first_client_without_standby(self, members: list[MemberInfo]) -> bool:
        """A client box should become the standby member: the stack has none, and this is the live client with
        the lowest id (the others wait their turn, so they do not race for etcd's one learner place)."""
        if any(m.is_learner or not m.name for m in members):
            return False
        named = {m.name for m in members}
        clients = sorted(node_id for node_id in self.live_nodes if node_id not in named)
        return bool(clients) and clients[0] == self.node_id

    async def _become_member(self, identity: Identity, client: VoterEtcdClient) -> EtcdMember | None:
        """Turn this client box into the stack's standby (a learner the leader promotes when a vote is free)."""
        peer_url = f"https://{host_port(self.address, self.settings.cluster.etcd_peer_port)}"
        try:
            member_id, initial_cluster = await etcd_members.add_learner(client, self.node_id, peer_url)
        except EtcdError as exc:
            log.info("standby_not_added", node=self.node_id, error=str(exc))
            return None
        member = self._member_for(identity)
        try:
            await member.start_joining(initial_cluster)
        except EtcdError as exc:
            log.error("standby_start_failed", node=self.node_id, error=str(exc))
            await member.stop()
            self.member = None
            with contextlib.suppress(aetcd.exceptions.ClientError, EtcdError, TimeoutError):
                await wait_for(etcd_members.remove(client, member_id), RPC_TIMEOUT_SECONDS)
            await asyncio.to_thread(shutil.rmtree, self.settings.cluster_dir / "etcd", True)
            return None
        await asyncio.to_thread((self.settings.cluster_dir / CLIENT_FILE).unlink, True)
        log.info("client_became_member", node=self.node_id, role="learner")
        return member

    async def _switch_to_own_member(self, identity: Identity, member: EtcdMember, client: VoterEtcdClient) -> None:
        await self._stop_tasks()
        await client.close()
        self._start_tasks(identity, await member.client())

    async def _reform_alone(self, identity: Identity, member: EtcdMember, client: VoterEtcdClient) -> None:
        """The voter of a two-box stack is gone: carry on as a one-box cluster from this box's copy of the state.

        Topology and placement are soft state, so a copy that may miss the last writes is acceptable; the
        alternative is a box that serves no cluster at all until an operator steps in.
        """
        log.warning(
            "cluster_voter_lost",
            node=self.node_id,
            unreachable_s=REFORM_AFTER_SECONDS,
            action="re-forming a single-box cluster from this box's copy",
        )
        await self._stop_tasks()
        await client.close()
        await member.force_new_cluster(cluster_id=identity.cluster_id)
        self._member_count = 1
        self._start_tasks(identity, await member.client())
        log.info("cluster_reformed", node=self.node_id, cluster_id=identity.cluster_id)

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

    async def _place_models(self, client: aetcd.Client) -> None:
        """Every second: learn the leader; on the leader, make the assignments match the requests and live boxes."""
        placer = Placer(client, self.settings.engine.kv_budget_tokens)
        while True:
            await asyncio.sleep(PLACEMENT_CHECK_SECONDS)
            election = self.election
            if election is None:
                continue
            self._last_leader = await election.current_leader()
            if not election.is_leader:
                continue
            try:
                await placer.reconcile(dict(self.live_nodes))
            except (aetcd.exceptions.ClientError, TimeoutError) as exc:
                log.info("placement_check_failed", error=str(exc))

    async def _keep_voters(self) -> None:
        absence = AbsenceClock()
        while True:
            await asyncio.sleep(VOTER_CHECK_SECONDS)
            if self.election is None or self.registry is None or self._client is None or not self.election.is_leader:
                absence = AbsenceClock()  # absences count from when this box leads, never from an older term
                continue
            try:
                live = set(await self.registry.nodes())
                await remove_departed(self._client, live, absence, self.settings.cluster.remove_after_seconds)
                await reconcile_voters(self._client, live)
            except (aetcd.exceptions.ClientError, EtcdError, TimeoutError) as exc:
                log.info("voter_check_failed", error=str(exc))

    async def _join_on_dock(self, offers: asyncio.Queue[JoinOfferEvent]) -> None:
        """Join the cluster of the box this one was docked onto, when its NFC offer carries a token."""
        while True:
            event = await offers.get()
            offer = event.offer
            if not offer.token:
                continue  # the module only announced itself
            try:
                joined = await self.join(offer.token, offer.endpoint)
            except (JoinRefused, TokenError, ClusterUnavailable, EtcdError) as exc:
                code = getattr(exc, "code", type(exc).__name__)
                level = log.info if code == "already_member" else log.warning
                level("dock_join_refused", offer_node=offer.node_id, code=code, error=str(exc))
                continue
            log.info(
                "dock_joined",
                cluster_id=joined["cluster_id"],
                offer_node=offer.node_id,
                dock_to_member_ms=round((asyncio.get_running_loop().time() - event.docked_at) * 1000),
            )

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
        await self._stop_tasks()
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
            host, port = _split_server(server, self.settings.cluster.peer_port)
            if self.identity is not None and self.identity.ca_pem and _pins(token, self.identity.ca_pem):
                raise JoinRefused(
                    f"this box is already a member of cluster {self.cluster_id}", code="already_member", status=409
                )
            others = [n for n in await self.nodes() if n["id"] != self.node_id]
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
            previous = await asyncio.to_thread(_retire, self.settings.cluster_dir)
            await asyncio.to_thread(_save_voter_urls, self.settings.cluster_dir, grant.client_urls)
            self._member_count = len(grant.members)
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
                await asyncio.to_thread(atomic_write_bytes, self.settings.cluster_dir / CLIENT_FILE, b"")
                self.identity, self.member = identity, None
            else:
                member = self._member_for(identity)
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
            await asyncio.to_thread(_restore, self.settings.cluster_dir, previous)
            restored = await asyncio.to_thread(read_identity, self._tls_dir)
            if restored is not None:
                old = self._member_for(restored)
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

    async def topology(self) -> dict[str, Any]:
        election = self._require()[0]
        nodes = await self.nodes()
        return {
            "cluster_id": self.cluster_id,
            "node_count": sum(n["alive"] for n in nodes),
            "leader": await election.current_leader(),
            "nodes": nodes,
        }

    async def summary(self) -> dict[str, Any]:
        """GET /v1/cluster: health of the whole stack and its pooled resources."""
        election = self._require()[0]
        try:
            nodes = await self.nodes()
        except ClusterUnavailable:
            return {"status": "no_quorum", "cluster_id": self.cluster_id, "node_id": self.node_id}
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
            "cluster_id": self.cluster_id,
            "leader": leader,
            "node_count": len(alive),
            "member_count": len(nodes),
            "voters": {"alive": sum(n["alive"] for n in voters), "expected": expected},
            "total_ram_gb": round(sum(float(n.get("ram_gb") or 0) for n in alive), 1),
            "total_tops": sum(t for t in tops if isinstance(t, (int, float))) if any(tops) else None,
            "active_model": models[0] if len(models) == 1 else (models or None),
        }

    # ------------------------------------------------------------------ model placement

    async def _live_view(self) -> dict[str, dict[str, Any]]:
        registry = self._require()[1]
        try:
            return await registry.nodes()
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise ClusterUnavailable(f"cluster state cannot be read (no quorum reachable?): {exc}") from exc

    async def load_model(self, spec: PlacementSpec) -> dict[str, Any]:
        """Ask for `spec` (replaces an earlier request for the model; failed replicas are tried again)."""
        client = self._require()[2]
        nodes = await self._live_view()
        unknown = sorted(set(spec.nodes) - set(nodes))
        if unknown:
            raise PlacementRefused(
                f"not live boxes of this cluster: {', '.join(unknown)}", code="node_not_found", status=404
            )
        if spec.nodes and spec.replicas > len(spec.nodes):
            raise PlacementRefused(
                f"{spec.replicas} replicas cannot fit on the {len(spec.nodes)} box(es) named", code="invalid_value"
            )
        if spec.replicas > len(nodes):
            raise PlacementRefused(
                f"{spec.replicas} replicas need as many boxes; {len(nodes)} are live (one replica per box)",
                code="invalid_value",
            )
        check_fits(nodes, spec.model, self.settings.engine.kv_budget_tokens)
        try:
            current = await ClusterPlacement.read(client)
            for node_id in current.assignments.get(spec.model, {}):  # asking again retries failed replicas
                if replica_state(nodes, node_id, spec.model).get("state") == "failed":
                    await wait_for(client.delete(assignment_key(node_id, spec.model)), RPC_TIMEOUT_SECONDS)
            await wait_for(client.put(PLACEMENT_PREFIX + spec.model.encode(), spec.to_json()), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise ClusterUnavailable(f"the placement could not be written (no quorum reachable?): {exc}") from exc
        log.info("model_placement_requested", model=spec.model, replicas=spec.replicas, nodes=list(spec.nodes))
        return await self.model_placement(spec.model)

    async def unload_model(self, model: str) -> dict[str, Any]:
        """Withdraw the request for `model`: the leader unassigns it and its boxes unload it."""
        client = self._require()[2]
        try:
            deleted = await wait_for(client.delete(PLACEMENT_PREFIX + model.encode()), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise ClusterUnavailable(f"the placement could not be removed (no quorum reachable?): {exc}") from exc
        if not deleted:
            raise PlacementRefused(
                f"{model!r} is not placed in this cluster (a box's default model stays loaded there)",
                code="model_not_placed",
                status=404,
            )
        log.info("model_unload_requested", model=model)
        return {"model": model, "status": "unloading"}

    async def model_placement(self, model: str | None = None) -> dict[str, Any]:
        """Placement requests with each replica's state (all models, or one)."""
        client = self._require()[2]
        nodes = await self._live_view()
        try:
            current = await ClusterPlacement.read(client)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise ClusterUnavailable(f"cluster state cannot be read (no quorum reachable?): {exc}") from exc
        if model is not None:
            spec = current.specs.get(model)
            if spec is None:
                raise PlacementRefused(f"{model!r} is not placed in this cluster", code="model_not_placed", status=404)
            return view(spec, current.assignments, nodes, self.settings.engine.kv_budget_tokens)
        return {
            "object": "list",
            "data": [
                view(spec, current.assignments, nodes, self.settings.engine.kv_budget_tokens)
                for spec in sorted(current.specs.values(), key=lambda s: s.model)
            ],
        }

    async def request_pull(self, model: str, targets: list[str] | None) -> list[str]:
        """Ask boxes (named, else every live box without it) to copy `model` into their stores; returns them."""
        client = self._require()[2]
        nodes = await self._live_view()
        if not any(model in (n.get("store") or {}) for n in nodes.values()):
            raise PlacementRefused(
                f"no box of this cluster has {model!r} in its model store", code="model_not_found", status=404
            )
        unknown = sorted(set(targets or ()) - set(nodes))
        if unknown:
            raise PlacementRefused(
                f"not live boxes of this cluster: {', '.join(unknown)}", code="node_not_found", status=404
            )
        lacking = [node_id for node_id, record in nodes.items() if model not in (record.get("store") or {})]
        chosen = sorted(targets or lacking)
        try:
            for node_id in chosen:
                await wait_for(
                    client.put(pull_key(node_id, model), json.dumps({"at": time.time()}).encode()), RPC_TIMEOUT_SECONDS
                )
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            raise ClusterUnavailable(f"the pull could not be requested (no quorum reachable?): {exc}") from exc
        log.info("model_pull_requested", model=model, nodes=chosen)
        return chosen


@asynccontextmanager
async def cluster_subsystem(node: ClusterNode, spawn: Spawn) -> AsyncIterator[None]:
    """The supervisor's view: start the member, and stop etcd after the tasks using it are cancelled."""
    await node.start(spawn)
    try:
        yield
    finally:
        await node.stop()
        log.info("cluster_member_stopped", node=node.node_id)
