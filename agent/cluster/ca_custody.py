"""Custody of the cluster CA's private key: only on the boxes that admit others, handed over as roles change.

Whoever holds the CA key can mint a certificate for any node id and so speak for any box. It is kept where
admission needs it and nowhere else (docs/cluster.md, "Trust model"):

- the voters (any of them may be leader, and a stack must keep admitting boxes whichever voter is yanked), and
- the standby learner of a two-box stack, which re-forms the cluster alone when its voter is lost and must then be
  able to admit the next box without one.

Learners of bigger stacks and client boxes never hold it. A box without the key that receives a join request
(its own token, its own NFC offer) forwards the request to a key holder; the token record is in etcd, so any
holder can check and consume it. A box that becomes a holder (a learner promoted to voter) fetches the key from
one over the peer API with mutual TLS, and the holder gives it only to a caller that etcd's member list says is
entitled; a box that no longer should hold it deletes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import structlog

from agent.atomic import atomic_write_bytes
from agent.cluster import etcd_members
from agent.cluster.etcd_members import EtcdError, MemberInfo
from agent.cluster.membership import RPC_TIMEOUT_SECONDS
from agent.cluster.net import host_port
from agent.cluster.pki import CA_KEY_FILE, SECRET_FILE_MODE, ClusterCA, Identity, PkiError, read_identity
from agent.errors import ThoxError
from common.aio import wait_for

log = structlog.get_logger("agent.cluster.ca")

CA_KEY_PATH = "/cluster/ca-key"
CHECK_SECONDS = 2.0
# A CA key in PEM is a few hundred bytes.
MAX_KEY_BYTES = 16 * 1024


class CaKeyRefused(ThoxError):
    """The CA key is not handed to this caller (`code`, `status` as the peer API answers them)."""

    def __init__(self, message: str, *, code: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


def entitled(node_id: str, members: list[MemberInfo]) -> bool:
    """Whether the box `node_id` should hold the CA key, given etcd's member list (clients are never members)."""
    me = next((m for m in members if m.name == node_id), None)
    if me is None:
        return False
    if not me.is_learner:
        return True
    voters = sum(not m.is_learner for m in members)
    return voters == 1 and len(members) == 2  # the standby of a two-box stack


def holders(live_nodes: Mapping[str, Mapping[str, Any]], leader: str | None, exclude: str) -> list[str]:
    """Peer API base URLs of live boxes holding the CA key, the leader first."""
    found = [
        (node_id != leader, node_id, record)
        for node_id, record in live_nodes.items()
        if node_id != exclude and record.get("holds_ca_key") and record.get("peer_port")
    ]
    return [
        f"https://{host_port(str(record['address']), int(record['peer_port']))}"
        for _, _, record in sorted(found, key=lambda item: item[:2])
    ]


def store_key(identity: Identity, key_pem: bytes | None) -> Identity:
    """Blocking: write (checked against the CA certificate) or delete this box's copy; the identity re-read."""
    path = identity.directory / CA_KEY_FILE
    if key_pem is None:
        path.unlink(missing_ok=True)
    else:
        ClusterCA.load(identity.ca_pem, key_pem)  # PkiError unless it is this cluster's CA key
        atomic_write_bytes(path, key_pem, mode=SECRET_FILE_MODE)
    reread = read_identity(identity.directory)
    if reread is None:
        raise PkiError(f"the identity in {identity.directory} vanished while its CA key was being updated")
    return reread


def forget_retired_key(retired: Path) -> None:
    """Blocking: a retired cluster folder (cluster/previous-*) keeps no CA key: that stack's key is not ours now."""
    (retired / "tls" / CA_KEY_FILE).unlink(missing_ok=True)


async def fetch_key(session: aiohttp.ClientSession, base_url: str) -> bytes:
    """The CA key from a holder's peer API; CaKeyRefused when it will not or cannot hand it over."""
    try:
        async with session.get(f"{base_url}{CA_KEY_PATH}", timeout=aiohttp.ClientTimeout(total=10)) as answer:
            body = await answer.content.read(MAX_KEY_BYTES + 1)
            if answer.status != 200:
                raise CaKeyRefused(
                    f"{base_url} refused the CA key: HTTP {answer.status} {body[:200]!r}",
                    code="refused",
                    status=answer.status,
                )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CaKeyRefused(f"{base_url} did not hand over the CA key: {exc}", code="unreachable", status=503) from exc
    if len(body) > MAX_KEY_BYTES:
        raise CaKeyRefused(
            f"{base_url} sent more than {MAX_KEY_BYTES} bytes for the CA key", code="bad_answer", status=502
        )
    return body


class CaCustodian:
    """On every box: keeps its copy of the CA key in line with its role, and serves it to entitled boxes."""

    def __init__(
        self,
        node_id: str,
        client: aetcd.Client,
        identity: Callable[[], Identity],
        on_identity: Callable[[Identity], None],
        live_nodes: Callable[[], Mapping[str, Mapping[str, Any]]],
        leader: Callable[[], str | None],
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.node_id = node_id
        self._client = client
        self._identity = identity
        self._on_identity = on_identity
        self._live_nodes = live_nodes
        self._leader = leader
        self._session = session

    async def run(self) -> None:
        """Every few seconds: fetch the key when this box became entitled, drop it when it no longer is."""
        while True:
            try:
                await self.check()
            except (aetcd.exceptions.ClientError, EtcdError, TimeoutError, CaKeyRefused, PkiError, OSError) as exc:
                log.info("ca_key_check_failed", error=str(exc))
            await asyncio.sleep(CHECK_SECONDS)

    async def check(self) -> None:
        """One round of `run`."""
        members = await wait_for(etcd_members.members(self._client), RPC_TIMEOUT_SECONDS)
        identity = self._identity()
        want, have = entitled(self.node_id, members), identity.ca_key_pem is not None
        if want == have:
            return
        key: bytes | None = None
        if want:
            sources = holders(self._live_nodes(), self._leader(), self.node_id)
            if not sources:
                raise CaKeyRefused("no live box holding the CA key to take it from", code="no_holder", status=503)
            key = await fetch_key(self._session(), sources[0])
        self._on_identity(await asyncio.to_thread(store_key, identity, key))
        log.info("ca_key_received" if want else "ca_key_dropped", node=self.node_id)

    async def key_for(self, caller: str) -> bytes:
        """The CA key for the box `caller` if etcd says it should hold it (the peer API's GET /cluster/ca-key)."""
        key = self._identity().ca_key_pem
        if key is None:
            raise CaKeyRefused("this box does not hold the CA key", code="no_ca_key", status=503)
        try:
            members = await wait_for(etcd_members.members(self._client), RPC_TIMEOUT_SECONDS)
        except (aetcd.exceptions.ClientError, EtcdError, TimeoutError) as exc:
            raise CaKeyRefused(
                f"the member list cannot be read (no quorum?): {exc}", code="cluster_unavailable", status=503
            ) from exc
        if not entitled(caller, members):
            log.warning("ca_key_refused", caller=caller)
            raise CaKeyRefused(
                f"{caller} is not a box that holds the CA key (voters, and the standby of a two-box stack)",
                code="not_entitled",
                status=403,
            )
        log.info("ca_key_handed_over", to=caller)
        return key
