"""MagStack cluster figures on loopback: routing overhead, dock-to-serving time, leader failover.

Usage:
  .venv/bin/python -m bench.cluster [--requests 40]

It starts three `thox serve` agents in the sim profile, each with its own etcd, on free loopback ports:
- box-a founds the cluster; box-b serves the bundled chat model under another id (an alias in its manifest), so a
  request for that id at box-a is routed to box-b.
- routing overhead: streaming requests (max_tokens 1) alternately straight to box-b and through box-a; time to
  first byte of the body, p50/p95 each, and the p50 difference (target <= 2 ms).
- dock to serving: box-c, serving a third alias, is docked onto box-a in the simulation (its NFC tag carries
  box-a's join offer); the time from the dock to box-a answering a routed request for box-c's model.
- failover: SIGKILL of the leading agent (its etcd dies with it); the time until a survivor reports a new leader
  (target <= 3 s).

No peer (Ollama, llama.cpp's server, vLLM) forms clusters of boxes, so these are absolute figures against the
issue's targets. The results are also written to bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.bundled import install_alias

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "test-models"
RESULTS = REPO / "bench" / "results" / "cluster.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Box:
    def __init__(self, root: Path, name: str, model: str | None) -> None:
        self.name, self.home = name, root / name
        self.home.mkdir(parents=True)
        if model is not None:
            install_alias(self.home, model, purpose="bench")
        env = {
            **os.environ,
            "THOX_HOME": str(self.home),
            "THOX_LOG_FORMAT": "json",
            "THOX_CACHE_DIR": str(MODEL_CACHE),
            "THOX_ENGINE_THREADS": "1",
            "THOX_CLUSTER_NODE_ID": name,
            **({"THOX_DEFAULT_MODEL": model} if model else {}),
            **{
                f"THOX_CLUSTER_{key}": str(_free_port())
                for key in ("PEER_PORT", "ETCD_PEER_PORT", "ETCD_CLIENT_PORT", "ETCD_CLIENT_TLS_PORT")
            },
        }
        self.log = (self.home / "agent.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--inference-port", "0", "--cluster-port", "0"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        endpoints = self.home / "run" / "endpoints.json"
        deadline = time.monotonic() + 600
        while not endpoints.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {self.home / 'agent.log'}")
            time.sleep(0.1)
        record = json.loads(endpoints.read_text())
        self.inference, self.cluster = record["inference_url"], record["cluster_url"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.log.close()


async def _json(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with session.request(method, url, json=body) as response:
        return response.status, await response.json(content_type=None)


async def _until(check: Any, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not reached")


async def _ttfb(session: aiohttp.ClientSession, url: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "stream": True}
    started = time.perf_counter()
    async with session.post(f"{url}/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        await response.content.readany()
        first = time.perf_counter() - started
        await response.read()
    return first


async def run(requests: int) -> dict[str, Any]:
    report: dict[str, Any] = {"requests": requests}
    with tempfile.TemporaryDirectory(prefix="thox-bench-cluster-") as tmp:
        root = Path(tmp)
        boxes = [Box(root, "box-a", None), Box(root, "box-b", "alias-b"), Box(root, "box-c", "alias-c")]
        a, b, c = boxes
        try:
            async with aiohttp.ClientSession() as session:

                async def has_leader(box: Box = a) -> bool:
                    status, body = await _json(session, "GET", f"{box.cluster}/topology")
                    return status == 200 and body["leader"] is not None

                for box in boxes:
                    await _until(lambda box=box: has_leader(box), 60)
                status, token = await _json(session, "POST", f"{a.cluster}/cluster/tokens", {"ttl_seconds": 600})
                status, joined = await _json(
                    session, "POST", f"{b.cluster}/cluster/join", {"token": token["token"], "server": token["server"]}
                )
                assert status == 200, joined

                async def routable(model: str) -> bool:
                    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
                    async with session.post(f"{a.inference}/chat/completions", json=body) as response:
                        return response.status == 200

                await _until(lambda: routable("alias-b"), 60)
                direct, routed = [], []
                for _ in range(requests):
                    direct.append(await _ttfb(session, b.inference, "alias-b"))
                    routed.append(await _ttfb(session, a.inference, "alias-b"))
                p50 = {"direct_ms": statistics.median(direct) * 1000, "routed_ms": statistics.median(routed) * 1000}
                report["routing_ttfb"] = {
                    **{k: round(v, 2) for k, v in p50.items()},
                    "overhead_p50_ms": round(p50["routed_ms"] - p50["direct_ms"], 2),
                    "direct_p95_ms": round(statistics.quantiles(direct, n=20)[18] * 1000, 2),
                    "routed_p95_ms": round(statistics.quantiles(routed, n=20)[18] * 1000, 2),
                    "target_overhead_p50_ms": 2.0,
                }

                status, token = await _json(session, "POST", f"{a.cluster}/cluster/tokens", {"ttl_seconds": 600})
                docked_at = time.monotonic()
                status, _ = await _json(
                    session,
                    "POST",
                    f"{c.cluster}/sim/modules",
                    {
                        "id": "box-a",
                        "offer": {"node_id": "box-a", "endpoint": token["server"], "token": token["token"]},
                    },
                )
                assert status == 201
                await _until(lambda: routable("alias-c"), 60)
                report["dock_to_routed_request_s"] = round(time.monotonic() - docked_at, 3)

                async def three_voters() -> bool:
                    status, summary = await _json(session, "GET", f"{a.cluster}/cluster")
                    return status == 200 and summary["status"] == "healthy" and summary["voters"]["alive"] == 3

                # Right after a join the newcomer is still a learner: with two voters, losing one loses the quorum.
                await _until(three_voters, 60)
                status, topology = await _json(session, "GET", f"{a.cluster}/topology")
                leader = next(box for box in boxes if box.name == topology["leader"])
                survivor = next(box for box in boxes if box is not leader)
                killed = time.monotonic()
                leader.kill()

                async def new_leader() -> bool:
                    with_timeout = aiohttp.ClientTimeout(total=1)
                    try:
                        async with session.get(f"{survivor.cluster}/topology", timeout=with_timeout) as response:
                            body = await response.json(content_type=None)
                    except (aiohttp.ClientError, TimeoutError):
                        return False
                    return response.status == 200 and body["leader"] not in (None, leader.name)

                await _until(new_leader, 15)
                report["leader_failover_s"] = round(time.monotonic() - killed, 3)
                report["failover_target_s"] = 3.0
        finally:
            for box in boxes:
                box.kill()
    return report


def main() -> None:
    """Run the benchmark, print its JSON report and keep it in bench/results/cluster.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    save_report(RESULTS, asyncio.run(run(args.requests)))


def without_machine_paths(text: str) -> str:
    """Reports are committed: this checkout's path becomes <repo>, a temporary folder of the run becomes <tmp>."""
    text = text.replace(str(REPO) + os.sep, "<repo>" + os.sep)
    return re.sub(re.escape(tempfile.gettempdir() + os.sep) + r'[^/"]+', "<tmp>", text)


def save_report(path: Path, report: dict[str, Any]) -> None:
    """Keep a benchmark's JSON report under bench/results and print it."""
    text = without_machine_paths(json.dumps(report, indent=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
