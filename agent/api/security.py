"""The security middleware both APIs run after request ids: source address, Host/Origin, API key, scope, rate.

Order matters: refuse what must never be served (a public address, a foreign Host) before spending a hash on a
key, and check the key before the rate limit so that a keyed client is counted by its key, wherever it connects
from. Errors are AgentErrors, so the request-context middleware outside this one turns them into the envelope.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.errors import AuthenticationError, HardwareUnavailableError, PermissionDeniedError, RateLimitError
from agent.security.key_rules import Scope
from agent.security.keys import KeyStore
from agent.security.policy import AllowList, AuthPolicy, HostCheck, client_class, needs_key
from agent.security.ratelimit import Decision, TokenBucketLimiter, address_bucket_key, key_bucket_key
from agent.settings import ApiSettings

log = structlog.get_logger("agent.api.security")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RATE_DECISION_KEY = web.RequestKey("rate_decision", Decision)
# Who is asking, for audits (MCP tool calls): "key:<id>" for a keyed request, else "address:<peer>".
CALLER_KEY = web.RequestKey("caller", str)


@dataclass(frozen=True)
class AccessRules:
    """The settings-derived part of a policy: replaced whole when the configuration is reloaded."""

    auth: AuthPolicy
    allow: AllowList
    hosts: HostCheck
    limit_loopback: bool
    rate_per_minute: int

    @classmethod
    def from_settings(cls, api: ApiSettings, scope: Scope) -> AccessRules:
        """The rules of the API that needs `scope`; raises PolicyError (a ValueError) for unusable settings."""
        return cls(
            auth=api.auth,
            allow=AllowList.parse(api.allow),
            hosts=device_host_check(api.allowed_hosts),
            limit_loopback=api.rate_limit_loopback,
            rate_per_minute=api.rate_limit if scope == "inference" else api.cluster_rate_limit,
        )


class SecurityPolicy:
    """What one API enforces: its rules, the key store, the scope a key needs and its rate limiter."""

    def __init__(
        self, rules: AccessRules, keys: KeyStore, scope: Scope, open_paths: frozenset[str] = frozenset()
    ) -> None:
        self.rules = rules
        self.keys = keys
        self.scope = scope  # the scope a key needs here: "inference" on 8080, "admin" on 5381
        self.open_paths = open_paths  # served without a key (health), still address- and host-checked
        self.limiter = TokenBucketLimiter(rules.rate_per_minute)

    def reconfigure(self, rules: AccessRules) -> None:
        """Switch to new rules; clients keep their buckets (a lower limit applies to what they have left)."""
        if rules.rate_per_minute != self.rules.rate_per_minute:
            self.limiter.set_rate(rules.rate_per_minute)
        self.rules = rules


def device_host_check(extra_names: str) -> HostCheck:
    """Host/Origin check for this device: its hostname plus the configured extra names."""
    names = [socket.gethostname(), *(n.strip() for n in extra_names.split(",") if n.strip())]
    return HostCheck(names)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("the Authorization header must be `Bearer <API key>`", code="invalid_api_key")
    return token.strip()


def security_middleware(policy: SecurityPolicy) -> Middleware:
    """An aiohttp middleware enforcing `policy`."""

    @web.middleware
    async def security(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.remote or ""
        rules = policy.rules  # one consistent set for the whole request, even if a reload swaps them meanwhile
        if not rules.allow.allows(peer):
            raise PermissionDeniedError(f"requests from {peer} are not allowed (api.allow)", code="address_not_allowed")
        refusal = rules.hosts.check(request.headers.get("Host"), request.headers.get("Origin"))
        if refusal is not None:
            raise PermissionDeniedError(refusal, code="host_not_allowed")
        key_id: str | None = None
        # A client that needs no key (this device itself under "remote", everyone under "off") is not judged by
        # the Authorization it sends: SDKs insist on sending some key, often a placeholder such as "unused".
        if needs_key(rules.auth, peer) and request.path not in policy.open_paths:
            token = _bearer(request)
            if token is None:
                raise AuthenticationError(
                    "this request needs an API key: send `Authorization: Bearer <key>` "
                    "(create one with `thox api-key generate`)",
                    code="missing_api_key",
                )
            # One stat() when nothing changed; a key revoked or regenerated by the CLI stops working at once.
            await asyncio.to_thread(policy.keys.reload_if_changed)
            if policy.keys.error is not None:
                raise HardwareUnavailableError(
                    f"the API key store cannot be read: {policy.keys.error}", code="key_store_unreadable"
                )
            record = policy.keys.verify(token)
            if record is None:
                raise AuthenticationError("the API key is not valid (wrong, revoked or regenerated)")
            if not record.allows(policy.scope) and request.path not in policy.open_paths:
                raise PermissionDeniedError(
                    f"key {record.id} has scope {record.scope!r}; this API needs {policy.scope!r}",
                    code="insufficient_scope",
                )
            policy.keys.touch_last_used(record.id)
            key_id = record.id
        request[CALLER_KEY] = f"key:{key_id}" if key_id else f"address:{peer}"
        if rules.limit_loopback or client_class(peer) != "loopback":
            decision = policy.limiter.check(key_bucket_key(key_id) if key_id else address_bucket_key(peer))
            if not decision.allowed:
                raise RateLimitError(
                    f"rate limit of {decision.limit} requests per minute reached; retry after "
                    f"{decision.retry_after_header} s",
                    retry_after=decision.retry_after_header,
                    headers=decision.headers(),
                )
            request[RATE_DECISION_KEY] = decision
        return await handler(request)

    return security


async def add_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: x-ratelimit-* on every counted response, streams included."""
    decision = request.get(RATE_DECISION_KEY)
    if decision is not None:
        response.headers.update(decision.headers())
