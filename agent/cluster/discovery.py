"""mDNS: this box as `thox.local`, its OpenAI API and its cluster peer API; finding the peers of a cluster.

Advertised (python-zeroconf): `<node>._thox-cluster._tcp.local.` on the peer port with TXT `node`, `cluster`, `ca`
(the CA fingerprint a join token pins), and `<node>._http._tcp.local.` for the OpenAI API with TXT `path=/v1`;
both name `thox.local.` as their host, the name the product docs use (every box in a stack answers to it, and any
of them routes). Discovery only finds boxes: whether one is alive is the etcd leases' business, because a yanked
box sends no mDNS goodbye. Peers are resolved in the add handler; a peer that says goodbye vanishes at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import structlog
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from common.aio import wait_for

log = structlog.get_logger("agent.cluster.discovery")

CLUSTER_SERVICE = "_thox-cluster._tcp.local."
HTTP_SERVICE = "_http._tcp.local."
HOST_NAME = "thox.local."
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Peer:
    """A box found by mDNS: where its peer API is and which cluster (CA) it belongs to."""

    node_id: str
    address: str
    port: int
    cluster_id: str
    ca_hash: str  # hex SHA-256 of the cluster CA certificate, as in join tokens


def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


class Discovery:
    """Advertises this box and keeps the peers it hears about."""

    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()  # a join stops and restarts discovery while the first start may still probe

    async def start(
        self, *, node_id: str, address: str, peer_port: int, inference_port: int, cluster_id: str, ca_hash: str
    ) -> None:
        """Advertise this box and start listening for others (restart with new facts after a join)."""
        async with self._lock:
            await self._stop()
            await self._start(node_id, address, peer_port, inference_port, cluster_id, ca_hash)

    async def _start(
        self, node_id: str, address: str, peer_port: int, inference_port: int, cluster_id: str, ca_hash: str
    ) -> None:
        self._zeroconf = zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only if ":" not in address else IPVersion.All)
        packed = [_packed(address)]
        services = [
            AsyncServiceInfo(
                CLUSTER_SERVICE,
                f"{node_id}.{CLUSTER_SERVICE}",
                addresses=packed,
                port=peer_port,
                properties={"node": node_id, "cluster": cluster_id, "ca": ca_hash},
                server=HOST_NAME,
            ),
            AsyncServiceInfo(
                HTTP_SERVICE,
                f"{node_id}.{HTTP_SERVICE}",
                addresses=packed,
                port=inference_port,
                properties={"path": "/v1", "node": node_id},
                server=HOST_NAME,
            ),
        ]
        for info in services:
            # Another box of the stack uses the same host name; only service names must be unique.
            await zeroconf.async_register_service(info, allow_name_change=True)
        self._browser = AsyncServiceBrowser(zeroconf.zeroconf, [CLUSTER_SERVICE], handlers=[self._on_change])
        log.info("mdns_advertised", node=node_id, host=HOST_NAME, peer_port=peer_port, inference_port=inference_port)

    async def stop(self) -> None:
        """Withdraw the advertisements (a goodbye) and stop listening."""
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        for task in list(self._resolving):
            task.cancel()
        await asyncio.gather(*self._resolving, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zeroconf is not None:
            await self._zeroconf.async_unregister_all_services()
            await self._zeroconf.async_close()
            self._zeroconf = None
        self.peers.clear()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            self.peers.pop(name, None)
            return
        task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            return
        text = {key.decode(): (value or b"").decode() for key, value in info.properties.items()}
        addresses = info.parsed_addresses()
        if not addresses or not info.port or not text.get("ca"):
            return
        self.peers[name] = Peer(text.get("node", name), addresses[0], info.port, text.get("cluster", ""), text["ca"])
        self._changed.set()

    async def find(self, ca_hash: str, timeout: float) -> Peer | None:
        """A box of the cluster with this CA, waiting up to `timeout` seconds for one to be heard."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            match = next((peer for peer in self.peers.values() if peer.ca_hash == ca_hash), None)
            remaining = deadline - loop.time()
            if match is not None or remaining <= 0:
                return match
            self._changed.clear()
            try:
                await wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return None
