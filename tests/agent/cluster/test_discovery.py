"""mDNS discovery between two boxes (one process, real multicast on this machine's interfaces)."""

from __future__ import annotations

import asyncio

from agent.cluster.discovery import Discovery
from tests.waiting import until

CA_A, CA_B = "a" * 64, "b" * 64


async def test_a_box_finds_the_peer_of_the_cluster_a_token_pins() -> None:
    first, second, finder = Discovery(), Discovery(), Discovery()
    try:
        await first.start(
            node_id="box-a",
            address="127.0.0.1",
            peer_port=15382,
            inference_port=18080,
            cluster_id="stack-a",
            ca_hash=CA_A,
        )
        await second.start(
            node_id="box-b",
            address="127.0.0.1",
            peer_port=25382,
            inference_port=28080,
            cluster_id="stack-b",
            ca_hash=CA_B,
        )
        await finder.start(
            node_id="box-c",
            address="127.0.0.1",
            peer_port=35382,
            inference_port=38080,
            cluster_id="stack-c",
            ca_hash="c" * 64,
        )
        peer = await finder.find(CA_B, timeout=10)
        assert peer is not None and (peer.node_id, peer.port, peer.cluster_id) == ("box-b", 25382, "stack-b")
        assert await finder.find("d" * 64, timeout=0.5) is None  # nobody of that cluster: None, not a wrong box
        await second.stop()  # a goodbye: the peer is forgotten at once
        await until(
            lambda: all(p.ca_hash != CA_B for p in finder.peers.values()), "the peer forgotten after its goodbye"
        )
    finally:
        for discovery in (first, second, finder):
            await discovery.stop()


async def test_a_stop_during_a_start_is_orderly() -> None:
    # A join stops discovery while the first start may still be probing its names (a race that once stopped
    # the whole agent with an AttributeError).
    discovery = Discovery()
    starting = asyncio.ensure_future(
        discovery.start(
            node_id="box-r",
            address="127.0.0.1",
            peer_port=45382,
            inference_port=48080,
            cluster_id="stack-r",
            ca_hash="e" * 64,
        )
    )
    await asyncio.sleep(0)
    await discovery.stop()
    await starting
    await discovery.stop()
