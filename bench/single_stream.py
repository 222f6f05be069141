"""Single-stream latency through HTTP: time to first token and decode tokens/s, as a client sees them.

Usage:
  python -m bench.single_stream                 # starts `thox serve` on free ports in a temporary home
  python -m bench.single_stream --url http://127.0.0.1:8080/v1

It streams chat completions with `stream_options.include_usage` so token counts are exact, and reports the
median of N runs. Decode rate = (completion_tokens - 1) / (last content chunk - first content chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


async def one_run(session: aiohttp.ClientSession, url: str, max_tokens: int, seed: int) -> dict[str, float]:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = None
    usage: dict[str, Any] = {}
    async with session.post(f"{url}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
    if first is None or last is None:
        raise RuntimeError("no content streamed")
    tokens = int(usage["completion_tokens"])
    return {
        "ttft_ms": (first - started) * 1000,
        "decode_tok_s": (tokens - 1) / (last - first),
        "completion_tokens": tokens,
        "prompt_tokens": int(usage["prompt_tokens"]),
    }


async def measure(url: str, runs: int, max_tokens: int) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await one_run(session, url, 8, 0)  # warm-up
        results = [await one_run(session, url, max_tokens, seed) for seed in range(1, runs + 1)]
    return {
        "runs": runs,
        "max_tokens": max_tokens,
        "prompt_tokens": results[0]["prompt_tokens"],
        "completion_tokens": [r["completion_tokens"] for r in results],
        "ttft_ms_median": round(statistics.median(r["ttft_ms"] for r in results), 1),
        "decode_tok_s_median": round(statistics.median(r["decode_tok_s"] for r in results), 1),
    }


def start_agent(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "THOX_HOME": str(home), "THOX_LOG_FORMAT": "json"}
    log = (home / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "serve", "--inference-port", "0", "--cluster-port", "0"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoints = home / "run" / "endpoints.json"
    while not endpoints.exists():
        if proc.poll() is not None:
            raise SystemExit(f"agent exited: see {home / 'agent.log'}")
        time.sleep(0.1)
    return proc, json.loads(endpoints.read_text())["inference_url"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="inference API base URL of a running agent (default: start one)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    proc = None
    url = args.url
    with tempfile.TemporaryDirectory(prefix="thox-bench-") as tmp:
        if url is None:
            proc, url = start_agent(Path(tmp))
        try:
            result = asyncio.run(measure(url, args.runs, args.max_tokens))
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
