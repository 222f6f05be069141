"""Custody of the cluster CA key (agent/cluster/ca_custody.py): who holds it, and the peer API handing it over."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from agent.cluster import pki
from agent.cluster.ca_custody import CA_KEY_PATH, CaKeyRefused, entitled, fetch_key, holders, store_key
from agent.cluster.etcd_members import MemberInfo
from agent.cluster.join import JoinGrant, JoinRequest
from agent.cluster.peer import build_peer_app, serve_peer_api
from agent.cluster.pki import ClusterCA, NodeKey, make_csr, read_identity, write_identity

LOOPBACK = "127.0.0.1"


def member(name: str, *, learner: bool = False, number: int = 0) -> MemberInfo:
    return MemberInfo(id=number or hash(name) & 0xFFFF, name=name, peer_urls=(), client_urls=(), is_learner=learner)


def test_voters_and_the_standby_of_a_two_box_stack_hold_the_key_and_nobody_else() -> None:
    assert entitled("a", [member("a")])
    two = [member("a"), member("b", learner=True)]
    assert entitled("a", two) and entitled("b", two)  # b re-forms alone if a is lost: it must admit then
    four = [member("a"), member("b"), member("c"), member("d", learner=True)]
    assert [entitled(name, four) for name in "abcd"] == [True, True, True, False]
    assert not entitled("e", four)  # a client box runs no member at all
    three_with_learner = [member("a"), member("b", learner=True), member("c", learner=True)]
    assert not entitled("b", three_with_learner)


def test_holders_are_live_boxes_that_say_so_with_the_leader_first() -> None:
    live = {
        "a": {"holds_ca_key": True, "address": "10.0.0.1", "peer_port": 5382},
        "b": {"holds_ca_key": True, "address": "10.0.0.2", "peer_port": 5382},
        "c": {"holds_ca_key": False, "address": "10.0.0.3", "peer_port": 5382},
        "d": {"holds_ca_key": True, "address": "10.0.0.4"},
    }
    assert holders(live, "b", "x") == ["https://10.0.0.2:5382", "https://10.0.0.1:5382"]
    assert holders(live, None, "a") == ["https://10.0.0.2:5382"]


def test_a_key_is_stored_only_if_it_is_this_clusters(tmp_path: Path) -> None:
    ca, other = ClusterCA.create("stack-1"), ClusterCA.create("stack-1")
    key = NodeKey.create()
    folder = tmp_path / "tls"
    write_identity(folder, ca.cert_pem, ca.issue(make_csr(key, "b"), "b", [LOOPBACK], ["b"]), key, None)
    identity = read_identity(folder)
    assert identity is not None and identity.ca_key_pem is None
    with pytest.raises(pki.PkiError, match="does not match"):
        store_key(identity, other.key_pem)
    reread = read_identity(folder)
    assert reread is not None and reread.ca_key_pem is None
    held = store_key(identity, ca.key_pem)
    assert held.ca_key_pem == ca.key_pem and (folder / pki.CA_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert store_key(held, None).ca_key_pem is None and not (folder / pki.CA_KEY_FILE).exists()


def test_a_grant_without_the_key_round_trips() -> None:
    grant = JoinGrant(
        "stack-1",
        "-----BEGIN CERTIFICATE-----x",
        "-----BEGIN CERTIFICATE-----y",
        None,
        "b=https://x",
        "learner",
        "a",
        ["a", "b"],
    )
    assert JoinGrant.from_json(grant.to_json()) == grant


class Source:
    """Hands the key to `allowed` only, like CaCustodian.key_for after reading the member list."""

    def __init__(self, ca: ClusterCA, allowed: set[str]) -> None:
        self.ca, self.allowed = ca, allowed
        self.asked: list[str] = []

    async def ca_key_for(self, caller: str) -> bytes:
        self.asked.append(caller)
        if caller not in self.allowed:
            raise CaKeyRefused(f"{caller} may not", code="not_entitled", status=403)
        return self.ca.key_pem


class NoJoins:
    async def admit(self, request: JoinRequest) -> JoinGrant:
        raise AssertionError("not used here")


def node_context(ca: ClusterCA, node_id: str | None) -> ssl.SSLContext:
    if node_id is None:
        return pki.client_context_from_pem(ca.cert_pem, None, None)
    key = NodeKey.create()
    return pki.client_context_from_pem(ca.cert_pem, ca.issue(make_csr(key, node_id), node_id, [LOOPBACK], []), key)


@asynccontextmanager
async def peer(ca: ClusterCA, source: Source) -> AsyncIterator[str]:
    key = NodeKey.create()
    cert = ca.issue(make_csr(key, "a"), "a", [LOOPBACK], [])
    context = await asyncio.to_thread(pki.server_context_from_pem, ca.cert_pem, cert, key, require_client_cert=False)
    async with serve_peer_api(build_peer_app(NoJoins(), ca.cert_pem, ca_keys=source), LOOPBACK, 0, context) as port:
        yield f"https://{LOOPBACK}:{port}"


async def test_the_peer_api_hands_the_key_only_to_an_entitled_member() -> None:
    ca = ClusterCA.create("stack-1")
    source = Source(ca, {"c"})
    async with peer(ca, source) as url:
        contexts = {name: await asyncio.to_thread(node_context, ca, name) for name in ("c", "d")}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=contexts["c"])) as session:
            assert await fetch_key(session, url) == ca.key_pem
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=contexts["d"])) as session:
            with pytest.raises(CaKeyRefused) as refused:
                await fetch_key(session, url)
            assert refused.value.status == 403 and b"not_entitled" in refused.value.message.encode()
        stranger = await asyncio.to_thread(node_context, ca, None)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stranger)) as session,
            session.get(f"{url}{CA_KEY_PATH}") as answer,
        ):
            assert answer.status == 401 and (await answer.json())["error"]["code"] == "client_certificate_required"
    assert source.asked == ["c", "d"]  # the caller is named by its verified certificate, never by the request
