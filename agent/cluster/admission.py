"""The server side of joining: join tokens kept in etcd, admitting a box, and keeping the voter count right.

A token's record (`/thox/tokens/<id>`: the secret's hash, expiry, used) is consumed by a compare-and-swap, so
two boxes racing with one token cannot both get in; a join that fails after that hands the token back. Members
join as learners (non-voting) and the leader promotes them to reach the voter count of docs/cluster.md: one voter
for one or two boxes, three from three boxes on. etcd allows one learner at a time, so a learner is promoted
before the next box may join when the stack grows to three.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aetcd
import structlog

from agent.cluster import etcd_members
from agent.cluster.etcd_members import EtcdError
from agent.cluster.join import JoinGrant, JoinRefused, JoinRequest, Role
from agent.cluster.membership import NODES_PREFIX, RPC_TIMEOUT_SECONDS, LeaderElection, NodeRegistry
from agent.cluster.net import host_port
from agent.cluster.pki import ClusterCA, Identity, PkiError, ca_fingerprint
from agent.cluster.tokens import DEFAULT_TOKEN_TTL_SECONDS, JoinToken, TokenError, TokenRecord, TokenRecordError
from agent.cluster.tokens import check as check_token
from common.aio import wait_for

log = structlog.get_logger("agent.cluster.admission")

TOKENS_PREFIX = b"/thox/tokens/"
MAX_VOTERS = 3
PRUNE_AFTER_SECONDS = 3600.0
VOTER_CHECK_SECONDS = 2.0


def desired_voters(member_count: int) -> int:
    """One voter for one or two boxes (a pair cannot keep a quorum through losing either), else three."""
    return 1 if member_count <= 2 else min(MAX_VOTERS, member_count)


class Admission:
    """Issues tokens (any box) and admits boxes into this node's cluster (a box holding the CA key)."""

    def __init__(
        self,
        client: aetcd.Client,
        identity: Callable[[], Identity],
        leader: Callable[[], str | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._identity = identity
        self._leader = leader
        self._clock = clock
        self._lock = asyncio.Lock()  # one admission at a time from this node: member changes are sequential

    async def issue_token(self, ttl_seconds: float = DEFAULT_TOKEN_TTL_SECONDS) -> tuple[JoinToken, float]:
        """A new one-time token pinning our CA; returns it and its expiry (unix seconds)."""
        token = JoinToken.generate(ca_fingerprint(self._identity().ca_pem))
        await self._prune()
        record = TokenRecord.for_token(token, ttl_seconds, self._clock())
        await wait_for(
            self._client.put(TOKENS_PREFIX + token.token_id.encode(), record.to_json().encode()), RPC_TIMEOUT_SECONDS
        )
        log.info("join_token_issued", token_id=token.token_id, expires=record.expires)
        return token, record.expires

    async def _prune(self) -> None:
        """Forget token records that expired a while ago (a box presenting offers by NFC makes one every few
        minutes); kept for PRUNE_AFTER_SECONDS first, so a late joiner still hears "expired", not "unknown"."""
        horizon = self._clock() - PRUNE_AFTER_SECONDS
        for kv in await wait_for(self._client.get_prefix(TOKENS_PREFIX), RPC_TIMEOUT_SECONDS):
            try:
                expired = TokenRecord.from_json(kv.value).expires < horizon
            except TokenRecordError:
                expired = True
            if expired:
                await wait_for(self._client.delete(kv.key), RPC_TIMEOUT_SECONDS)

    def _identity_ca(self) -> ClusterCA:
        ca = self._identity().ca()
        if ca is None:
            raise JoinRefused(
                "this box does not hold the cluster CA key and cannot admit boxes; ask a voter",
                code="cluster_unavailable",
                status=503,
            )
        return ca

    async def admit(self, request: JoinRequest) -> JoinGrant:
        """Check and consume the token, sign the box's certificate, add it to etcd as a learner."""
        async with self._lock:
            ca = self._identity_ca()
            key = TOKENS_PREFIX + request.token_id.encode()
            record, revision = await self._token_record(key)
            token = JoinToken(ca.fingerprint.removeprefix("sha256:"), request.token_id, request.secret)
            try:
                check_token(record, token, self._clock())
            except TokenError as exc:
                raise JoinRefused(exc.message, code=exc.code, status=403) from exc
            assert record is not None  # check() refuses a missing record
            await self._consume(key, record, revision)
            try:
                return await self._add(ca, request)
            except BaseException:
                # Nothing joined: the token is the box's to use again (a cancelled admission included).
                await asyncio.shield(self._restore(key, record))
                raise

    async def _token_record(self, key: bytes) -> tuple[TokenRecord | None, int]:
        got = await wait_for(self._client.get(key), RPC_TIMEOUT_SECONDS)
        if got is None:
            return None, 0
        try:
            return TokenRecord.from_json(got.value), int(got.mod_revision)
        except TokenRecordError as exc:
            log.error("join_token_record_damaged", key=key.decode(), error=str(exc))
            raise JoinRefused(
                "the cluster's record of this token is damaged; make a new token", code="token_unknown", status=403
            ) from exc

    async def _consume(self, key: bytes, record: TokenRecord, revision: int) -> None:
        tx = self._client.transactions
        won, _ = await wait_for(
            self._client.transaction(
                compare=[tx.mod(key) == revision],
                success=[tx.put(key, record.mark_used().to_json().encode())],
                failure=[],
            ),
            RPC_TIMEOUT_SECONDS,
        )
        if not won:
            raise JoinRefused(
                "this join token has already been used; make a new one with `thox cluster token`",
                code="token_used",
                status=403,
            )

    async def _restore(self, key: bytes, record: TokenRecord) -> None:
        try:
            await wait_for(self._client.put(key, record.to_json().encode()), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            log.error("join_token_restore_failed", key=key.decode(), error=str(exc))

    async def _add(self, ca: ClusterCA, request: JoinRequest) -> JoinGrant:
        members = await etcd_members.members(self._client)
        if any(member.name == request.node_id for member in members):
            raise JoinRefused(
                f"a box named {request.node_id} is already a member of this cluster", code="already_member", status=409
            )
        if await wait_for(self._client.get(NODES_PREFIX + request.node_id.encode()), RPC_TIMEOUT_SECONDS):
            raise JoinRefused(
                f"a box named {request.node_id} is already live in this cluster", code="already_member", status=409
            )
        try:
            cert = await asyncio.to_thread(
                ca.issue, request.csr_pem.encode(), request.node_id, sorted({request.address}), [request.node_id]
            )
        except PkiError as exc:
            raise JoinRefused(f"the certificate request was refused: {exc}", code="bad_request", status=400) from exc
        learners = [member for member in members if member.is_learner]
        if learners and len(members) - len(learners) >= MAX_VOTERS:
            # etcd 3.4 takes one learner at a time and this stack has its three voters and its standby: boxes
            # beyond the fourth run no etcd member and reach the cluster through the voters' client ports.
            log.info("join_admitted", node=request.node_id, address=request.address, role="client")
            return self._grant(ca, request, cert, "client", "", members, voter_client_urls(members))
        if learners and desired_voters(len(members) + 1) > len(members) - len(learners):
            # etcd allows one learner at a time: the waiting one becomes a voter before the next box comes in.
            await etcd_members.promote(self._client, learners[0].id)
        peer_url = f"https://{host_port(request.address, request.etcd_peer_port)}"
        try:
            _, initial_cluster = await etcd_members.add_learner(self._client, request.node_id, peer_url)
        except EtcdError as exc:
            raise JoinRefused(
                f"the cluster cannot take a member now: {exc}", code="cluster_unavailable", status=503
            ) from exc
        log.info("join_admitted", node=request.node_id, address=request.address, role="learner")
        # The joiner of a one-box stack becomes the standby of a two-box stack, which holds the CA key: it takes
        # the key with it at once, for if the voter went before the custodian's first round, the box that
        # re-forms alone could admit no one.
        return self._grant(
            ca,
            request,
            cert,
            "learner",
            initial_cluster,
            members,
            voter_client_urls(await etcd_members.members(self._client)),
            with_key=len(members) == 1,
        )

    def _grant(
        self,
        ca: ClusterCA,
        request: JoinRequest,
        cert: bytes,
        role: Role,
        initial_cluster: str,
        members: list[etcd_members.MemberInfo],
        client_urls: list[str],
        *,
        with_key: bool = False,
    ) -> JoinGrant:
        return JoinGrant(
            cluster_id=self._identity().cluster_id,
            node_cert_pem=cert.decode(),
            ca_cert_pem=ca.cert_pem.decode(),
            ca_key_pem=ca.key_pem.decode() if with_key else None,
            initial_cluster=initial_cluster,
            role=role,
            leader=self._leader(),
            members=sorted([*(m.name for m in members if m.name), request.node_id]),
            client_urls=client_urls,
        )


def voter_client_urls(members: list[etcd_members.MemberInfo]) -> list[str]:
    """The mutual-TLS client URLs of the voters, for boxes whose own member cannot serve them."""
    return sorted(url for m in members if not m.is_learner for url in m.client_urls if url.startswith("https://"))


class AbsenceClock:
    """On the leader: since when each member has had no live record (a box gone, or a learner never started)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: dict[int, float] = {}

    def gone_for(self, members: list[etcd_members.MemberInfo], live_nodes: set[str]) -> dict[int, float]:
        now = self._clock()
        absent = {m.id for m in members if m.name not in live_nodes}
        self._since = {member_id: self._since.get(member_id, now) for member_id in absent}
        return {member_id: now - since for member_id, since in self._since.items()}


async def remove_departed(
    client: aetcd.Client, live_nodes: set[str], absence: AbsenceClock, remove_after: float
) -> list[str]:
    """On the leader: remove members gone longer than `remove_after`, never the last voter; returns their names.

    A member that is gone for good otherwise keeps its vote (a 3-voter stack that lost one stays one failure away
    from no quorum, with a learner standing by that cannot be promoted) and blocks the next admission.
    """
    members = await etcd_members.members(client)
    gone = absence.gone_for(members, live_nodes)
    removed = []
    for member in members:
        if gone.get(member.id, 0.0) < remove_after:
            continue
        voters_left = sum(not m.is_learner for m in members if m.name not in removed and m.id != member.id)
        if not member.is_learner and voters_left == 0:
            continue
        await etcd_members.remove(client, member.id)
        removed.append(member.name or f"{member.id:x}")
        log.warning(
            "member_removed",
            node=member.name or None,
            member_id=f"{member.id:x}",
            role="learner" if member.is_learner else "voter",
            gone_s=round(gone[member.id], 1),
        )
    return removed


async def reconcile_voters(client: aetcd.Client, live_nodes: set[str]) -> None:
    """On the leader: promote live learners until the stack has its voter count (never demotes a voter)."""
    members = await etcd_members.members(client)
    voters = [m for m in members if not m.is_learner]
    learners = sorted((m for m in members if m.is_learner and m.name in live_nodes), key=lambda m: m.name)
    if learners and len(voters) < desired_voters(len(members)):
        await etcd_members.promote(client, learners[0].id)
        log.info("member_promoted", node=learners[0].name, voters=len(voters) + 1)


async def keep_voters(
    election: LeaderElection,
    registry: NodeRegistry,
    client: aetcd.Client,
    remove_after: float,
    every: float = VOTER_CHECK_SECONDS,
) -> None:
    """While this box leads, every `every` seconds: remove departed members, then promote learners as needed."""
    absence = AbsenceClock()
    while True:
        await asyncio.sleep(every)
        if not election.is_leader:
            absence = AbsenceClock()  # absences count from when this box leads, never from an older term
            continue
        try:
            live = set(await registry.nodes())
            await remove_departed(client, live, absence, remove_after)
            await reconcile_voters(client, live)
        except (aetcd.exceptions.ClientError, EtcdError, TimeoutError) as exc:
            log.info("voter_check_failed", error=str(exc))
