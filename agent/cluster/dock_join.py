"""Joining by docking: the join offer this box presents on its NFC antenna, and joining the cluster of the box it is
docked onto when that box's offer carries a token (agent/hardware/dock.py reads and writes the tags)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aetcd
import structlog

from agent.cluster.admission import Admission
from agent.cluster.etcd_members import EtcdError
from agent.cluster.join import JoinRefused
from agent.cluster.tokens import TokenError
from agent.cluster.views import ClusterUnavailable
from agent.hardware.dock import JoinOfferEvent
from drivers.base import JoinOffer

log = structlog.get_logger("agent.cluster")

# The token a box presents by NFC: long enough that presenting does not churn etcd, renewed before it lapses.
OFFER_TOKEN_TTL_SECONDS = 600.0
OFFER_RENEW_BEFORE_SECONDS = 60.0


@dataclass(frozen=True)
class Offering:
    """What an offer needs from the running cluster layer: who admits, and who this box is and where it listens."""

    admission: Admission
    node_id: str
    endpoint: str


class DockJoin:
    """Presents this box's offer and joins the stack it is docked onto. `offering()` is None while the layer is not
    running; `join(token, endpoint)` is the node's join."""

    def __init__(
        self,
        offering: Callable[[], Offering | None],
        join: Callable[[str, str], Awaitable[dict[str, Any]]],
    ) -> None:
        self._offering = offering
        self._join = join
        self._offered: tuple[str, float] | None = None  # the token this box presents, and its expiry

    def forget_offer(self) -> None:
        """A token of the cluster this box was in before is worth nothing now."""
        self._offered = None

    async def own_offer(self, fresh: bool) -> JoinOffer | None:
        """The join offer this box presents: a one-time token, new once the last was read (`fresh`)."""
        offering = self._offering()
        if offering is None:
            return None
        now = time.time()
        if fresh or self._offered is None or self._offered[1] - now < OFFER_RENEW_BEFORE_SECONDS:
            try:
                token, expires = await offering.admission.issue_token(OFFER_TOKEN_TTL_SECONDS)
            except (aetcd.exceptions.ClientError, TimeoutError, JoinRefused) as exc:
                log.info("join_offer_unavailable", error=str(exc))
                return None
            self._offered = (str(token), expires)
        token_text, expires = self._offered
        return JoinOffer(
            node_id=offering.node_id, endpoint=offering.endpoint, token=token_text, expires_at=int(expires)
        )

    async def run(self, offers: asyncio.Queue[JoinOfferEvent]) -> None:
        """Join the cluster of the box this one was docked onto, when its NFC offer carries a token."""
        while True:
            event = await offers.get()
            offer = event.offer
            if not offer.token:
                continue  # the module only announced itself
            try:
                joined = await self._join(offer.token, offer.endpoint)
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
