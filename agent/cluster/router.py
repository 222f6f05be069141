"""Routing inference requests to the box that holds the model: least outstanding requests, prefix affinity.

A request that arrives at this box's port 8080 for a model it does not serve is forwarded to a live replica over
the peer API (mutual TLS), and the answer is streamed back byte for byte. The choice is the replica with the
fewest requests in flight (what it last published plus what this box has sent it since), except that a multi-turn
chat goes back to the replica that served its earlier turns (its prompt prefix is cached there) unless that one
is clearly busier. Only nodes whose records are live are candidates: a record disappears when its lease expires.

A client that disconnects cancels the handler, which closes the upstream connection, which ends the generation
on the replica. A replica that fails mid-stream ends the client's stream with an error event.

The WebSocket stream routes each of its requests the same way, as a streamed chat completion whose events it
relays (`stream_events`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import ssl
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from agent.cluster.net import host_port
from agent.cluster.peer import INFERENCE_PREFIX
from agent.errors import ClusterUnavailableError

log = structlog.get_logger("agent.cluster.router")

ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
# Stick to the replica that served a chat's earlier turns unless it has this many more requests in flight than
# the least busy one (SGLang's cache-aware router balances at a similar absolute threshold).
AFFINITY_SLACK = 4
AFFINITY_ENTRIES = 4096
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=300)
_FORWARDED_HEADERS = ("Content-Type", "Accept", "X-Request-ID")
_ANSWER_HEADERS = ("Content-Type", "Cache-Control", "X-Request-ID")


def affinity_key(body: Mapping[str, Any]) -> str | None:
    """A conversation's identity: its first system and user messages (the same on every turn)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) < 3:
        return None  # a first turn has no cached prefix worth following
    head = [m for m in messages[:2] if isinstance(m, dict)]
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()


class Router:
    """Picks a replica among the live node records and forwards requests to it."""

    def __init__(
        self,
        self_id: Callable[[], str],
        live_nodes: Callable[[], Mapping[str, Mapping[str, Any]]],
        client_ssl: Callable[[], ssl.SSLContext | None],
    ) -> None:
        self._self_id = self_id
        self._live_nodes = live_nodes
        self._client_ssl = client_ssl
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._affinity: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._session_ssl: ssl.SSLContext | None = None

    def has_peers(self) -> bool:
        """Whether any other box is live (else nothing can be routed and requests need no inspection)."""
        me = self._self_id()
        return any(node_id != me for node_id in self._live_nodes())

    def pick(self, model: str, body: Mapping[str, Any], below: int | None = None) -> Mapping[str, Any] | None:
        """The replica to send this request to, or None when no other live node serves the model (with fewer than
        `below` requests in flight, when given: a saturated box hands work only to a less busy one)."""
        me = self._self_id()

        def load(node: Mapping[str, Any]) -> int:
            published = int((node.get("load") or {}).get("active_streams") or 0)
            return published + self.in_flight[str(node["id"])]

        replicas = [
            n
            for node_id, n in self._live_nodes().items()
            if node_id != me
            and model in n.get("models", [])
            and n.get("peer_port")
            and (below is None or load(n) < below)
        ]
        if not replicas:
            return None

        chosen = min(replicas, key=lambda n: (load(n), str(n["id"])))
        key = affinity_key(body)
        if key is not None:
            sticky = next((n for n in replicas if n["id"] == self._affinity.get(key)), None)
            if sticky is not None and load(sticky) <= load(chosen) + AFFINITY_SLACK:
                chosen = sticky
            self._affinity[key] = str(chosen["id"])
            self._affinity.move_to_end(key)
            while len(self._affinity) > AFFINITY_ENTRIES:
                self._affinity.popitem(last=False)
        return chosen

    def session(self) -> aiohttp.ClientSession:
        """The connection pool to other boxes' peer APIs (this box's cluster certificate as client identity)."""
        context = self._client_ssl()
        if context is None:
            raise ClusterUnavailableError("this box has no cluster certificate to reach other boxes with")
        if self._session is None or self._session.closed or context is not self._session_ssl:
            # A new identity (after a join) needs a new connection pool; ClusterNode closes the old one first.
            # No cookies and no decompression: answers pass through byte for byte, with nothing done per request
            # that a proxy hop does not need.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
            self._session_ssl = context
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @contextlib.contextmanager
    def _sending_to(self, node_id: str) -> Iterator[None]:
        """Counts a request in flight to `node_id` while it lasts (the next pick sees it before the node says)."""
        self.in_flight[node_id] += 1
        try:
            yield
        finally:
            self.in_flight[node_id] -= 1
            if self.in_flight[node_id] <= 0:
                del self.in_flight[node_id]

    async def forward(self, request: web.Request, node: Mapping[str, Any], body: bytes) -> web.StreamResponse:
        """Send the request to `node` and stream its answer back as it comes."""
        with self._sending_to(str(node["id"])):
            return await self._forward(request, node, body)

    async def _forward(self, request: web.Request, node: Mapping[str, Any], body: bytes) -> web.StreamResponse:
        node_id = str(node["id"])
        url = _url(node, request.path_qs)
        headers = {name: request.headers[name] for name in _FORWARDED_HEADERS if name in request.headers}
        headers["X-Forwarded-For"] = request.remote or ""
        response: web.StreamResponse | None = None
        try:
            async with self.session().post(url, data=body, headers=headers, timeout=_TIMEOUT) as upstream:
                response = web.StreamResponse(
                    status=upstream.status,
                    headers={name: upstream.headers[name] for name in _ANSWER_HEADERS if name in upstream.headers},
                )
                response.headers["X-Thox-Node"] = node_id
                if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                    response.headers["X-Accel-Buffering"] = "no"
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "routed_request_failed",
                node=node_id,
                error=f"{type(exc).__name__}: {exc}",
                started=response is not None,
            )
            if response is None:
                raise ClusterUnavailableError(
                    f"the box serving this model ({node_id}) did not answer: {exc}", code="replica_unavailable"
                ) from exc
            if response.headers.get("Content-Type", "").startswith("text/event-stream"):
                await response.write(f"data: {json.dumps(_replica_lost(node_id))}\n\n".encode())
            return response

    async def stream_events(
        self, node: Mapping[str, Any], path: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> AsyncGenerator[dict[str, Any], None]:
        """POST a streamed request to `node` and yield its server-sent events as JSON objects, up to `[DONE]`.

        A refusal by the replica (its 4xx/5xx envelope) and a replica lost mid-stream come as one `{"error": ...}`
        event, as on the SSE path; a replica that cannot be reached at all is a ClusterUnavailableError.
        """
        node_id = str(node["id"])
        started = False
        with self._sending_to(node_id):
            try:
                async with self.session().post(
                    _url(node, path), json=dict(body), headers=dict(headers), timeout=_TIMEOUT
                ) as upstream:
                    started = True
                    if upstream.status != 200:
                        yield json.loads(await upstream.read())
                        return
                    async for line in upstream.content:
                        if not line.startswith(b"data: "):
                            continue
                        data = line[len(b"data: ") :].strip()
                        if data == b"[DONE]":
                            return
                        yield json.loads(data)
                    yield _replica_lost(node_id)  # the stream ended without [DONE]
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.warning(
                    "routed_request_failed", node=node_id, error=f"{type(exc).__name__}: {exc}", started=started
                )
                if not started:
                    raise ClusterUnavailableError(
                        f"the box serving this model ({node_id}) did not answer: {exc}", code="replica_unavailable"
                    ) from exc
                yield _replica_lost(node_id)


def _url(node: Mapping[str, Any], path_qs: str) -> str:
    return f"https://{host_port(str(node['address']), int(node['peer_port']))}{INFERENCE_PREFIX}{path_qs}"


def _replica_lost(node_id: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"the box serving this stream ({node_id}) went away",
            "type": "server_error",
            "param": None,
            "code": "replica_lost",
        }
    }
