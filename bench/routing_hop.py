"""The cost of the routing hop itself: the entry box's middleware chain and router, with nothing else running.

Usage:
  .venv/bin/python -m bench.routing_hop [--requests 500]

bench/cluster.py measures routing through real agents; on a small machine that figure also holds the scheduling
of three agents, three etcd members and their engines competing for the cores. This isolates what the hop adds:
one process runs an upstream that answers a streamed chat request at once (over the peer API's mutual TLS, and
over plain HTTP for the direct path), a front server with the agent's middleware chain on 8080 (request ids,
access policy with default settings, `Routing.middleware` with the real `Router`), and the client. Time to first body byte, direct versus through the hop, p50 each, alternating. Results also go to
bench/results/routing_hop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from agent.api.middleware import request_context
from agent.api.routing import Routing
from agent.api.security import AccessRules, SecurityPolicy, add_rate_headers, security_middleware
from agent.cluster import pki
from agent.cluster.peer import INFERENCE_PREFIX
from agent.cluster.pki import ClusterCA, NodeKey, make_csr
from agent.cluster.router import Router
from agent.security.keys import KeyStore
from agent.settings import ApiSettings
from bench.cluster import save_report

RESULTS = Path(__file__).parent / "results" / "routing_hop.json"
PATH = "/v1/chat/completions"


def _credentials(ca: ClusterCA, node_id: str) -> tuple[bytes, bytes]:
    key = NodeKey.create()
    return key, ca.issue(make_csr(key, node_id), node_id, ["127.0.0.1"], [])


async def _answer_at_once(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"choices": [{"delta": {"role": "assistant"}}]}\n\n')
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _not_here(request: web.Request) -> web.Response:
    raise AssertionError("the front server must route every request")


async def run(requests: int) -> dict[str, Any]:
    ca = ClusterCA.create("stack-bench")
    server_key, server_cert = _credentials(ca, "box-b")
    client_key, client_cert = _credentials(ca, "box-a")
    upstream = web.Application()
    upstream.router.add_post(INFERENCE_PREFIX + PATH, _answer_at_once)
    upstream.router.add_post(PATH, _answer_at_once)
    up = web.AppRunner(upstream, access_log=None)
    await up.setup()
    tls = pki.server_context_from_pem(ca.cert_pem, server_cert, server_key, require_client_cert=False)
    await web.TCPSite(up, "127.0.0.1", 0, ssl_context=tls).start()
    await web.TCPSite(up, "127.0.0.1", 0).start()
    peer_port, plain_port = up.addresses[0][1], up.addresses[1][1]
    replica = {"id": "box-b", "address": "127.0.0.1", "peer_port": peer_port, "models": ["m"], "load": {}}
    client_tls = pki.client_context_from_pem(ca.cert_pem, client_cert, client_key)
    router = Router(lambda: "box-a", lambda: {"box-b": replica}, lambda: client_tls)
    # The entry box's real middleware chain on 8080: request ids, access policy (default settings), routing.
    keys = KeyStore(Path(tempfile.mkdtemp(prefix="thox-bench-keys-")) / "keys.json")
    policy = SecurityPolicy(AccessRules.from_settings(ApiSettings(), "inference"), keys, "inference")
    front = web.Application(
        middlewares=[request_context, security_middleware(policy), Routing(router, lambda model: None).middleware()]
    )
    front.on_response_prepare.append(add_rate_headers)
    front.router.add_post(PATH, _not_here)
    hop = web.AppRunner(front, access_log=None)
    await hop.setup()
    await web.TCPSite(hop, "127.0.0.1", 0).start()
    hop_port = hop.addresses[0][1]
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    direct, routed = [], []
    try:
        async with aiohttp.ClientSession() as session:

            async def ttfb(port: int) -> float:
                started = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{port}{PATH}", json=body) as response:
                    await response.content.readany()
                    first = time.perf_counter() - started
                    await response.read()
                return first

            for _ in range(50):  # warm connections and code paths
                await ttfb(plain_port)
                await ttfb(hop_port)
            for _ in range(requests):
                direct.append(await ttfb(plain_port))
                routed.append(await ttfb(hop_port))
    finally:
        await router.close()
        await hop.cleanup()
        await up.cleanup()
    p50_direct, p50_routed = statistics.median(direct) * 1000, statistics.median(routed) * 1000
    return {
        "requests": requests,
        "direct_ms": round(p50_direct, 3),
        "routed_ms": round(p50_routed, 3),
        "hop_overhead_p50_ms": round(p50_routed - p50_direct, 3),
        "target_overhead_p50_ms": 2.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    save_report(RESULTS, asyncio.run(run(args.requests)))


if __name__ == "__main__":
    main()
