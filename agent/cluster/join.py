"""Joining a cluster, k3s style: the wire types of the peer API's join endpoint and the joiner's side of it.

The joiner holds a `JoinToken` (from `thox cluster token` or an NFC join offer) and the address of a member:

1. `fetch_ca`: GET https://<member>/cluster/ca without verifying the server; what it sends is only a claim.
2. `tokens.check_pin`: the claim must hash to the CA the token pins; otherwise TokenError(ca_mismatch), and the
   secret has not left this box.
3. A CSR for our own key (the key never leaves the box) goes in a `JoinRequest` with the token id and secret,
   POSTed over TLS that trusts only the pinned CA; a server with a certificate from anything else fails the
   handshake before the request is written.
4. The `JoinGrant` that comes back is checked before anything is kept: our certificate must be for our node id
   and our key, issued by the pinned CA, and the CA certificate (and the CA key, when the grant carries it) must
   be the pinned CA's.

A box that holds no CA key relays the request to one that does (`forward`, agent/cluster/ca_custody.py).

Wire format (JSON objects):

- request  `{"token_id", "secret", "node_id", "csr_pem", "address", "etcd_peer_port"}`
- grant    `{"cluster_id", "node_cert_pem", "ca_cert_pem", "ca_key_pem", "initial_cluster", "role", "leader",
  "members", "client_urls"}`; `ca_key_pem` is null unless the joiner is to hold the CA key at once (the standby of
  a two-box stack); role "client" (a box beyond the fourth, no etcd member of its own) comes with an empty
  initial_cluster and the voters' client URLs
- refusal  `{"error": {"message", "type", "param": null, "code"}}` with the status `JoinRefused.status` gives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import aiohttp
from yarl import URL

from agent.cluster import pki
from agent.cluster.net import host_port
from agent.cluster.tokens import JoinToken, TokenError, check_pin
from agent.errors import ThoxError

CA_PATH = "/cluster/ca"
JOIN_PATH = "/cluster/join"
PING_PATH = "/cluster/ping"
# A CA certificate is under 1 KiB and a grant (three certificates, a key, a member list) a few KiB.
MAX_CA_BYTES = 64 * 1024
MAX_GRANT_BYTES = 256 * 1024
MAX_PEM_CHARS = 16 * 1024

Role = Literal["voter", "learner", "client"]
ROLES: tuple[Role, ...] = ("voter", "learner", "client")

# The HTTP status the peer API answers each refusal with. Codes not listed (the joiner's own findings, such as
# "unreachable" or "bad_grant") never travel over the wire and get 502: the fault is on the far side.
REFUSAL_STATUS = {
    "token_invalid": 403,
    "token_used": 403,
    "token_expired": 403,
    "token_unknown": 403,
    "bad_request": 400,
    "already_member": 409,
    "cluster_unavailable": 503,
}
_JOINER_SIDE_STATUS = 502


class JoinRefused(ThoxError):
    """A join did not happen: refused by the cluster, or the cluster could not be reached or be trusted.

    `code` is machine-readable: token_invalid, token_used, token_expired, token_unknown, bad_request,
    already_member, cluster_unavailable (and internal_error, 500, for a fault of the cluster's)
    come from the server; unreachable, bad_answer and bad_grant are the joiner's own findings. `message` is for
    the user, `status` is the HTTP status the peer API uses for it.
    """

    def __init__(self, message: str, *, code: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status if status is not None else REFUSAL_STATUS.get(code, _JOINER_SIDE_STATUS)

    @classmethod
    def from_token_error(cls, error: TokenError) -> JoinRefused:
        """The refusal for a failed `tokens.check` (its code and message as they are)."""
        return cls(error.message, code=error.code)


def _bad_request(message: str) -> NoReturn:
    raise JoinRefused(message, code="bad_request")


def _bad_grant(message: str) -> NoReturn:
    raise JoinRefused(f"the cluster's join answer is unusable: {message}", code="bad_grant")


def _decode_object(text: str | bytes, what: str, fail: Callable[[str], NoReturn]) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"{what} is not valid JSON: {exc}")
    if not isinstance(data, dict):
        fail(f"{what} must be a JSON object")
    return data


def _pem_field(data: dict[str, Any], name: str, label: str, what: str, fail: Callable[[str], NoReturn]) -> str:
    value = data.get(name)
    begin = f"-----BEGIN {label}-----"
    if not isinstance(value, str) or begin not in value or len(value) > MAX_PEM_CHARS:
        fail(f"{what}'s {name!r} must be a PEM text ({begin} ...) of at most {MAX_PEM_CHARS} characters")
    return value


@dataclass(frozen=True)
class JoinRequest:
    """What a joiner sends: its token's id and secret, its node id, a CSR for its key, where its etcd peer listens."""

    token_id: str
    secret: str = field(repr=False)
    node_id: str
    csr_pem: str
    address: str
    etcd_peer_port: int

    def to_json(self) -> str:
        """The request as compact JSON text."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> JoinRequest:
        """A request from JSON text; JoinRefused (code bad_request) naming the first problem otherwise."""
        what = "join request"
        data = _decode_object(text, what, _bad_request)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            _bad_request(f"{what} has unknown fields {unknown}; it takes exactly {names}")
        missing = [name for name in names if name not in data]
        if missing:
            _bad_request(f"{what} lacks the fields {missing}")
        for name in ("token_id", "secret", "node_id", "address"):
            if not isinstance(data[name], str):
                _bad_request(f"{what}'s {name!r} must be a string")
        try:
            # Checks the id's and the secret's form; the CA hash is the server's own business.
            JoinToken("0" * 64, data["token_id"], data["secret"])
        except TokenError as exc:
            _bad_request(exc.message)
        try:
            pki.check_node_id(data["node_id"])
        except pki.PkiError as exc:
            _bad_request(str(exc))
        csr_pem = _pem_field(data, "csr_pem", "CERTIFICATE REQUEST", what, _bad_request)
        try:
            ipaddress.ip_address(data["address"])
        except ValueError:
            _bad_request(f"{what}'s 'address' must be an IPv4 or IPv6 address, not {data['address'][:64]!r}")
        port = data["etcd_peer_port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            _bad_request(f"{what}'s 'etcd_peer_port' must be a port number from 1 to 65535, not {port!r}")
        return cls(data["token_id"], data["secret"], data["node_id"], csr_pem, data["address"], port)

    def token(self, ca_fingerprint: str) -> JoinToken:
        """The join token this request presents, for the cluster whose CA has `ca_fingerprint` (for tokens.check)."""
        return JoinToken(ca_fingerprint.removeprefix(pki.FINGERPRINT_PREFIX), self.token_id, self.secret)


@dataclass(frozen=True)
class JoinGrant:
    """What an admitted joiner gets: its certificate, the cluster CA certificate (and its key, for a box that is to
    hold it), the etcd membership."""

    cluster_id: str
    node_cert_pem: str
    ca_cert_pem: str
    ca_key_pem: str | None = field(repr=False)
    # etcd's --initial-cluster for the joiner's first start: "name=https://ip:port,...", the joiner included.
    initial_cluster: str
    role: Role
    leader: str | None
    members: list[str]
    # The voters' etcd client URLs (mutual TLS): a learner's own member serves no writes, so its agent uses these.
    client_urls: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The grant as compact JSON text."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> JoinGrant:
        """A grant from JSON text; JoinRefused (code bad_grant) naming the first problem otherwise.

        Fields it does not know are ignored, so that a newer cluster can add some without locking out older
        joiners (the grant is information for the joiner, not a request anyone acts on).
        """
        what = "join grant"
        data = _decode_object(text, what, _bad_grant)
        if not isinstance(data.get("cluster_id"), str) or not data["cluster_id"]:
            _bad_grant(f"{what}'s 'cluster_id' must be a non-empty string")
        member = data.get("role") != "client"  # a client runs no etcd member: it has no cluster to start with
        if not isinstance(data.get("initial_cluster"), str) or (member and not data["initial_cluster"]):
            _bad_grant(f"{what}'s 'initial_cluster' must be a non-empty string")
        node_cert_pem = _pem_field(data, "node_cert_pem", "CERTIFICATE", what, _bad_grant)
        ca_cert_pem = _pem_field(data, "ca_cert_pem", "CERTIFICATE", what, _bad_grant)
        ca_key_pem = (
            None if data.get("ca_key_pem") is None else _pem_field(data, "ca_key_pem", "PRIVATE KEY", what, _bad_grant)
        )
        role = data.get("role")
        if role not in ROLES:
            _bad_grant(f"{what}'s 'role' must be one of {list(ROLES)}, not {role!r}")
        leader = data.get("leader")
        if leader is not None and not isinstance(leader, str):
            _bad_grant(f"{what}'s 'leader' must be a node id or null")
        members = data.get("members")
        if not isinstance(members, list) or not all(isinstance(member, str) for member in members):
            _bad_grant(f"{what}'s 'members' must be a list of node ids")
        client_urls = data.get("client_urls", [])
        if not isinstance(client_urls, list) or not all(
            isinstance(url, str) and url.startswith("https://") for url in client_urls
        ):
            _bad_grant(f"{what}'s 'client_urls' must be a list of https URLs")
        if not member and not client_urls:
            _bad_grant(f"{what} makes this box a client but names no voter to reach the cluster through")
        return cls(
            data["cluster_id"],
            node_cert_pem,
            ca_cert_pem,
            ca_key_pem,
            data["initial_cluster"],
            role,
            leader,
            list(members),
            list(client_urls),
        )


def _url(host: str, port: int, path: str) -> URL:
    return URL.build(scheme="https", host=host, port=port, path=path)


def _unverified_context() -> ssl.SSLContext:
    # Only for fetching the CA: nothing this connection says is believed until it matches the token's pin.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def _read_limited(response: aiohttp.ClientResponse, limit: int, where: str) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > limit:
            raise JoinRefused(
                f"the cluster at {where} sent more than {limit} bytes for {response.url.path}; "
                "it is not a thox peer API",
                code="bad_answer",
            )
    return bytes(body)


def _unreachable(where: str, exc: BaseException, timeout: float) -> JoinRefused:
    if isinstance(exc, asyncio.TimeoutError):
        reason = f"no answer within {timeout:g} s"
    elif isinstance(exc, aiohttp.ClientSSLError):
        reason = f"the TLS handshake failed ({exc}); is this a thox peer port (5382)?"
    elif isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, socket.gaierror):
        reason = f"the host name does not resolve ({exc.os_error.strerror})"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        reason = os.strerror(errno).lower() if errno is not None and errno > 0 else str(exc.os_error)
    else:
        reason = str(exc) or type(exc).__name__
    return JoinRefused(
        f"cannot reach the cluster at {where}: {reason}; check the address and that the box is on and stacked",
        code="unreachable",
    )


def _is_certificate(pem: bytes) -> bool:
    try:
        pki.ca_fingerprint(pem)
    except pki.PkiError:
        return False
    return True


async def fetch_ca(host: str, port: int, *, timeout: float = 5.0) -> bytes:
    """The CA certificate (PEM) the peer API at host:port claims, fetched WITHOUT verifying it; pin it before use.

    JoinRefused(code unreachable) when nothing usable answers there.
    """
    where = host_port(host, port)
    context = await asyncio.to_thread(_unverified_context)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(_url(host, port, CA_PATH), ssl=context, allow_redirects=False) as response:
                body = await _read_limited(response, MAX_CA_BYTES, where)
                status = response.status
    except JoinRefused as exc:
        raise JoinRefused(exc.message, code="unreachable") from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise _unreachable(where, exc, timeout) from None
    if status != 200:
        raise JoinRefused(
            f"the cluster at {where} answered HTTP {status} to GET {CA_PATH}; it is not a thox peer API "
            "(or an older one)",
            code="unreachable",
        )
    if not await asyncio.to_thread(_is_certificate, body):
        raise JoinRefused(
            f"the cluster at {where} answered GET {CA_PATH} with something that is not a PEM certificate; "
            "it is not a thox peer API",
            code="unreachable",
        )
    return body


def _refusal(status: int, body: bytes, where: str) -> JoinRefused:
    try:
        error = json.loads(body)["error"]
        code, message = error["code"], error["message"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        code = message = None
    if not isinstance(code, str) or not isinstance(message, str):
        return JoinRefused(
            f"the cluster at {where} refused the join with HTTP {status} and no readable reason",
            code="bad_answer",
            status=status,
        )
    return JoinRefused(message, code=code, status=status)


def _check_grant(grant: JoinGrant, pinned_ca: bytes, node_id: str, key_pem: bytes) -> None:
    """Blocking (signature checks): pass if the grant is for us and from the pinned CA; JoinRefused otherwise."""
    pinned = pki.ca_fingerprint(pinned_ca)
    try:
        granted_ca = pki.ca_fingerprint(grant.ca_cert_pem.encode())
    except pki.PkiError as exc:
        _bad_grant(str(exc))
    if not hmac.compare_digest(granted_ca, pinned):
        _bad_grant(f"it carries another CA certificate ({granted_ca}) than the one the token pins ({pinned})")
    try:
        issued_to = pki.verify_node_cert(pinned_ca, grant.node_cert_pem.encode())
    except pki.PkiError as exc:
        _bad_grant(str(exc))
    if issued_to != node_id:
        _bad_grant(f"the certificate it issued is for node {issued_to!r}, not for this node {node_id!r}")
    if not pki.cert_matches_key(grant.node_cert_pem.encode(), key_pem):
        _bad_grant("the certificate it issued is not for this node's key")
    if grant.ca_key_pem is not None:
        try:
            pki.ClusterCA.load(pinned_ca, grant.ca_key_pem.encode())
        except pki.PkiError as exc:
            _bad_grant(str(exc))
    cluster_id = pki.cluster_id_of(pinned_ca)
    if grant.cluster_id != cluster_id:
        _bad_grant(f"it names cluster {grant.cluster_id!r}, but the pinned CA is cluster {cluster_id!r}")


def parse_server(server: str, default_port: int) -> tuple[str, int]:
    """ "host", "host:port" or "[v6]:port" -> (host, port); JoinRefused (bad_request) for anything else."""
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


async def join(
    host: str,
    port: int,
    token: JoinToken,
    *,
    node_id: str,
    key_pem: bytes,
    address: str,
    etcd_peer_port: int,
    timeout: float = 30.0,
) -> JoinGrant:
    """Join the cluster whose peer API listens at host:port, with `token`; the grant once checked.

    Raises TokenError(ca_mismatch) if the server is not the cluster the token pins (the secret is then never
    sent), JoinRefused if the cluster refuses or cannot be reached or answers something unusable, PkiError if
    `node_id` or `key_pem` are invalid. `timeout` bounds the whole exchange.
    """
    where = host_port(host, port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ca_pem = await fetch_ca(host, port, timeout=timeout)
    await asyncio.to_thread(check_pin, token, ca_pem)
    csr_pem = await asyncio.to_thread(pki.make_csr, key_pem, node_id)
    context = await asyncio.to_thread(pki.client_context_from_pem, ca_pem, None, None)
    request = JoinRequest(token.token_id, token.secret, node_id, csr_pem.decode("ascii"), address, etcd_peer_port)
    remaining = max(deadline - loop.time(), 0.001)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=remaining)) as session:
            async with session.post(
                _url(host, port, JOIN_PATH),
                data=request.to_json(),
                headers={"Content-Type": "application/json"},
                ssl=context,
                allow_redirects=False,
            ) as response:
                body = await _read_limited(response, MAX_GRANT_BYTES, where)
                status = response.status
    except aiohttp.ClientConnectorCertificateError:
        # The server sent the pinned CA certificate but proves its identity with a certificate that CA did not
        # issue: someone relays the real CA. The handshake failed before the request, so the secret stayed here.
        raise TokenError(
            f"the server at {where} sent this cluster's CA certificate but its own TLS certificate was not issued "
            "by that CA; someone may be intercepting the join. The secret was not sent",
            code="ca_mismatch",
        ) from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        refused = _unreachable(where, exc, remaining)
        # The request may have been delivered and the token consumed before the connection was lost.
        raise JoinRefused(
            f"{refused.message}. The cluster may have admitted this node anyway; if retrying says the token was "
            "used, ask for a new token",
            code="unreachable",
        ) from None
    if status != 200:
        raise _refusal(status, body, where)
    grant = JoinGrant.from_json(body)
    await asyncio.to_thread(_check_grant, grant, ca_pem, node_id, key_pem)
    return grant


async def forward(
    session: aiohttp.ClientSession, base_url: str, request: JoinRequest, *, timeout: float = 30.0
) -> JoinGrant:
    """Relay a join request to the peer API at `base_url` (a box holding the CA key) over the session's mutual TLS;
    its grant, or its refusal as a JoinRefused with the same code and status."""
    where = base_url.removeprefix("https://")
    try:
        async with session.post(
            f"{base_url}{JOIN_PATH}",
            data=request.to_json(),
            headers={"Content-Type": "application/json"},
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            body = await _read_limited(response, MAX_GRANT_BYTES, where)
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        refused = _unreachable(where, exc, timeout)
        raise JoinRefused(
            f"the box holding the cluster CA could not be asked: {refused.message}",
            code="cluster_unavailable",
            status=503,
        ) from None
    if status != 200:
        raise _refusal(status, body, where)
    return JoinGrant.from_json(body)
