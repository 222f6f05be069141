"""The join protocol over real TLS on loopback: joiner (agent.cluster.join) against the peer API (agent.cluster.peer).

The authority behind the peer API is a fake: a real ClusterCA signs CSRs and `tokens.check` judges tokens against
in-memory records, so everything but etcd is the real thing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from agent.cluster import pki, tokens
from agent.cluster.join import JoinGrant, JoinRefused, JoinRequest, fetch_ca, join
from agent.cluster.peer import build_peer_app, serve_peer_api
from agent.cluster.pki import ClusterCA, NodeKey, make_csr
from agent.cluster.tokens import JoinToken, TokenError, TokenRecord

SERVER = "box-a"
JOINER = "box-b"
LOOPBACK = "127.0.0.1"

Tamper = Callable[[JoinGrant, JoinRequest], JoinGrant]


@pytest.fixture(scope="module")
def ca() -> ClusterCA:
    return ClusterCA.create("stack-1")


@pytest.fixture(scope="module")
def other_ca() -> ClusterCA:
    return ClusterCA.create("stack-2")


@pytest.fixture(scope="module")
def twin_ca() -> ClusterCA:
    """Another CA with the very same name as `ca`: only signatures tell them apart."""
    return ClusterCA.create("stack-1")


@dataclasses.dataclass(frozen=True)
class Node:
    node_id: str
    key_pem: bytes
    cert_pem: bytes


def _node(ca: ClusterCA, node_id: str) -> Node:
    key = NodeKey.create()
    return Node(node_id, key, ca.issue(make_csr(key, node_id), node_id, [LOOPBACK], []))


class FakeAuthority:
    """Admits joiners like a leader would, minus etcd; `tamper` makes it hand out a doctored grant."""

    def __init__(self, ca: ClusterCA, records: dict[str, TokenRecord], tamper: Tamper | None = None) -> None:
        self.ca = ca
        self.records = records
        self.tamper = tamper
        self.members = [SERVER]
        self.requests: list[JoinRequest] = []
        self.fail: Exception | None = None

    async def admit(self, request: JoinRequest) -> JoinGrant:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        try:
            tokens.check(self.records.get(request.token_id), request.token(self.ca.fingerprint), time.time())
        except TokenError as exc:
            raise JoinRefused.from_token_error(exc) from None
        if request.node_id in self.members:
            raise JoinRefused(f"node {request.node_id} is already a member", code="already_member")
        self.records[request.token_id] = self.records[request.token_id].mark_used()
        cert = await asyncio.to_thread(
            self.ca.issue, request.csr_pem.encode(), request.node_id, [request.address], ["thox.local"]
        )
        self.members.append(request.node_id)
        initial = ",".join(f"{m}=https://{LOOPBACK}:5383" for m in self.members)
        grant = JoinGrant(
            cluster_id=self.ca.cluster_id,
            node_cert_pem=cert.decode(),
            ca_cert_pem=self.ca.cert_pem.decode(),
            ca_key_pem=self.ca.key_pem.decode(),
            initial_cluster=initial,
            role="learner",
            leader=SERVER,
            members=list(self.members),
        )
        return grant if self.tamper is None else self.tamper(grant, request)


def _token(ca: ClusterCA, *, ttl: float = 3600, created: float | None = None) -> tuple[JoinToken, TokenRecord]:
    token = JoinToken.generate(ca.fingerprint)
    return token, TokenRecord.for_token(token, ttl, time.time() if created is None else created)


@dataclasses.dataclass
class Peer:
    port: int
    authority: FakeAuthority
    seen: list[tuple[str, str]]  # (method, path) of every request that reached the app

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"


@asynccontextmanager
async def peer_api(
    authority: FakeAuthority,
    *,
    serves_ca: bytes | None = None,
    tls_ca: ClusterCA | None = None,
    also_trust: bytes | None = None,
) -> AsyncIterator[Peer]:
    """The peer API of SERVER on a free loopback port; `serves_ca`/`tls_ca` let it lie about or swap its CA."""
    tls_ca = tls_ca or authority.ca
    server = await asyncio.to_thread(_node, tls_ca, SERVER)
    context = await asyncio.to_thread(
        pki.server_context_from_pem, tls_ca.cert_pem, server.cert_pem, server.key_pem, require_client_cert=False
    )
    if also_trust is not None:
        await asyncio.to_thread(context.load_verify_locations, cadata=also_trust.decode())
    app = build_peer_app(authority, serves_ca or authority.ca.cert_pem)
    seen: list[tuple[str, str]] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append((request.method, request.path))

    app.on_response_prepare.append(record)
    async with serve_peer_api(app, LOOPBACK, 0, context) as port:
        yield Peer(port, authority, seen)


async def _client_context(ca: ClusterCA, node: Node | None = None) -> ssl.SSLContext:
    if node is None:
        return await asyncio.to_thread(pki.client_context_from_pem, ca.cert_pem, None, None)
    return await asyncio.to_thread(pki.client_context_from_pem, ca.cert_pem, node.cert_pem, node.key_pem)


async def _call(
    method: str,
    url: str,
    context: ssl.SSLContext,
    *,
    data: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers={"Content-Type": content_type}, ssl=context) as response,
    ):
        text = await response.text()
        return response.status, (json.loads(text) if response.content_type == "application/json" else text)


async def _join(peer: Peer, token: JoinToken, node_id: str = JOINER, key_pem: bytes | None = None) -> JoinGrant:
    key = key_pem if key_pem is not None else await asyncio.to_thread(NodeKey.create)
    return await join(
        LOOPBACK, peer.port, token, node_id=node_id, key_pem=key, address=LOOPBACK, etcd_peer_port=5383, timeout=10
    )


# --- the happy path --------------------------------------------------------------------------------------------


async def test_join_grants_a_certificate_that_opens_the_members_only_routes(ca: ClusterCA) -> None:
    token, record = _token(ca)
    authority = FakeAuthority(ca, {token.token_id: record})
    key = await asyncio.to_thread(NodeKey.create)
    async with peer_api(authority) as peer:
        with capture_logs() as logs:
            grant = await _join(peer, token, key_pem=key)

        assert await asyncio.to_thread(pki.verify_node_cert, ca.cert_pem, grant.node_cert_pem.encode()) == JOINER
        assert pki.cert_matches_key(grant.node_cert_pem.encode(), key)
        assert pki.ca_fingerprint(grant.ca_cert_pem.encode()) == ca.fingerprint
        assert grant.ca_key_pem == ca.key_pem.decode()
        assert (grant.cluster_id, grant.role, grant.leader, grant.members) == (
            "stack-1",
            "learner",
            SERVER,
            [SERVER, JOINER],
        )
        assert grant.initial_cluster.endswith(f"{JOINER}=https://{LOOPBACK}:5383")
        assert authority.records[token.token_id].used
        assert [(r.node_id, r.address, r.etcd_peer_port) for r in authority.requests] == [(JOINER, LOOPBACK, 5383)]
        admitted = [e for e in logs if e["event"] == "join_admitted"]
        assert admitted and admitted[0]["node_id"] == JOINER and admitted[0]["token_id"] == token.token_id
        assert token.secret not in repr(logs)

        member = Node(JOINER, key, grant.node_cert_pem.encode())
        status, body = await _call("GET", f"{peer.url}/cluster/ping", await _client_context(ca, member))
        assert (status, body) == (200, {"node_id": JOINER})

        status, body = await _call("GET", f"{peer.url}/cluster/ping", await _client_context(ca))
        assert status == 401
        assert body["error"]["code"] == "client_certificate_required"
        assert body["error"]["type"] == "authentication_error"
        # Unknown routes are members-only too: an anonymous caller learns nothing about what exists.
        status, body = await _call("GET", f"{peer.url}/cluster/nodes", await _client_context(ca))
        assert (status, body["error"]["code"]) == (401, "client_certificate_required")
        status, body = await _call("GET", f"{peer.url}/cluster/nodes", await _client_context(ca, member))
        assert (status, body["error"]["code"]) == (404, "not_found")


async def test_ca_route_is_open_and_serves_the_pem(ca: ClusterCA) -> None:
    async with peer_api(FakeAuthority(ca, {})) as peer:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{peer.url}/cluster/ca", ssl=await _client_context(ca)) as response,
        ):
            assert response.status == 200
            assert response.content_type == "text/plain"
            assert await response.read() == ca.cert_pem
        assert await fetch_ca(LOOPBACK, peer.port) == ca.cert_pem


async def test_a_certificate_from_another_ca_fails_the_handshake(ca: ClusterCA, other_ca: ClusterCA) -> None:
    stranger = await asyncio.to_thread(_node, other_ca, "box-x")
    async with peer_api(FakeAuthority(ca, {})) as peer:
        with pytest.raises(aiohttp.ClientError):
            await _call("GET", f"{peer.url}/cluster/ping", await _client_context(ca, stranger))
        assert peer.seen == []


async def test_middleware_refuses_a_foreign_certificate_that_tls_let_through(
    ca: ClusterCA, other_ca: ClusterCA
) -> None:
    # Served with a context that also trusts another CA (a misconfiguration): the app still admits only its own.
    stranger = await asyncio.to_thread(_node, other_ca, "box-x")
    async with peer_api(FakeAuthority(ca, {}), also_trust=other_ca.cert_pem) as peer:
        status, body = await _call("GET", f"{peer.url}/cluster/ping", await _client_context(ca, stranger))
        assert status == 403
        assert body["error"]["code"] == "client_certificate_untrusted"
        assert body["error"]["type"] == "permission_error"


# --- the pin ---------------------------------------------------------------------------------------------------


async def test_a_server_of_another_cluster_never_sees_the_secret(ca: ClusterCA, other_ca: ClusterCA) -> None:
    token, record = _token(ca)
    # The other cluster even has a record for this very token id: were the secret sent, it would be judged.
    impostor = FakeAuthority(other_ca, {token.token_id: record})
    async with peer_api(impostor) as peer:
        with pytest.raises(TokenError) as caught:
            await _join(peer, token)
    assert caught.value.code == "ca_mismatch"
    assert "secret was not sent" in caught.value.message
    assert impostor.requests == []
    assert peer.seen == [("GET", "/cluster/ca")]


async def test_a_relay_of_the_real_ca_with_another_certificate_never_sees_the_secret(
    ca: ClusterCA, other_ca: ClusterCA
) -> None:
    # A man in the middle serves the real CA certificate on /cluster/ca but cannot prove its TLS identity with it.
    token, record = _token(ca)
    relay = FakeAuthority(ca, {token.token_id: record})
    async with peer_api(relay, serves_ca=ca.cert_pem, tls_ca=other_ca) as peer:
        with pytest.raises(TokenError) as caught:
            await _join(peer, token)
    assert caught.value.code == "ca_mismatch"
    assert f"{LOOPBACK}:{peer.port}" in caught.value.message
    assert relay.requests == []
    assert peer.seen == [("GET", "/cluster/ca")]


# --- refused tokens --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["token_invalid", "token_expired", "token_unknown"])
async def test_a_bad_token_is_refused_and_changes_nothing(ca: ClusterCA, case: str) -> None:
    token, record = _token(ca, created=time.time() - 7200 if case == "token_expired" else None)
    presented = token
    if case == "token_invalid":
        presented = dataclasses.replace(token, secret=JoinToken.generate(ca.fingerprint).secret)
    if case == "token_unknown":
        presented = JoinToken.generate(ca.fingerprint)
    records = {token.token_id: record}
    authority = FakeAuthority(ca, records)
    async with peer_api(authority) as peer:
        with capture_logs() as logs:
            with pytest.raises(JoinRefused) as caught:
                await _join(peer, presented)
    assert (caught.value.code, caught.value.status) == (case, 403)
    assert presented.token_id in caught.value.message
    assert authority.records == {token.token_id: record}
    assert authority.members == [SERVER]
    refused = [e for e in logs if e["event"] == "join_refused"]
    assert refused and refused[0]["code"] == case
    assert presented.secret not in repr(logs) and token.secret not in repr(logs)


async def test_a_token_admits_one_node_only(ca: ClusterCA) -> None:
    token, record = _token(ca)
    authority = FakeAuthority(ca, {token.token_id: record})
    async with peer_api(authority) as peer:
        await _join(peer, token)
        with pytest.raises(JoinRefused) as caught:
            await _join(peer, token, node_id="box-c")
    assert (caught.value.code, caught.value.status) == ("token_used", 403)
    assert authority.records[token.token_id].used
    assert authority.members == [SERVER, JOINER]


async def test_a_member_cannot_join_again(ca: ClusterCA) -> None:
    token, record = _token(ca)
    authority = FakeAuthority(ca, {token.token_id: record})
    async with peer_api(authority) as peer:
        with pytest.raises(JoinRefused) as caught:
            await _join(peer, token, node_id=SERVER)
    assert (caught.value.code, caught.value.status) == ("already_member", 409)
    assert "already a member" in caught.value.message


async def test_an_authority_fault_is_a_clean_500(ca: ClusterCA) -> None:
    token, record = _token(ca)
    authority = FakeAuthority(ca, {token.token_id: record})
    authority.fail = RuntimeError("etcd client exploded")
    async with peer_api(authority) as peer:
        with capture_logs() as logs:
            with pytest.raises(JoinRefused) as caught:
                await _join(peer, token)
    assert (caught.value.code, caught.value.status) == ("internal_error", 500)
    assert "etcd client exploded" not in caught.value.message
    assert [e["event"] for e in logs if e["event"] == "join_failed"] == ["join_failed"]


# --- malformed requests ----------------------------------------------------------------------------------------


def _request_json(ca: ClusterCA, **changes: Any) -> bytes:
    token, _ = _token(ca)
    csr = make_csr(NodeKey.create(), JOINER).decode()
    body: dict[str, Any] = {
        "token_id": token.token_id,
        "secret": token.secret,
        "node_id": JOINER,
        "csr_pem": csr,
        "address": LOOPBACK,
        "etcd_peer_port": 5383,
    }
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"node_id": "../etc"}, "node id"),
        ({"etcd_peer_port": 0}, "etcd_peer_port"),
        ({"etcd_peer_port": True}, "etcd_peer_port"),
        ({"address": "thox.local"}, "address"),
        ({"secret": "x"}, "secret"),
        ({"token_id": "zzzzzz"}, "id"),
        ({"csr_pem": "not a csr"}, "csr_pem"),
        ({"csr_pem": ...}, "lacks the fields ['csr_pem']"),
        ({"extra": 1}, "unknown fields ['extra']"),
    ],
)
async def test_join_request_validation(ca: ClusterCA, change: dict[str, Any], needle: str) -> None:
    with pytest.raises(JoinRefused) as caught:
        JoinRequest.from_json(_request_json(ca, **change))
    assert (caught.value.code, caught.value.status) == ("bad_request", 400)
    assert needle in caught.value.message


async def test_malformed_and_oversized_join_bodies(ca: ClusterCA) -> None:
    authority = FakeAuthority(ca, {})
    async with peer_api(authority) as peer:
        context = await _client_context(ca)
        url = f"{peer.url}/cluster/join"
        for data, content_type in [
            (b"{not json", "application/json"),
            (b"[1, 2]", "application/json"),
            (json.dumps({"token_id": "abcdef"}).encode(), "application/json"),
            (await asyncio.to_thread(_request_json, ca), "text/plain"),
        ]:
            status, body = await _call("POST", url, context, data=data, content_type=content_type)
            assert (status, body["error"]["code"], body["error"]["type"]) == (
                400,
                "bad_request",
                "invalid_request_error",
            ), data
        status, body = await _call("POST", url, context, data=b"{" + b" " * (100 * 1024) + b"}")
        assert (status, body["error"]["code"]) == (413, "request_too_large")
        status, body = await _call("GET", url, context)
        # Wrong method on an open route: members only, so 401 rather than 405 for an anonymous caller.
        assert status == 401
    assert authority.requests == []


# --- unreachable or garbage ------------------------------------------------------------------------------------


async def test_an_unreachable_server_names_its_address(ca: ClusterCA, free_ports: Callable[[int], list[int]]) -> None:
    token, _ = _token(ca)
    (port,) = free_ports(1)
    with pytest.raises(JoinRefused) as caught:
        await join(
            LOOPBACK,
            port,
            token,
            node_id=JOINER,
            key_pem=await asyncio.to_thread(NodeKey.create),
            address=LOOPBACK,
            etcd_peer_port=5383,
        )
    assert caught.value.code == "unreachable"
    assert f"{LOOPBACK}:{port}" in caught.value.message
    assert "connection refused" in caught.value.message


async def test_a_server_that_never_answers_is_unreachable() -> None:
    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until the client gives up
        finally:
            writer.close()
            hung_up.set()

    server = await asyncio.start_server(silent, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(JoinRefused) as caught:
            await fetch_ca(LOOPBACK, port, timeout=0.3)
        await asyncio.wait_for(hung_up.wait(), 5)
    assert caught.value.code == "unreachable"
    assert f"{LOOPBACK}:{port}: no answer within 0.3 s" in caught.value.message


async def test_a_server_that_is_not_a_peer_api_is_unreachable(ca: ClusterCA) -> None:
    async def plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain_http, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(JoinRefused) as caught:
            await fetch_ca(LOOPBACK, port, timeout=5)
    assert caught.value.code == "unreachable"
    assert f"{LOOPBACK}:{port}" in caught.value.message

    async with peer_api(FakeAuthority(ca, {}), serves_ca=b"this is not a certificate") as peer:
        with pytest.raises(JoinRefused) as caught:
            await fetch_ca(LOOPBACK, peer.port)
    assert caught.value.code == "unreachable"
    assert "not a PEM certificate" in caught.value.message


# --- a misbehaving cluster -------------------------------------------------------------------------------------


def _reissue(ca: ClusterCA, node_id: str, request: JoinRequest, key_pem: bytes | None = None) -> str:
    csr = make_csr(key_pem, node_id) if key_pem is not None else request.csr_pem.encode()
    return ca.issue(csr, node_id, [LOOPBACK], []).decode()


def _tamperers(ca: ClusterCA, twin: ClusterCA, other: ClusterCA) -> dict[str, Tamper]:
    return {
        "certificate for another node": lambda g, r: dataclasses.replace(
            g, node_cert_pem=_reissue(ca, "box-z", r, NodeKey.create())
        ),
        "certificate for another key": lambda g, r: dataclasses.replace(
            g, node_cert_pem=_reissue(ca, r.node_id, r, NodeKey.create())
        ),
        "certificate from a CA of the same name": lambda g, r: dataclasses.replace(
            g, node_cert_pem=_reissue(twin, r.node_id, r)
        ),
        "another CA certificate in the grant": lambda g, r: dataclasses.replace(g, ca_cert_pem=other.cert_pem.decode()),
        "a CA key that is not the CA's": lambda g, r: dataclasses.replace(g, ca_key_pem=twin.key_pem.decode()),
        "another cluster id": lambda g, r: dataclasses.replace(g, cluster_id="stack-9"),
        "an unknown role": lambda g, r: dataclasses.replace(g, role="king"),
    }


TAMPER_CASES = [
    "certificate for another node",
    "certificate for another key",
    "certificate from a CA of the same name",
    "another CA certificate in the grant",
    "a CA key that is not the CA's",
    "another cluster id",
    "an unknown role",
]


@pytest.mark.parametrize("case", TAMPER_CASES)
async def test_a_doctored_grant_is_refused(ca: ClusterCA, twin_ca: ClusterCA, other_ca: ClusterCA, case: str) -> None:
    token, record = _token(ca)
    authority = FakeAuthority(ca, {token.token_id: record}, tamper=_tamperers(ca, twin_ca, other_ca)[case])
    async with peer_api(authority) as peer:
        with pytest.raises(JoinRefused) as caught:
            await _join(peer, token)
    assert caught.value.code == "bad_grant", caught.value.message
    assert "join answer is unusable" in caught.value.message


# --- wire types ------------------------------------------------------------------------------------------------


def test_wire_types_round_trip_and_hide_secrets(ca: ClusterCA) -> None:
    request = JoinRequest.from_json(_request_json(ca))
    assert JoinRequest.from_json(request.to_json()) == request
    assert request.secret not in repr(request)
    assert set(json.loads(request.to_json())) == {
        "token_id",
        "secret",
        "node_id",
        "csr_pem",
        "address",
        "etcd_peer_port",
    }
    grant = JoinGrant(
        cluster_id="stack-1",
        node_cert_pem=_node(ca, JOINER).cert_pem.decode(),
        ca_cert_pem=ca.cert_pem.decode(),
        ca_key_pem=ca.key_pem.decode(),
        initial_cluster=f"{JOINER}=https://{LOOPBACK}:5383",
        role="voter",
        leader=None,
        members=[JOINER],
    )
    assert JoinGrant.from_json(grant.to_json()) == grant
    assert "PRIVATE KEY" not in repr(grant)
    newer = json.loads(grant.to_json()) | {"added_later": True}
    assert JoinGrant.from_json(json.dumps(newer)) == grant


def test_refusal_statuses() -> None:
    expected = {
        "token_invalid": 403,
        "token_used": 403,
        "token_expired": 403,
        "token_unknown": 403,
        "bad_request": 400,
        "already_member": 409,
        "cluster_unavailable": 503,
    }
    assert {code: JoinRefused("m", code=code).status for code in expected} == expected
    assert JoinRefused("m", code="unreachable").status == 502
    assert JoinRefused("m", code="x", status=418).status == 418
