"""The peer API (port 5382): what agents of one cluster, and boxes joining it, ask each other over TLS.

The server's TLS context asks for a client certificate but does not insist (CERT_OPTIONAL): a joiner has no
certificate yet. A certificate that is presented must verify against the cluster CA, or the handshake fails.
Above TLS, `_require_node` lets only the open routes (the CA certificate and the join endpoint) through without a
certificate; every other route needs one the cluster CA issued, and sees the caller's node id.

Routes:

- GET  /cluster/ca    open: the cluster CA certificate (PEM, text/plain), which a joiner pins against its token.
- POST /cluster/join  open: a `JoinRequest`; the `JoinAuthority` admits it (`JoinGrant`) or refuses it.
- GET  /cluster/ping  members only: `{"node_id": <the caller's node id>}`.
- GET  /cluster/ca-key  members only: the cluster CA's key (PEM), for a caller that should hold it
  (agent/cluster/ca_custody.py); 403 not_entitled for any other, 503 no_ca_key from a box that holds none.
- GET  /cluster/models/<id>               members only: a model's manifest record and files (agent/models/pull.py).
- GET  /cluster/models/<id>/files/<path>  members only: one file of it (Range requests resume a copy).
- /inference/...      members only: this box's OpenAI API, for requests other boxes route here.

Errors are `{"error": {"message", "type", "param", "code"}}` like the agent's other APIs.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from agent.api.server import EnvelopeAppRunner
from agent.cluster import pki
from agent.cluster.ca_custody import CA_KEY_PATH, CaKeyRefused
from agent.cluster.join import CA_PATH, JOIN_PATH, PING_PATH, JoinGrant, JoinRefused, JoinRequest
from agent.errors import ThoxError
from agent.models import pull
from agent.models.store import InstalledModel, ModelStore

log = structlog.get_logger("agent.cluster.peer")

# A join request is a CSR and a few short strings (about 1 KiB); nothing on this API needs more.
MAX_REQUEST_BYTES = 64 * 1024
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
# Set on every request that passed `_require_node`: the caller's node id (CN of its verified certificate).
PEER_NODE_ID = web.RequestKey("peer_node_id", str)

_ROUTE_CA = "cluster-ca"
_ROUTE_JOIN = "cluster-join"
_ROUTE_PING = "cluster-ping"
_OPEN_ROUTES = frozenset({_ROUTE_CA, _ROUTE_JOIN})

# The same types as agent.errors.ClusterRequestError uses for these statuses.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class JoinAuthority(Protocol):
    """Decides joins: checks and consumes the token, signs the CSR, adds the joiner to etcd."""

    async def admit(self, request: JoinRequest) -> JoinGrant:
        """The grant for an admitted joiner; JoinRefused (with its code and status) when it may not join."""
        ...


class CaKeySource(Protocol):
    """Hands the CA key to the boxes that should hold it (agent/cluster/ca_custody.py)."""

    async def ca_key_for(self, caller: str) -> bytes:
        """The key for the box `caller`; CaKeyRefused (with its code and status) when it may not have it."""
        ...


def error_response(status: int, code: str, message: str) -> web.Response:
    """The peer API's JSON error envelope."""
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": None, "code": code}}
    return web.json_response(body, status=status)


@web.middleware
async def _envelopes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (no such route, wrong method, body too large) in the JSON envelope."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        messages = {
            404: f"the peer API has no route {request.path}",
            405: f"{request.path} does not take {request.method}",
            413: f"the request body is larger than the peer API's limit of {MAX_REQUEST_BYTES} bytes",
        }
        response = error_response(exc.status, code, messages.get(exc.status, exc.reason))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def _verified_node_id(ca_cert_pem: bytes, ssl_object: ssl.SSLObject, der: bytes) -> str:
    """Blocking (signature check): the caller's node id if the cluster CA issued its certificate; PkiError if not."""
    pem = ssl.DER_cert_to_PEM_cert(der).encode("ascii")
    # The handshake verified the certificate against whatever the server context trusts; the check here ties it
    # to this cluster's CA whatever context the app is served with, and gives a precise reason when it fails.
    node_id = pki.verify_node_cert(ca_cert_pem, pem)
    if pki.peer_node_id(ssl_object) != node_id:
        raise pki.PkiError("the peer's certificate names two different node ids")
    return node_id


INFERENCE_PREFIX = "/inference"


def _require_node(ca_cert_pem: bytes) -> Middleware:
    verified: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()

    @web.middleware
    async def require_node(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Decided by the route that will run, not by the path text, so no spelling of a path sneaks past.
        if request.match_info.route.name in _OPEN_ROUTES:
            return await handler(request)
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
        if not der or not isinstance(ssl_object, ssl.SSLObject):
            return error_response(
                401,
                "client_certificate_required",
                f"{request.path} is for cluster members: connect with this cluster's node certificate "
                f"(only {CA_PATH} and {JOIN_PATH} are open)",
            )
        try:
            # Once per TLS connection, not per request: a routed stream must not pay a signature check each time.
            node_id = verified.get(ssl_object)
            if node_id is None:
                node_id = await asyncio.to_thread(_verified_node_id, ca_cert_pem, ssl_object, der)
                verified[ssl_object] = node_id
        except pki.PkiError as exc:
            log.warning("peer_refused", path=request.path, peer=request.remote, error=str(exc))
            return error_response(
                403, "client_certificate_untrusted", f"the client certificate is not from this cluster: {exc}"
            )
        request[PEER_NODE_ID] = node_id
        return await handler(request)

    return require_node


class _Routes:
    def __init__(self, authority: JoinAuthority, ca_cert_pem: bytes) -> None:
        self._authority = authority
        self._ca_cert_pem = ca_cert_pem

    async def ca(self, request: web.Request) -> web.Response:
        return web.Response(body=self._ca_cert_pem, content_type="text/plain")

    async def join(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return error_response(
                400, "bad_request", f"a join request must be application/json, not {request.content_type!r}"
            )
        if (request.content_length or 0) > MAX_REQUEST_BYTES:
            return error_response(
                413, "request_too_large", f"the request body is larger than the join limit of {MAX_REQUEST_BYTES} bytes"
            )
        raw = await request.read()  # over the app's limit: 413 from aiohttp, enveloped by _envelopes
        if len(raw) > MAX_REQUEST_BYTES:
            return error_response(
                413, "request_too_large", f"the request body is larger than the join limit of {MAX_REQUEST_BYTES} bytes"
            )
        peer = request.remote
        try:
            join_request = JoinRequest.from_json(raw)
        except JoinRefused as exc:
            log.info("join_refused", code=exc.code, peer=peer, reason=exc.message)
            return error_response(exc.status, exc.code, exc.message)
        who = {"node_id": join_request.node_id, "token_id": join_request.token_id, "peer": peer}
        try:
            grant = await self._authority.admit(join_request)
        except JoinRefused as exc:
            log.info("join_refused", code=exc.code, reason=exc.message, **who)
            return error_response(exc.status, exc.code, exc.message)
        except Exception:
            # A fault of ours, not the joiner's: a 500 the joiner can show, the traceback in our log.
            log.exception("join_failed", **who)
            return error_response(
                500, "internal_error", "the cluster failed while admitting this node; see the cluster's log"
            )
        log.info("join_admitted", role=grant.role, address=join_request.address, **who)
        return web.json_response(text=grant.to_json())

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({"node_id": request[PEER_NODE_ID]})


class _CaKey:
    def __init__(self, source: CaKeySource) -> None:
        self._source = source

    async def get(self, request: web.Request) -> web.Response:
        try:
            key = await self._source.ca_key_for(request[PEER_NODE_ID])
        except CaKeyRefused as exc:
            return error_response(exc.status, exc.code, exc.message)
        return web.Response(body=key, content_type="text/plain", headers={"Cache-Control": "no-store"})


class _ModelFiles:
    """Serves this box's model store to members that copy a model (`agent/models/pull.py`)."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store

    async def _model(self, request: web.Request) -> InstalledModel:
        model = await asyncio.to_thread(self._store.get, request.match_info["model"])
        if model is None:
            raise _NotHere(f"this box's store has no model {request.match_info['model']!r}")
        return model

    async def listing(self, request: web.Request) -> web.Response:
        try:
            model = await self._model(request)
        except _NotHere as exc:
            return error_response(404, "model_not_found", str(exc))
        return web.json_response(await asyncio.to_thread(pull.listing, self._store, model))

    async def file(self, request: web.Request) -> web.StreamResponse:
        try:
            model = await self._model(request)
        except _NotHere as exc:
            return error_response(404, "model_not_found", str(exc))
        path = await asyncio.to_thread(pull.served_file, model, request.match_info["path"])
        if path is None:
            return error_response(404, "not_found", f"{model.id} has no file {request.match_info['path']!r}")
        log.info("model_file_served", model=model.id, to=request[PEER_NODE_ID], range=request.headers.get("Range"))
        return web.FileResponse(path)


class _NotHere(ThoxError):
    pass


def build_peer_app(
    authority: JoinAuthority,
    ca_cert_pem: bytes,
    inference: web.Application | None = None,
    store: ModelStore | None = None,
    ca_keys: CaKeySource | None = None,
) -> web.Application:
    """The peer API app: serve it with `serve_peer_api` and a CERT_OPTIONAL server context from the cluster CA.

    `inference`, when given, is this box's OpenAI API mounted at INFERENCE_PREFIX for other members: requests
    routed here by another box's router arrive over mutual TLS, so the cluster certificate stands in for a key.
    """
    # aiohttp applies the served app's body limit to every route, so with inference mounted it is the inference
    # API's; the open join route keeps its own small limit (checked in the handler).
    limit = max(MAX_REQUEST_BYTES, inference._client_max_size if inference is not None else 0)
    app = web.Application(client_max_size=limit, middlewares=[_envelopes, _require_node(ca_cert_pem)])
    routes = _Routes(authority, ca_cert_pem)
    app.router.add_get(CA_PATH, routes.ca, name=_ROUTE_CA, allow_head=False)
    app.router.add_post(JOIN_PATH, routes.join, name=_ROUTE_JOIN)
    app.router.add_get(PING_PATH, routes.ping, name=_ROUTE_PING, allow_head=False)
    if ca_keys is not None:
        app.router.add_get(CA_KEY_PATH, _CaKey(ca_keys).get, allow_head=False)
    if store is not None:
        files = _ModelFiles(store)
        app.router.add_get(f"{pull.MODELS_PATH}/{{model}}", files.listing, allow_head=False)
        app.router.add_get(f"{pull.MODELS_PATH}/{{model}}/files/{{path:.+}}", files.file, allow_head=False)
    if inference is not None:
        app.add_subapp(INFERENCE_PREFIX, inference)
    return app


@asynccontextmanager
async def serve_peer_api(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> AsyncIterator[int]:
    """Serve `app` over TLS on host:port (0 picks a free port) while inside; yields the bound port."""
    # No handler_cancellation: a joiner that hangs up must not cut an admission short between consuming its
    # token and adding it to etcd.
    runner = EnvelopeAppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound = int(runner.addresses[0][1])
        log.info("peer_api_listening", host=host, port=bound)
        yield bound
    finally:
        await runner.cleanup()
        log.info("peer_api_stopped", host=host, port=port)
