"""etcd's membership and maintenance RPCs on a connected aetcd client: status, member list, learners, promotion.

Every failure is an `EtcdError` (an `EtcdRpcError` with etcd's own code and message when the RPC itself failed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd import rpc

from agent.errors import ThoxError


class EtcdError(ThoxError):
    """etcd cannot be started, did not become ready, or refused a membership change; the message says why."""


class EtcdRpcError(EtcdError):
    """An etcd RPC failed; `code` is the gRPC status name and `details` etcd's own message."""

    def __init__(self, message: str, *, code: str, details: str) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


@dataclass(frozen=True)
class MemberInfo:
    """One member as the cluster sees it; `name` is empty until an added member has started."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool


@dataclass(frozen=True)
class EtcdStatus:
    """What a member says about itself: its id, the raft leader it follows (0: none) and its raft position."""

    member_id: int
    leader_id: int
    raft_term: int
    raft_index: int
    is_learner: bool
    version: str
    db_size: int


async def call_rpc(
    client: aetcd.Client, stub: str, method: str, request: Any, what: str, timeout: float | None = None
) -> Any:
    """One raw etcd RPC with aetcd's deadline and auth metadata; failures become EtcdRpcError."""
    await client.connect()
    call = getattr(getattr(client, stub), method)
    try:
        # aetcd's own per-call deadline and auth metadata, as its wrapped methods pass them
        return await call(request, timeout=client._timeout if timeout is None else timeout, metadata=client.metadata)
    except rpc.AioRpcError as exc:
        details = exc.details() or ""
        raise EtcdRpcError(
            f"etcd {what} failed: {details or exc.code().name}", code=exc.code().name, details=details
        ) from exc


async def _retrying(
    client: aetcd.Client,
    method: str,
    request: Any,
    what: str,
    timeout: float,
    transient: Callable[[EtcdRpcError], bool],
) -> Any:
    """A Cluster RPC retried with backoff (0.1 s doubling to 1 s) while it fails transiently, up to `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.1
    while True:
        try:
            return await call_rpc(client, "clusterstub", method, request, what)
        except EtcdRpcError as exc:
            retry = transient(exc) or exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
            if not retry or loop.time() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _member_info(member: Any) -> MemberInfo:
    return MemberInfo(
        id=int(member.ID),
        name=str(member.name),
        peer_urls=tuple(member.peerURLs),
        client_urls=tuple(member.clientURLs),
        is_learner=bool(member.isLearner),
    )


async def status(client: aetcd.Client, *, timeout: float | None = None) -> EtcdStatus:
    """The Status of the member `client` is connected to (learners answer it too)."""
    answer = await call_rpc(client, "maintenancestub", "Status", rpc.StatusRequest(), "status", timeout)
    return EtcdStatus(
        member_id=int(answer.header.member_id),
        leader_id=int(answer.leader),
        raft_term=int(answer.raftTerm),
        raft_index=int(answer.raftIndex),
        is_learner=bool(answer.isLearner),
        version=str(answer.version),
        db_size=int(answer.dbSize),
    )


async def members(client: aetcd.Client) -> list[MemberInfo]:
    """Every member of the cluster, voters and learners."""
    answer = await call_rpc(client, "clusterstub", "MemberList", rpc.MemberListRequest(), "member list")
    return [_member_info(m) for m in answer.members]


async def add_learner(client: aetcd.Client, name: str, peer_url: str, *, timeout: float = 15.0) -> tuple[int, str]:
    """Add a non-voting member; return its id and the --initial-cluster string it must start with."""
    for member in await members(client):
        label = member.name or f"{member.id:x}"
        if peer_url in member.peer_urls:
            raise EtcdError(f"{peer_url} is already the peer URL of member {label}; remove that member first")
        if member.name == name:
            raise EtcdError(f"a member named {name} is already in the cluster; remove it before it joins again")
        if not member.name:
            raise EtcdError(
                f"member {label} ({', '.join(member.peer_urls)}) was added but never started; "
                "remove it before adding another"
            )
    request = rpc.MemberAddRequest(peerURLs=[peer_url], isLearner=True)
    # etcd refuses any member change ("unhealthy cluster") until every voter's peer link has been up for 5 s
    # (strict reconfig check), e.g. just after a voter joined or restarted: wait that out.
    answer = await _retrying(
        client, "MemberAdd", request, f"adding learner {name}", timeout, lambda exc: "unhealthy cluster" in exc.details
    )
    new_id = int(answer.member.ID)
    # MemberAdd answers with the new member unnamed (it has not started); the joiner needs every member as
    # name=peerURL, itself under its own name, or etcd refuses to start.
    parts = [f"{name if m.ID == new_id else m.name}={url}" for m in answer.members for url in m.peerURLs]
    return new_id, ",".join(parts)


async def promote(client: aetcd.Client, member_id: int, *, timeout: float = 30.0) -> None:
    """Promote a learner to voter, retrying while etcd says it has not caught up with the leader yet."""
    request = rpc.MemberPromoteRequest(ID=member_id)
    try:
        await _retrying(
            client,
            "MemberPromote",
            request,
            f"promoting member {member_id:x}",
            timeout,
            lambda exc: "in sync with leader" in exc.details,
        )
    except EtcdRpcError as exc:
        # "can only promote a learner member": fine if it is a voter already (an earlier answer was lost).
        if (
            "can only promote" in exc.details
            and "in sync" not in exc.details
            and any(m.id == member_id and not m.is_learner for m in await members(client))
        ):
            return
        if "in sync with leader" in exc.details:
            raise EtcdError(
                f"learner {member_id:x} did not catch up with the leader within {timeout:.0f}s; is its "
                "etcd running and can the leader reach its peer URL?"
            ) from exc
        raise


async def remove(client: aetcd.Client, member_id: int) -> None:
    """Remove a member (voter or learner) from the cluster."""
    await call_rpc(
        client, "clusterstub", "MemberRemove", rpc.MemberRemoveRequest(ID=member_id), f"removing member {member_id:x}"
    )
