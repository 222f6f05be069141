"""What the bench sends, and how it times the answers: streamed chat completions over HTTP (aiohttp).

Every request starts with a unique 4-digit request number at the head of the system message, so that no server
can answer from a prompt-prefix cache (all three have one); the number is always 4 digits, and digits are single
tokens in this tokenizer, so the prompt length stays the same. Sampling is greedy (temperature 0, fixed seed).

Timing, as a client sees it:
- time to first token (TTFT): request sent -> first chunk with non-empty `delta.content`;
- prefill tokens/s: prompt tokens / TTFT (so it includes the HTTP round trip and the first sampled token);
- decode tokens/s: (completion tokens - 1) / (last content chunk - first content chunk);
- aggregate tokens/s at N streams: N clients each send requests back to back; all completion tokens / wall time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

SYSTEM = "You are a helpful assistant."
SHORT_USER = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
# About 500 tokens of plain prose (with the chat wrapping and question) for the long-prompt prefill measurement.
PASSAGE = (
    "The lighthouse at the end of the northern breakwater was built in 1871 from granite blocks that were cut "
    "in a quarry forty miles inland and carried to the coast on a narrow railway laid for that single purpose. "
    "Its first keeper, a former ship's carpenter, kept a log in which he recorded the weather four times a day, "
    "the passing of every vessel he could identify, the state of the lamp, and the quantity of oil consumed. "
    "The log survives in the harbour archive, and it shows a man of careful habits: the entries never skip a "
    "day, even during the winter of 1879, when ice closed the harbour for eleven weeks and the supply boat could "
    "not reach him. In that winter he rationed the oil by lighting the lamp only from dusk until the last fishing "
    "boat had returned, and he wrote that the silence of the frozen sea was harder to bear than any storm.\n\n"
    "The lamp itself changed several times. The original burner used colza oil and a fixed lens that threw a "
    "steady white beam about fourteen nautical miles. In 1903 it was replaced by a paraffin vapour burner and a "
    "rotating lens floating in a bath of mercury, which gave the light its characteristic signature of two "
    "flashes every ten seconds. Sailors learned to tell the lighthouse apart from its neighbours by that rhythm "
    "alone. Electricity arrived in 1952, and with it an automatic lamp changer that could swap a failed bulb "
    "without anyone climbing the one hundred and twelve steps to the lantern room.\n\n"
    "Automation ended the era of resident keepers in 1987. The last keeper, who had served for twenty-three "
    "years, handed the keys to an engineer from the coastal authority and moved into a cottage in the village, "
    "from where he could still see the light turning every night. He later said that he had never once slept "
    "through a change in the weather, because the sound of the wind against the tower had become part of how "
    "he understood time. Today the station is monitored remotely, the lens has been replaced by a compact array "
    "of light-emitting diodes, and the old keeper's quarters house a small museum that displays the original "
    "log books, a brass foghorn, and a model of the mercury bath that once carried several tonnes of glass as "
    "if it weighed nothing at all."
)
LONG_USER = PASSAGE + "\n\nSummarise the text above in three sentences."


def messages(request_no: int, user: str) -> list[dict[str, str]]:
    """A chat with an explicit system message (so every server renders the same ChatML) headed by a number."""
    return [
        {"role": "system", "content": f"Request {request_no % 10000:04d}. {SYSTEM}"},
        {"role": "user", "content": user},
    ]


_numbers = itertools.count(1)


@dataclass
class Peer:
    """How to talk to one server: its base URL and the request fields it needs for comparable lengths."""

    name: str
    base_url: str
    # Extra request fields that stop a peer from ending at EOS (Thox has none; it gets long-answer prompts).
    no_eos: dict[str, Any] = field(default_factory=dict)
    include_usage: bool = True  # False: the server ignores stream_options; tokens are counted from the stream
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per prompt kind, when usage is missing


@dataclass
class Result:
    """One streamed request."""

    sent: float
    ttft_s: float
    first: float
    last: float
    done: float
    completion_tokens: int
    prompt_tokens: int | None
    counted_from_stream: bool
    chunks: int
    server_timings: dict[str, Any] | None = None  # llama-server's own "timings" object, when it sends one

    @property
    def decode_tok_s(self) -> float | None:
        if self.completion_tokens < 2 or self.last <= self.first:
            return None
        return (self.completion_tokens - 1) / (self.last - self.first)


async def stream_chat(
    session: aiohttp.ClientSession, peer: Peer, user: str, max_tokens: int, no_eos: bool = True
) -> Result:
    """One streamed chat completion, timed chunk by chunk."""
    body: dict[str, Any] = {
        "messages": messages(next(_numbers), user),
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1234,
        "stream": True,
    }
    if peer.include_usage:
        body["stream_options"] = {"include_usage": True}
    if no_eos:
        body.update(peer.no_eos)
    sent = time.perf_counter()
    first = last = 0.0
    chunks = 0
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    async with session.post(f"{peer.base_url}/chat/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{peer.name}: HTTP {response.status}: {(await response.text())[:300]}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            if event.get("timings"):
                timings = event["timings"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if not first:
                        first = now
                    last = now
                    chunks += 1
        done = time.perf_counter()
    if not first:
        raise RuntimeError(f"{peer.name}: the stream carried no content")
    if usage is not None:
        tokens, prompt, counted = int(usage["completion_tokens"]), int(usage["prompt_tokens"]), False
    else:
        tokens, prompt, counted = chunks, None, True
    return Result(sent, first - sent, first, last, done, tokens, prompt, counted, chunks, timings)


def _server_reported(results: list[Result], key: str) -> float | None:
    """The median of one field of the server's own timings (llama-server only), for comparison with ours."""
    values = [float(r.server_timings[key]) for r in results if r.server_timings and key in r.server_timings]
    return round(statistics.median(values), 1) if values else None


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank), p in [0, 100]."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


def _prompt_tokens(peer: Peer, results: list[Result], kind: str) -> int | None:
    found = {r.prompt_tokens for r in results if r.prompt_tokens is not None}
    if found:
        return max(found)
    return peer.prompt_tokens.get(kind)


async def single_stream(session: aiohttp.ClientSession, peer: Peer, runs: int, max_tokens: int) -> dict[str, Any]:
    """Decode tokens/s of one stream: median of `runs` requests of `max_tokens` tokens."""
    results = [await stream_chat(session, peer, SHORT_USER, max_tokens) for _ in range(runs)]
    rates = [r.decode_tok_s for r in results if r.decode_tok_s]
    return {
        "runs": runs,
        "max_tokens": max_tokens,
        "completion_tokens": [r.completion_tokens for r in results],
        "counted_from_stream": results[0].counted_from_stream,
        "decode_tok_s": [round(x, 1) for x in rates],
        "decode_tok_s_median": round(statistics.median(rates), 1) if rates else None,
        "server_reported_decode_tok_s_median": _server_reported(results, "predicted_per_second"),
    }


async def prefill(session: aiohttp.ClientSession, peer: Peer, user: str, kind: str, runs: int) -> dict[str, Any]:
    """TTFT and prefill tokens/s for one prompt, `runs` requests of 2 completion tokens each."""
    results = [await stream_chat(session, peer, user, 2) for _ in range(runs)]
    ttfts = [r.ttft_s for r in results]
    prompt = _prompt_tokens(peer, results, kind)
    out: dict[str, Any] = {
        "runs": runs,
        "prompt_tokens": prompt,
        "ttft_ms": [round(t * 1000, 1) for t in ttfts],
        "ttft_ms_p50": round(pct(ttfts, 50) * 1000, 1),
        "ttft_ms_p95": round(pct(ttfts, 95) * 1000, 1),
    }
    if prompt:
        out["prefill_tok_s_median"] = round(prompt / statistics.median(ttfts), 1)
    out["server_reported_prefill_tok_s_median"] = _server_reported(results, "prompt_per_second")
    return out


async def concurrent(
    session: aiohttp.ClientSession, peer: Peer, streams: int, per_stream: int, max_tokens: int
) -> dict[str, Any]:
    """`streams` clients, each sending `per_stream` requests back to back: aggregate tokens/s and TTFT."""

    async def client() -> list[Result]:
        return [await stream_chat(session, peer, SHORT_USER, max_tokens) for _ in range(per_stream)]

    started = time.perf_counter()
    per_client = await asyncio.gather(*(client() for _ in range(streams)))
    wall = time.perf_counter() - started
    results = [r for rs in per_client for r in rs]
    tokens = sum(r.completion_tokens for r in results)
    ttfts = [r.ttft_s for r in results]
    return {
        "streams": streams,
        "requests": len(results),
        "max_tokens": max_tokens,
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "completion_tokens_min": min(r.completion_tokens for r in results),
        "aggregate_tok_s": round(tokens / wall, 1),
        "ttft_ms_p50": round(pct(ttfts, 50) * 1000, 1),
        "ttft_ms_p95": round(pct(ttfts, 95) * 1000, 1),
    }


async def embeddings(
    session: aiohttp.ClientSession, base_url: str, model: str, texts: list[str], single_runs: int, batch_runs: int
) -> dict[str, Any]:
    """Embeddings per second for 1 input and for a batch of all `texts`, plus the vectors of that batch."""

    async def embed(inputs: list[str]) -> tuple[float, list[list[float]]]:
        started = time.perf_counter()
        async with session.post(f"{base_url}/embeddings", json={"model": model, "input": inputs}) as response:
            if response.status != 200:
                raise RuntimeError(f"embeddings: HTTP {response.status}: {(await response.text())[:300]}")
            data = await response.json()
        elapsed = time.perf_counter() - started
        return elapsed, [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]

    await embed(texts[:1])  # warm-up
    await embed(texts)
    singles = [(await embed([texts[i % len(texts)]]))[0] for i in range(single_runs)]
    batches = []
    vectors: list[list[float]] = []
    for _ in range(batch_runs):
        elapsed, vectors = await embed(texts)
        batches.append(elapsed)
    return {
        "single_runs": single_runs,
        "batch_runs": batch_runs,
        "batch_size": len(texts),
        "single_ms_median": round(statistics.median(singles) * 1000, 2),
        "batch_ms_median": round(statistics.median(batches) * 1000, 2),
        "emb_s_1": round(1 / statistics.median(singles), 1),
        "emb_s_batch": round(len(texts) / statistics.median(batches), 1),
        "vectors": vectors,
    }
