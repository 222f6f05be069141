"""Soak: many concurrent streams against one real agent for a long time: errors, TTFT, and leaks.

Usage:
  .venv/bin/python -m bench.soak [--streams 64] [--duration 600] [--max-tokens 16] [--report bench/results/soak.json]

It starts one `thox serve` (sim profile, the bundled SmolLM2-135M on ONNX Runtime CPU) on free loopback ports, warms
it up, then runs `--streams` clients for `--duration` seconds, each looping over requests with varied short prompts:
- most send streamed chat completions (SSE: POST /v1/chat/completions with stream true);
- one in eight holds a WebSocket on /v1/stream and sends its requests there; now and then it cancels one mid-stream
  (`{"type": "cancel"}`) or closes the socket mid-stream and opens a new one;
- one in sixteen reads the first text of a longer SSE stream and then drops the connection.
Cancels and drops are deliberate and counted as expected. Everything else that is not a complete answer is an
unexpected error, by kind: an HTTP error status with its OpenAI error code, an error event in a stream, a stream that
ends without its end marker, a connection error, a timeout. The load stays below the engine's capacity
(engine.max_batch + engine.max_queue places), so a 503 engine_overloaded is unexpected too.

TTFT is the time from sending a request to its first chunk with text (queueing for a batch slot included);
requests/s counts every request, deliberate drops too; tokens/s the completion tokens (usage) of completed ones. Process
figures: RSS (/proc/<pid>/status VmRSS) and open file descriptors (/proc/<pid>/fd) of the agent and of its engine host
(pid from /v1/health), and the agent's asyncio task count (/v1/health `process`). They are taken at start (after a
warm-up, with no client connected and nothing in flight), in the middle (under load) and at the end (load stopped,
clients disconnected, nothing in flight). Descriptors and tasks at start and end are the lowest of a few readings half
a second apart, so a periodic poll that happens to be running is not taken for a leak. The report also has a
timeline of these figures every max(5 s, duration / 40) under load, to tell steady growth from a one-off step.

Targets: 0 unexpected errors; RSS at the end within 5% of the middle; descriptors and tasks equal at start and end.
It is a benchmark, not a test: it reports the figures and whether each target was met. Ctrl-C stops the load and the
agent (a second Ctrl-C aborts at once). The report is written to bench/results/soak.json (or --report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.settings import load_settings
from bench.cluster import save_report
from tests.agent_process import RunningAgent, start_agent

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "soak.json"
RSS_TOLERANCE = 0.05
# Generous: under full load a request may queue behind several batches on a 2-core machine before its first token.
READ_TIMEOUT_S = 120.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=10, sock_read=READ_TIMEOUT_S)
# After the load stops, clients finish the request they are in; one still running after this is counted as a timeout.
DRAIN_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 60.0

SUBJECTS = [
    "the moon",
    "bread",
    "a river",
    "chess",
    "rain",
    "a lighthouse",
    "bees",
    "winter",
    "a violin",
    "Paris",
    "volcanoes",
    "the ocean",
    "a library",
    "trains",
    "clouds",
    "coffee",
]
TEMPLATES = [
    "Write one sentence about {}.",
    "Give me a fun fact about {}.",
    "Describe {} in a few words.",
    "What is {}?",
    "Tell me a short story about {}.",
    "List three words that go with {}.",
]


def _prompt(rng: random.Random) -> list[dict[str, str]]:
    return [{"role": "user", "content": rng.choice(TEMPLATES).format(rng.choice(SUBJECTS))}]


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Outcome:
    """How one request ended: `kind` is an outcome ("completed_sse", ...) or an error kind."""

    kind: str
    expected: bool
    ttft: float | None = None
    tokens: int = 0
    detail: str = ""


@dataclass
class Stats:
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    # Events a WebSocket delivered for a request that had already ended (a cancel that crossed its done event).
    stale_ws_events: int = 0

    def record(self, outcome: Outcome) -> None:
        if outcome.ttft is not None:
            self.ttft.append(outcome.ttft)
        self.tokens += outcome.tokens
        if outcome.expected:
            self.outcomes[outcome.kind] += 1
        else:
            self.errors[outcome.kind] += 1
            self.error_examples.setdefault(outcome.kind, outcome.detail[:300])


def _error(kind: str, detail: str = "") -> Outcome:
    return Outcome(kind, expected=False, detail=detail)


def _exception_kind(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    return f"connection_{type(exc).__name__}"


# ------------------------------------------------------------------------------------------------------ requests


async def sse_request(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any], drop_after: int | None = None
) -> Outcome:
    """One streamed chat completion; with `drop_after`, the connection is dropped after that many text chunks."""
    started = time.perf_counter()
    ttft: float | None = None
    texts = tokens = 0
    try:
        async with session.post(f"{base}/chat/completions", json=body, timeout=REQUEST_TIMEOUT) as response:
            if response.status != 200:
                text = await response.text()
                try:
                    code = json.loads(text)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "no_envelope"
                return _error(f"http_{response.status}_{code}", text)
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :]
                if data == b"[DONE]":
                    return Outcome("completed_sse", True, ttft, tokens)
                event = json.loads(data)
                if "error" in event:
                    return _error(f"stream_error_{event['error'].get('code')}", data.decode(errors="replace"))
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    texts += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    if drop_after is not None and texts >= drop_after:
                        response.close()  # closes the connection itself: the agent sees the client go away
                        return Outcome("dropped_sse", True, ttft)
            return _error("stream_ended_without_done", f"after {texts} text chunks")
    except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as exc:
        return _error(_exception_kind(exc), repr(exc))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return _error("malformed_response", repr(exc))


async def ws_request(
    ws: aiohttp.ClientWebSocketResponse, stats: Stats, request_id: str, body: dict[str, Any], mode: str
) -> Outcome:
    """One chat completion on an open /v1/stream socket; mode "cancel" or "close" stops it at its first text."""
    started = time.perf_counter()
    ttft: float | None = None
    try:
        await ws.send_json({**body, "id": request_id})
        cancel_sent = False
        while True:
            message = await ws.receive(timeout=READ_TIMEOUT_S)
            if message.type != aiohttp.WSMsgType.TEXT:
                return _error(f"ws_{message.type.name.lower()}_mid_request", repr(message.extra))  # closed on us
            event = json.loads(message.data)
            if event.get("request") != request_id:
                stats.stale_ws_events += 1
                continue
            if event["type"] == "error":
                return _error(f"ws_error_{event['error'].get('code')}", message.data)
            if event["type"] == "done":
                if event["finish_reason"] == "cancelled":
                    if cancel_sent:
                        return Outcome("cancelled_ws", True, ttft)
                    return _error("ws_cancelled_unasked", message.data)
                return Outcome("completed_ws", True, ttft, (event.get("usage") or {}).get("completion_tokens", 0))
            if event["type"] != "chunk":
                return _error(f"ws_unknown_event_{event['type']}", message.data)
            if event["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - started
                if mode == "cancel":
                    await ws.send_json({"type": "cancel"})
                    cancel_sent = True
                elif mode == "close":
                    await ws.close()
                    return Outcome("dropped_ws", True, ttft)
    except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as exc:
        return _error(_exception_kind(exc), repr(exc))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return _error("malformed_response", repr(exc))


# ------------------------------------------------------------------------------------------------------- clients


@dataclass
class Load:
    base: str
    max_tokens: int
    stats: Stats
    stop: asyncio.Event


def _body(rng: random.Random, max_tokens: int) -> dict[str, Any]:
    return {
        "messages": _prompt(rng),
        "max_tokens": rng.randint(max(1, max_tokens // 2), max_tokens),
        "temperature": round(rng.uniform(0.0, 1.0), 2),
        "stream": True,
    }


async def sse_client(session: aiohttp.ClientSession, load: Load, rng: random.Random, *, dropper: bool) -> None:
    while not load.stop.is_set():
        body = {**_body(rng, load.max_tokens), "stream_options": {"include_usage": True}}
        if dropper:
            # Longer than it is read, so the drop really happens mid-stream.
            body["max_tokens"] = load.max_tokens * 4
        outcome = await sse_request(session, load.base, body, drop_after=rng.randint(1, 3) if dropper else None)
        load.stats.record(outcome)
        if not outcome.expected:
            await asyncio.sleep(0.5)  # no hot loop against a failing agent


async def ws_client(session: aiohttp.ClientSession, load: Load, rng: random.Random, name: str) -> None:
    url = load.base.replace("http", "ws", 1) + "/stream"
    sent = 0
    while not load.stop.is_set():
        try:
            async with session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=10)) as ws:
                while not load.stop.is_set():
                    sent += 1
                    mode = "close" if sent % 7 == 0 else "cancel" if sent % 5 == 0 else "normal"
                    outcome = await ws_request(ws, load.stats, f"{name}-{sent}", _body(rng, load.max_tokens), mode)
                    load.stats.record(outcome)
                    if ws.closed or not outcome.expected:
                        break  # a fresh socket for the next request
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as exc:
            load.stats.record(_error(_exception_kind(exc), repr(exc)))
            await asyncio.sleep(0.5)


def client_coroutines(session: aiohttp.ClientSession, load: Load, streams: int, seed: int) -> list[Awaitable[None]]:
    """Client i: every 8th a WebSocket client, every 16th (offset) an SSE client that drops, the rest plain SSE."""
    clients: list[Awaitable[None]] = []
    for index in range(streams):
        rng = random.Random(seed * 1000 + index)
        if index % 8 == 7:
            clients.append(ws_client(session, load, rng, f"ws{index}"))
        else:
            clients.append(sse_client(session, load, rng, dropper=index % 16 == 3))
    return clients


def client_kinds(streams: int) -> dict[str, int]:
    ws = sum(1 for i in range(streams) if i % 8 == 7)
    droppers = sum(1 for i in range(streams) if i % 8 != 7 and i % 16 == 3)
    return {"sse": streams - ws - droppers, "sse_dropping": droppers, "websocket": ws}


# ----------------------------------------------------------------------------------------------- process figures


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def health(ops: aiohttp.ClientSession, agent: RunningAgent) -> dict[str, Any]:
    async with ops.get(f"{agent.cluster_url}/health", timeout=aiohttp.ClientTimeout(total=30)) as response:
        response.raise_for_status()
        body: dict[str, Any] = await response.json()
        return body


async def reading(ops: aiohttp.ClientSession, agent: RunningAgent) -> dict[str, Any]:
    """One reading of the agent's and its engine host's figures."""
    report = await health(ops, agent)
    engine, process = report["engine"], report.get("process") or {}
    agent_pid, engine_pid = agent.process.pid, engine.get("pid")

    def from_proc() -> dict[str, Any]:
        return {
            "agent_rss_bytes": _rss_bytes(agent_pid),
            "agent_fds": _open_fds(agent_pid),
            "engine_rss_bytes": _rss_bytes(engine_pid) if engine_pid else None,
            "engine_fds": _open_fds(engine_pid) if engine_pid else None,
        }

    return {
        "status": report["status"],
        "agent_pid": agent_pid,
        "health_pid": process.get("pid"),
        "engine_pid": engine_pid,
        "engine_restarts": engine.get("restarts"),
        **await asyncio.to_thread(from_proc),
        "asyncio_tasks": process.get("asyncio_tasks"),
        "admitted": engine.get("admitted"),
        "active_streams": engine.get("active_streams"),
        "concurrency_applied": (engine.get("concurrency") or {}).get("applied"),
    }


async def quiet_sample(ops: aiohttp.ClientSession, agent: RunningAgent, readings: int = 5) -> dict[str, Any]:
    """Figures with nothing in flight: wait for the engine to drain, then the floor of a few readings."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        first = await reading(ops, agent)
        if (first["admitted"], first["active_streams"]) == (0, 0):
            break
        if time.monotonic() > deadline:
            print(
                f"warning: still in flight after {SETTLE_TIMEOUT_S:.0f} s: admitted {first['admitted']}, "
                f"active_streams {first['active_streams']}",
                file=sys.stderr,
            )
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)  # closed client connections reach the agent's side; engine frees its slots
    samples = []
    for _ in range(readings):
        samples.append(await reading(ops, agent))
        await asyncio.sleep(0.5)
    sample = dict(samples[-1])
    for key in ("agent_fds", "engine_fds", "asyncio_tasks"):
        values = [s[key] for s in samples if s[key] is not None]
        sample[key] = min(values) if values else None
        sample[f"{key}_readings"] = [s[key] for s in samples]
    return sample


# ----------------------------------------------------------------------------------------------------- the soak


async def _wait(awaitable: Awaitable[Any], interrupted: asyncio.Event, timeout: float | None = None) -> bool:
    """Run until `awaitable` is done (True), `interrupted` is set or `timeout` passes (False)."""
    work = asyncio.ensure_future(awaitable)
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({work, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()
            return True
        return False
    finally:
        for task in (work, stop):
            task.cancel()
        await asyncio.gather(work, stop, return_exceptions=True)


async def warm_up(agent: RunningAgent, stats: Stats, streams: int, max_tokens: int) -> None:
    """Every kind of request once, and a full batch, so lazily made things exist before the start figures."""
    rng = random.Random(0)
    base = agent.inference_url
    async with aiohttp.ClientSession() as session:
        for outcome in await asyncio.gather(
            *(sse_request(session, base, _body(rng, max_tokens)) for _ in range(min(streams, 16)))
        ):
            stats.record(outcome)
        stats.record(await sse_request(session, base, _body(rng, max_tokens * 4), drop_after=1))
        url = base.replace("http", "ws", 1) + "/stream"
        for number, mode in enumerate(("normal", "cancel", "close")):
            async with session.ws_connect(url) as ws:
                stats.record(await ws_request(ws, stats, f"warm-{number}", _body(rng, max_tokens), mode))


async def soak(agent: RunningAgent, streams: int, duration: float, max_tokens: int, seed: int) -> dict[str, Any]:
    """Warm up, take the start figures, run the load, take the end figures; the report."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    main_task = asyncio.current_task()

    def on_sigint() -> None:
        if interrupted.is_set() and main_task is not None:
            main_task.cancel()  # second Ctrl-C: abort now; main() still stops the agent
            return
        print("\ninterrupted: stopping the load (Ctrl-C again to abort)", file=sys.stderr)
        interrupted.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    settings = load_settings(home=agent.home)
    capacity = settings.engine.max_batch + settings.engine.max_queue
    report: dict[str, Any] = {
        "streams": streams,
        "clients": client_kinds(streams),
        "duration_s": duration,
        "max_tokens": max_tokens,
        "seed": seed,
        "engine_capacity": {
            "max_batch": settings.engine.max_batch,
            "max_queue": settings.engine.max_queue,
            "places": capacity,
        },
        "interrupted": False,
        "process": {},
    }
    if streams > capacity:
        print(
            f"warning: {streams} streams exceed the engine's {capacity} places: 503 engine_overloaded will show "
            "up among the unexpected errors",
            file=sys.stderr,
        )
    try:
        # A connection per health call, closed at once: the bench keeps no idle connection in the agent's figures.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as ops:
            print(f"warming up ({agent.inference_url}) ...", file=sys.stderr)
            warm = Stats()
            if not await _wait(warm_up(agent, warm, streams, max_tokens), interrupted):
                return report
            report["warm_up"] = {
                "outcomes": dict(warm.outcomes),
                "errors": dict(warm.errors),
                "error_examples": warm.error_examples,
            }
            report["process"]["start"] = start = await quiet_sample(ops, agent)
            print(f" start: {_brief(start)}", file=sys.stderr)
            stats, load_seconds = await run_load(agent, ops, report, interrupted, streams, duration, max_tokens, seed)
            report["load_seconds"] = round(load_seconds, 1)
            report.update(_load_figures(stats, load_seconds))
            if agent.process.poll() is not None:
                report["agent_exited"] = agent.process.returncode
            elif not interrupted.is_set():
                report["process"]["end"] = end = await quiet_sample(ops, agent)
                print(f"   end: {_brief(end)}", file=sys.stderr)
                report["health_at_end"] = await health(ops, agent)  # the engine's scheduler figures among them
            report["targets"] = _targets(report)
            return report
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        report["interrupted"] = interrupted.is_set()


async def run_load(
    agent: RunningAgent,
    ops: aiohttp.ClientSession,
    report: dict[str, Any],
    interrupted: asyncio.Event,
    streams: int,
    duration: float,
    max_tokens: int,
    seed: int,
) -> tuple[Stats, float]:
    """The clients for `duration` seconds, a timeline of figures meanwhile and the middle figures; stats and seconds."""
    stats = Stats()
    load = Load(agent.inference_url, max_tokens, stats, asyncio.Event())
    timeline: list[dict[str, Any]] = []
    report["timeline"] = timeline
    report["health_failures"] = health_failures = Counter[str]()
    load_started = time.monotonic()

    async def sample_into(put: Callable[[dict[str, Any]], None]) -> None:
        try:
            entry = await reading(ops, agent)
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as exc:
            health_failures[_exception_kind(exc)] += 1  # /v1/health must answer under load: worth reporting
            return
        entry["t_s"] = round(time.monotonic() - load_started, 1)
        entry["requests"] = sum(stats.outcomes.values()) + sum(stats.errors.values())
        put(entry)

    async def sampler() -> None:
        interval = max(5.0, duration / 40)
        while True:
            await sample_into(timeline.append)
            await asyncio.sleep(interval)

    async def middle() -> None:
        await asyncio.sleep(duration / 2)
        await sample_into(lambda entry: report["process"].__setitem__("middle", entry))
        if "middle" in report["process"]:
            print(f"middle: {_brief(report['process']['middle'])}", file=sys.stderr)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [asyncio.ensure_future(c) for c in client_coroutines(session, load, streams, seed)]
        watchers = [asyncio.ensure_future(sampler()), asyncio.ensure_future(middle())]
        try:
            print(f"load: {streams} streams for {duration:.0f} s ...", file=sys.stderr)
            await _wait(_agent_exit(agent), interrupted, timeout=duration)
            load.stop.set()  # clients finish the request they are in and start no other
            if not interrupted.is_set() and agent.process.poll() is None:
                print("load stopped; waiting for the last requests ...", file=sys.stderr)
                await _wait(asyncio.wait(clients, timeout=DRAIN_TIMEOUT_S), interrupted)
            load_seconds = time.monotonic() - load_started
            if not interrupted.is_set():
                unfinished = sum(1 for client in clients if not client.done())
                if unfinished:
                    stats.record(_error("timeout_at_end", f"{unfinished} requests still running after the drain"))
                    stats.errors["timeout_at_end"] += unfinished - 1
            for client in clients:
                if client.done() and not client.cancelled() and client.exception() is not None:
                    # A bug of the bench itself, not of the agent: reported on its own, never hidden.
                    stats.record(
                        _error(f"bench_client_crashed_{type(client.exception()).__name__}", repr(client.exception()))
                    )
        finally:
            for task in (*clients, *watchers):
                task.cancel()
            await asyncio.gather(*clients, *watchers, return_exceptions=True)
    return stats, load_seconds


async def _agent_exit(agent: RunningAgent) -> None:
    # Polled: waiting for the child in a thread would leave that thread blocked past a cancel, and asyncio.run's
    # executor shutdown would then wait for an agent that is stopped only after it returns.
    while agent.process.poll() is None:  # noqa: ASYNC110
        await asyncio.sleep(0.5)


def _brief(sample: dict[str, Any]) -> str:
    def mib(value: int | None) -> str:
        return "?" if value is None else f"{value / 2**20:.1f} MiB"

    return (
        f"agent rss {mib(sample['agent_rss_bytes'])} fds {sample['agent_fds']} tasks {sample['asyncio_tasks']}"
        f" | engine host rss {mib(sample['engine_rss_bytes'])} fds {sample['engine_fds']}"
    )


def _load_figures(stats: Stats, load_seconds: float) -> dict[str, Any]:
    requests = sum(stats.outcomes.values()) + sum(stats.errors.values())
    return {
        "requests": {"total": requests, **dict(sorted(stats.outcomes.items()))},
        "expected_interruptions": {k: v for k, v in stats.outcomes.items() if not k.startswith("completed")},
        "unexpected_errors": sum(stats.errors.values()),
        "errors_by_kind": dict(sorted(stats.errors.items())),
        "error_examples": stats.error_examples,
        "stale_ws_events": stats.stale_ws_events,
        "requests_per_s": round(requests / load_seconds, 2) if load_seconds else None,
        "completion_tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / load_seconds, 1) if load_seconds else None,
        "ttft_ms": {
            "count": len(stats.ttft),
            **{
                name: None if (v := _percentile(stats.ttft, q)) is None else round(v * 1000, 1)
                for name, q in (("p50", 50), ("p99", 99), ("max", 100))
            },
        },
    }


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    process = report.get("process", {})
    start, middle, end = process.get("start"), process.get("middle"), process.get("end")
    # "met" is None where a figure is missing (an interrupted run has no end figures): not measured, not failed.
    targets: dict[str, Any] = {
        "zero_unexpected_errors": {
            "met": report.get("unexpected_errors") == 0,
            "unexpected_errors": report.get("unexpected_errors"),
        }
    }
    same_engine = bool(start and end and start["engine_pid"] == end["engine_pid"])
    for who in ("agent", "engine"):
        rss = {"middle": middle and middle[f"{who}_rss_bytes"], "end": end and end[f"{who}_rss_bytes"]}
        growth = (rss["end"] - rss["middle"]) / rss["middle"] if rss["middle"] and rss["end"] else None
        targets[f"{who}_rss_end_within_5pct_of_middle"] = {
            "met": None if growth is None else abs(growth) <= RSS_TOLERANCE and (who == "agent" or same_engine),
            "middle_bytes": rss["middle"],
            "end_bytes": rss["end"],
            "change_pct": None if growth is None else round(growth * 100, 2),
        }
    for key, name in (
        ("agent_fds", "agent_fds_equal"),
        ("engine_fds", "engine_fds_equal"),
        ("asyncio_tasks", "agent_asyncio_tasks_equal"),
    ):
        values = {"start": start and start[key], "end": end and end[key]}
        measured = values["start"] is not None and values["end"] is not None
        targets[name] = {
            "met": None
            if not measured
            else values["start"] == values["end"] and (not key.startswith("engine") or same_engine),
            **values,
        }
    if start and end and not same_engine:
        targets["engine_restarted"] = {"start_pid": start["engine_pid"], "end_pid": end["engine_pid"]}
    return targets


def print_summary(report: dict[str, Any]) -> None:
    """The human-readable part: each figure, each target and whether it was met."""
    print()
    print(
        f"soak: {report['streams']} streams {report['clients']}, {report.get('load_seconds', 0)} s of load, "
        f"max_tokens {report['max_tokens']}{'  (INTERRUPTED)' if report.get('interrupted') else ''}"
    )
    if "requests" in report:
        print(f"requests: {report['requests']}")
        print(f"expected interruptions: {report['expected_interruptions']}")
        print(f"errors by kind: {report['errors_by_kind'] or 'none'}")
        print(
            f"throughput: {report['requests_per_s']} requests/s, {report['tokens_per_s']} tokens/s "
            f"({report['completion_tokens']} completion tokens)"
        )
        ttft = report["ttft_ms"]
        print(f"TTFT: p50 {ttft['p50']} ms, p99 {ttft['p99']} ms, max {ttft['max']} ms over {ttft['count']}")
    for phase in ("start", "middle", "end"):
        if phase in report.get("process", {}):
            print(f"{phase:>6}: {_brief(report['process'][phase])}")
    for name, target in report.get("targets", {}).items():
        if "met" in target:
            figures = ", ".join(f"{k} {v}" for k, v in target.items() if k != "met")
            verdict = {True: "met", False: "NOT MET", None: "not measured"}[target["met"]]
            print(f"  [{verdict}] {name}: {figures}")
        else:
            print(f"  [note] {name}: {target}")
    if "agent_exited" in report:
        print(f"  the agent exited with {report['agent_exited']} during the soak")


def main() -> None:
    """Start an agent, soak it, stop it; print the summary and keep the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=16, help="largest max_tokens of a request")
    parser.add_argument("--seed", type=int, default=1, help="seed of the prompts and the request mix")
    parser.add_argument("--report", type=Path, default=RESULTS, help="where the JSON report goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="thox-bench-soak-") as tmp:
        print("starting the agent ...", file=sys.stderr)
        agent = start_agent(Path(tmp) / "home")
        report: dict[str, Any] | None = None
        try:
            report = asyncio.run(soak(agent, args.streams, args.duration, args.max_tokens, args.seed))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("aborted", file=sys.stderr)
        finally:
            print("stopping the agent ...", file=sys.stderr)
            code = _stop(agent)
            if code != 0:
                print(
                    f"agent exited with {code}; last log lines:\n{agent.log_path.read_text(errors='replace')[-3000:]}",
                    file=sys.stderr,
                )
        if report is None:
            sys.exit(130)
        report["agent_stop_exit_code"] = code
        save_report(args.report, report)
        print_summary(report)
        if report["interrupted"]:
            sys.exit(130)


def _stop(agent: RunningAgent) -> int | None:
    """SIGTERM and wait, as the tests do; SIGKILL only if it does not stop in time."""
    try:
        return agent.stop(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            agent.process.kill()
        return agent.process.wait(10)


if __name__ == "__main__":
    main()
