"""etcd clients over mutual TLS: every client listener of every member requires a cluster certificate.

aetcd 1.0 opens only insecure channels, so `TlsEtcdClient` opens a gRPC channel with the node's cluster
certificate. The agent reaches its own member on loopback this way (a local user without the node's key cannot
read or write cluster state), and `VoterEtcdClient` reaches a voter's client port on another box: a learner answers
neither writes nor linearizable reads, and boxes beyond the single learner etcd 3.4 allows run no member at all.

gRPC checks the server certificate against the name dialled. Every node certificate carries its node id as a DNS
name and its address as an IP SAN: the loopback channel names the member's node id (`server_name`), the channels
to voters dial one voter by IP each. `VoterEtcdClient.rotate()` moves to the next voter when the current one stops
answering; the caller (ClusterNode) decides when.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aetcd
import grpc
import structlog
from aetcd import rpc
from aetcd.watcher import Watcher

from agent.cluster.net import host_port

log = structlog.get_logger("agent.cluster.etcd")

# Reconnect fast after an etcd restart instead of gRPC's default backoff, which grows to two minutes and would keep
# the agent off a member that is long back.
GRPC_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


@dataclass(frozen=True)
class ClientTls:
    """The cluster CA and this node's certificate and key, as PEM bytes."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def split_endpoint(url: str) -> tuple[str, int]:
    """'https://10.0.0.5:5385' -> ('10.0.0.5', 5385)."""
    rest = url.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


class TlsEtcdClient(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type information
    """aetcd's client over mutual TLS to one of `endpoints` (the first until told otherwise)."""

    def __init__(self, endpoints: list[str], tls: ClientTls, *, timeout: float, server_name: str | None = None) -> None:
        if not endpoints:
            raise ValueError("no etcd client endpoints to connect to")
        host, port = split_endpoint(endpoints[0])
        options: dict[str, int | str] = dict(GRPC_OPTIONS)
        if server_name is not None:
            options["grpc.ssl_target_name_override"] = server_name
        super().__init__(host=host, port=port, timeout=timeout, options=options)
        self.endpoints = list(endpoints)
        self._index = 0
        self._credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca_pem, private_key=tls.key_pem, certificate_chain=tls.cert_pem
        )

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._index]

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        host, port = split_endpoint(self.endpoint)
        self.channel = rpc.secure_channel(host_port(host, port), self._credentials, options=self._options.items())
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


class VoterEtcdClient(TlsEtcdClient):
    """The client of a box whose own member cannot serve it: one of the voters' client ports at a time."""

    async def rotate(self) -> str:
        """Close the channel and dial the next voter; returns its URL."""
        await self.close()
        self._index = (self._index + 1) % len(self.endpoints)
        await self.connect()
        log.info("etcd_client_rotated", endpoint=self.endpoint)
        return self.endpoint

    async def use_endpoints(self, endpoints: list[str]) -> None:
        """Adopt a fresh list of voters' URLs (membership changed); reconnects only if the current one left."""
        if not endpoints or endpoints == self.endpoints:
            return
        current = self.endpoint
        self.endpoints = list(endpoints)
        if current in self.endpoints:
            self._index = self.endpoints.index(current)
            return
        self._index = 0
        await self.close()
        await asyncio.shield(self.connect())
