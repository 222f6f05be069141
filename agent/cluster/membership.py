"""Leader lease and node liveness on etcd: who leads, who is alive, and never a stale claim of either.

The leader is whoever holds `/thox/leader`, written only if absent and bound to the holder's lease; etcd deletes
the key when the lease expires, and the others, watching it, campaign at once. A holder claims leadership only
until its last acknowledged keepalive (timed from when the keepalive was *sent*) plus the TTL minus a margin, so a
holder cut off from the quorum stops claiming before etcd can have handed the key to someone else. Others learn
the leader from a linearizable read, which a member in a minority partition cannot answer.

Every agent also publishes `/thox/nodes/<id>` (its record: address, ports, RAM, load, ...) under its own lease, so a
node killed or unplugged disappears within the TTL.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aetcd
import structlog

from agent.errors import ThoxError
from common.aio import Interrupted, wait_for

log = structlog.get_logger("agent.cluster.membership")

LEADER_KEY = b"/thox/leader"
NODES_PREFIX = b"/thox/nodes/"
# etcd's lease TTLs are whole seconds and at least 1.5 election timeouts (750 ms with our 500 ms election timeout,
# rounded up to 1 s). A box killed together with the raft leader is replaced after an election (0.5-1 s) plus the
# TTL, because etcd extends every lease on a leader change: 1 s keeps that within 3 s.
DEFAULT_TTL_SECONDS = 1
# A keepalive answered later than this is no proof of anything: stop claiming before the lease can have expired.
CLAIM_MARGIN_SECONDS = 0.3
RPC_TIMEOUT_SECONDS = 1.0


class LeaseLost(ThoxError):
    """The lease is gone (expired or revoked) or could not be renewed in time."""


class KeptLease:
    """A lease kept alive by a task; `valid_until` is how long it is certainly still alive (monotonic clock)."""

    def __init__(
        self, client: aetcd.Client, ttl: int = DEFAULT_TTL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        self.ttl = ttl
        self._clock = clock
        self.lease: Any = None
        self.valid_until = 0.0

    @property
    def current(self) -> bool:
        return self.lease is not None and self._clock() < self.valid_until

    async def grant(self) -> Any:
        sent = self._clock()
        self.lease = await wait_for(self._client.lease(self.ttl), RPC_TIMEOUT_SECONDS)
        self.valid_until = sent + self.ttl - CLAIM_MARGIN_SECONDS
        return self.lease

    async def keep_alive(self) -> None:
        """Renew every third of the TTL until the lease is lost; raises LeaseLost then."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            sent = self._clock()
            try:
                reply = await wait_for(self._client.refresh_lease(self.lease.id), RPC_TIMEOUT_SECONDS)
            except (aetcd.exceptions.ClientError, TimeoutError) as exc:
                if not self.current:
                    raise LeaseLost(f"keepalive unanswered until the lease may have expired: {exc}") from exc
                continue  # one missed keepalive is not yet a lost lease: the next one may get through
            if reply is None or reply.TTL <= 0:
                raise LeaseLost("etcd says the lease has expired")
            self.valid_until = sent + reply.TTL - CLAIM_MARGIN_SECONDS

    async def revoke(self) -> None:
        """Best effort: a revoked lease frees its keys at once instead of after the TTL."""
        lease, self.lease, self.valid_until = self.lease, None, 0.0
        if lease is None:
            return
        try:
            await wait_for(self._client.revoke_lease(lease.id), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, TimeoutError) as exc:
            log.info("lease_revoke_failed", error=str(exc))


class LeaderElection:
    """Campaigns for `/thox/leader` and holds it while the lease lives; `run()` until cancelled."""

    def __init__(
        self,
        client: aetcd.Client,
        node_id: str,
        ttl: int = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.node_id = node_id
        self._lease = KeptLease(client, ttl, clock)
        self._holding = False
        self.terms_won = 0

    @property
    def is_leader(self) -> bool:
        """True only while this node holds the key under a lease known to be alive."""
        return self._holding and self._lease.current

    async def current_leader(self) -> str | None:
        """The leader's node id, or None when it cannot be known now (no leader, or no quorum reachable).

        Interrupted (the client was retired under the read) is raised, not taken for "no leader"."""
        if self.is_leader:
            return self.node_id
        try:
            got = await wait_for(self._client.get(LEADER_KEY), RPC_TIMEOUT_SECONDS)  # linearizable by default
        except Interrupted:
            raise
        except (aetcd.exceptions.ClientError, TimeoutError):
            return None
        return got.value.decode() if got is not None else None

    async def run(self) -> None:
        try:
            while True:
                try:
                    revision = await self._campaign()
                    if self._holding:
                        await self._lease.keep_alive()
                    elif revision:
                        await self._wait_for_vacancy(revision)
                except LeaseLost as exc:
                    log.warning("leadership_lost", node=self.node_id, reason=str(exc))
                except (aetcd.exceptions.ClientError, TimeoutError) as exc:
                    log.info("leader_campaign_failed", node=self.node_id, error=str(exc))
                    await asyncio.sleep(self._lease.ttl / 4)
                finally:
                    if self._holding:
                        self._holding = False
                        await self._lease.revoke()
        finally:
            if self._lease.lease is not None:
                # Hand over at once on an orderly stop; shielded so the cancellation that ends us cannot cut it.
                await asyncio.shield(self._lease.revoke())

    async def _campaign(self) -> int:
        """Try to take the key; returns the store revision the attempt saw."""
        if not self._lease.current:
            await self._lease.grant()
        tx = self._client.transactions
        won, responses = await wait_for(
            self._client.transaction(
                compare=[tx.version(LEADER_KEY) == 0],
                success=[tx.put(LEADER_KEY, self.node_id.encode(), lease=self._lease.lease)],
                failure=[tx.get(LEADER_KEY)],
            ),
            RPC_TIMEOUT_SECONDS,
        )
        if won:
            self._holding = True
            self.terms_won += 1
            log.info("leadership_acquired", node=self.node_id, ttl_s=self._lease.ttl)
            return 0
        if not responses or not responses[0]:
            return 0  # deleted between the compare and the read: campaign again at once
        value, current = responses[0][0]
        if value.decode() == self.node_id:  # our own key from a lease we lost track of: it expires by itself
            log.info("stale_leader_key", node=self.node_id)
        return int(current.header.revision)

    async def _wait_for_vacancy(self, revision: int) -> None:
        """Until the key is deleted after the revision we saw, or a TTL passes (then campaign anyway)."""
        watch = await wait_for(self._client.watch(LEADER_KEY, start_revision=revision + 1), RPC_TIMEOUT_SECONDS)

        async def deleted() -> None:
            async for event in watch:
                if event.kind == "DELETE":
                    return

        try:
            await wait_for(deleted(), self._lease.ttl)
        except TimeoutError:
            pass
        finally:
            await watch.cancel()


class NodeRegistry:
    """Publishes this node's record under its own lease and lists the live nodes."""

    def __init__(
        self,
        client: aetcd.Client,
        node_id: str,
        ttl: int = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.node_id = node_id
        self._lease = KeptLease(client, ttl, clock)

    async def run(self, record: Callable[[], Mapping[str, Any]], refresh_seconds: float = 1.0) -> None:
        """Keep `/thox/nodes/<id>` alive and fresh (`record()` is called at each refresh) until cancelled."""
        key = NODES_PREFIX + self.node_id.encode()
        try:
            while True:
                try:
                    await self._lease.grant()
                    keeper = asyncio.ensure_future(self._lease.keep_alive())
                    try:
                        while not keeper.done():
                            body = json.dumps({**record(), "id": self.node_id}).encode()
                            await wait_for(self._client.put(key, body, lease=self._lease.lease), RPC_TIMEOUT_SECONDS)
                            await asyncio.wait({keeper}, timeout=refresh_seconds)
                        keeper.result()
                    finally:
                        keeper.cancel()
                except (LeaseLost, aetcd.exceptions.ClientError, TimeoutError) as exc:
                    log.info("node_record_lapsed", node=self.node_id, error=str(exc))
                    await asyncio.sleep(self._lease.ttl / 4)
        finally:
            await asyncio.shield(self._lease.revoke())

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """The records of every live node, by id (linearizable: raises when no quorum is reachable)."""
        found: dict[str, dict[str, Any]] = {}
        for kv in await wait_for(self._client.get_prefix(NODES_PREFIX), RPC_TIMEOUT_SECONDS):
            try:
                record = json.loads(kv.value)
            except ValueError:
                log.warning("node_record_unreadable", key=kv.key.decode(errors="replace"))
                continue
            found[kv.key[len(NODES_PREFIX) :].decode()] = record
        return found


def _record_of(raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class LiveNodes:
    """The live nodes' records as this box last saw them (`records`), kept current by a watch: the router, the
    replica keeper and the CA custodian read them without a round trip to etcd."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    async def follow(self, client: aetcd.Client, retry_seconds: float = 0.5) -> None:
        """A snapshot, then every change from a watch, until cancelled."""
        while True:
            try:
                snapshot = await wait_for(client.get_prefix(NODES_PREFIX), RPC_TIMEOUT_SECONDS)
                self.records = {kv.key[len(NODES_PREFIX) :].decode(): _record_of(kv.value) for kv in snapshot}
                watch = await wait_for(
                    client.watch_prefix(NODES_PREFIX, start_revision=snapshot.header.revision + 1), RPC_TIMEOUT_SECONDS
                )
                try:
                    async for event in watch:
                        node_id = event.kv.key[len(NODES_PREFIX) :].decode()
                        if event.kind == "DELETE":
                            self.records.pop(node_id, None)
                        else:
                            self.records[node_id] = _record_of(event.kv.value)
                finally:
                    await watch.cancel()
            except (aetcd.exceptions.ClientError, TimeoutError) as exc:
                # Unknown is not alive: route nowhere rather than to a node that may have gone meanwhile.
                self.records = {}
                log.info("node_view_lost", error=str(exc))
                await asyncio.sleep(retry_seconds)
