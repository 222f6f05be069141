"""The engine host process: owns the executors, their KV caches and the scheduler, behind a unix socket.

Run as `python -m engines.host --socket PATH --gguf FILE --cache-dir DIR [--encoder DIR]`. It listens at once,
accepts exactly one client (the agent), converts the models if the cache misses (sending progress frames),
loads them, sends "ready" and then serves generate/cancel/embed frames (see `engines.wire`). When the client
goes away the host exits: a crashed agent must not leave an engine holding memory, and the agent always starts a
fresh host.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines.base import EngineError, SamplingParams
from engines.convert import ensure_converted
from engines.encoder import OrtEncoder
from engines.onnxruntime import OrtExecutor
from engines.runtime.scheduler import GenerationRequest, Scheduler, SchedulerLimits
from engines.wire import Frame, encode_frame, read_frame

log = logging.getLogger("engines.host")

# Scheduler counters go to the agent (for /v1/health) at most this often, and only when they changed.
_STATS_INTERVAL_S = 1.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SchedulerLimits()
    parser = argparse.ArgumentParser(prog="python -m engines.host", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True, help="unix socket path to listen on")
    parser.add_argument("--gguf", type=Path, required=True, help="the chat model file")
    parser.add_argument("--sha256", default=None, help="the model file's sha256, if already known")
    parser.add_argument("--encoder", type=Path, default=None, help="an embedding model folder to serve too")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where converted graphs are cached")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--max-context", type=int, default=2048, help="tokens per sequence (prompt + output)")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="requests waiting for a slot")
    parser.add_argument("--kv-budget-tokens", type=int, default=defaults.kv_budget_tokens, help="KV pool bound")
    parser.add_argument("--prefix-cache-tokens", type=int, default=defaults.prefix_cache_tokens,
                        help="KV kept for prefix reuse")
    return parser.parse_args(argv)


def _request_from_frame(frame: Frame) -> GenerationRequest:
    """Build a request from a generate frame; KeyError/TypeError/ValueError on a malformed frame."""
    params = SamplingParams(
        max_tokens=int(frame["max_tokens"]),
        temperature=float(frame.get("temperature", 1.0)),
        top_p=float(frame.get("top_p", 1.0)),
        seed=None if frame.get("seed") is None else int(frame["seed"]),
        presence_penalty=float(frame.get("presence_penalty", 0.0)),
        frequency_penalty=float(frame.get("frequency_penalty", 0.0)),
    )
    return GenerationRequest(
        id=int(frame["id"]),
        prompt=[int(t) for t in frame["prompt"]],
        params=params,
        stop_ids=frozenset(int(t) for t in frame.get("stop_ids", ())),
    )


class _Connection:
    """The one agent connection: frames go out through a single writer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, frame: Frame) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(frame))


@dataclass
class _Models:
    executor: OrtExecutor
    encoder: OrtEncoder | None
    info: dict[str, Any]

    def close(self) -> None:
        self.executor.close()
        if self.encoder is not None:
            self.encoder.close()


async def _load(args: argparse.Namespace, conn: _Connection) -> _Models:
    loop = asyncio.get_running_loop()
    last_sent = [0.0]

    def progress(stage: str, done: int, total: int) -> None:
        # Called from the conversion thread; throttle so a fast stage does not flood the socket.
        now = time.monotonic()
        if done == total or now - last_sent[0] > 0.2:
            last_sent[0] = now
            frame = {"op": "progress", "stage": stage, "done": done, "total": total}
            loop.call_soon_threadsafe(conn.send, frame)

    started = time.monotonic()
    converted = await asyncio.to_thread(
        ensure_converted, args.gguf, args.cache_dir, sha256=args.sha256, progress=progress)
    conn.send({"op": "progress", "stage": "load", "done": 0, "total": 1})
    executor = await asyncio.to_thread(
        OrtExecutor, converted, args.threads, max_context=args.max_context, max_batch=args.max_batch)
    encoder = None
    if args.encoder is not None:
        encoder = await asyncio.to_thread(
            OrtEncoder.from_model_dir, args.encoder, args.cache_dir, threads=args.threads, progress=progress)
    info = {
        "gguf_sha256": converted.gguf_sha256,
        "onnx": str(converted.model_path),
        "flavour": converted.flavour,
        "vocab_size": executor.vocab_size,
        "max_batch": executor.max_batch,
        "load_seconds": round(time.monotonic() - started, 3),
    }
    return _Models(executor, encoder, info)


async def _embed(frame: Frame, models: _Models, scheduler: Scheduler, conn: _Connection) -> None:
    request_id = frame.get("id")
    encoder = models.encoder
    if encoder is None:
        conn.send({"op": "error", "id": request_id, "code": "bad_request", "message": "no embedding model is loaded"})
        return
    try:
        inputs = [[int(t) for t in item] for item in frame["inputs"]]
        vectors = await scheduler.call(lambda: encoder.embed(inputs))
    except (EngineError, KeyError, TypeError, ValueError) as exc:
        conn.send({"op": "error", "id": request_id, "code": "bad_request", "message": f"embedding failed: {exc}"})
        return
    conn.send({
        "op": "embeddings", "id": request_id, "shape": list(vectors.shape),
        "data": base64.b64encode(vectors.astype("<f4").tobytes()).decode(),
        "tokens": sum(len(item) for item in inputs),
    })


async def _report_stats(scheduler: Scheduler, conn: _Connection) -> None:
    last: dict[str, Any] = {}
    while True:
        await asyncio.sleep(_STATS_INTERVAL_S)
        stats = scheduler.stats()
        if stats != last:
            conn.send({"op": "stats", "scheduler": stats})
            last = stats


async def _serve_connection(args: argparse.Namespace, conn: _Connection) -> None:
    models = await _load(args, conn)
    limits = SchedulerLimits(max_batch=args.max_batch, max_queue=args.max_queue,
                             kv_budget_tokens=args.kv_budget_tokens, prefix_cache_tokens=args.prefix_cache_tokens)
    scheduler = Scheduler(models.executor, conn.send, limits)
    encoder_info = None if models.encoder is None else {
        "dimensions": models.encoder.dimensions, "max_tokens": models.encoder.max_tokens}
    conn.send({"op": "ready", "model": models.info, "encoder": encoder_info,
               "max_context": models.executor.max_context, "pid": os.getpid()})
    background = {asyncio.create_task(scheduler.run(), name="scheduler"),
                  asyncio.create_task(_report_stats(scheduler, conn), name="stats")}
    try:
        while (frame := await read_frame(conn.reader)) is not None:
            op = frame["op"]
            if op == "generate":
                try:
                    request = _request_from_frame(frame)
                except (KeyError, TypeError, ValueError) as exc:
                    conn.send({"op": "error", "id": frame.get("id"), "message": f"bad generate frame: {exc}",
                               "code": "bad_request"})
                    continue
                scheduler.submit(request)
            elif op == "cancel":
                scheduler.cancel(int(frame["id"]))
            elif op == "limit":
                conn.send({"op": "limited", "max_batch": scheduler.set_concurrency(int(frame["max_batch"]))})
            elif op == "embed":
                task = asyncio.create_task(_embed(frame, models, scheduler, conn))
                background.add(task)
                task.add_done_callback(background.discard)
            else:
                log.warning("ignoring unknown op %r", op)
            await conn.writer.drain()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        models.close()


async def _main(args: argparse.Namespace) -> int:
    done = asyncio.Event()
    failed = asyncio.Event()
    served = False

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        if served:  # one agent per host: a second client is a bug or an intruder
            writer.close()
            return
        served = True
        conn = _Connection(reader, writer)
        try:
            await _serve_connection(args, conn)
        except Exception as exc:  # the agent must learn why; it restarts us with backoff
            log.exception("engine host stopping")
            failed.set()
            conn.send({"op": "fatal", "message": f"{type(exc).__name__}: {exc}"})
            with contextlib.suppress(OSError):
                await writer.drain()
        finally:
            writer.close()
            done.set()

    args.socket.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(on_client, path=str(args.socket))
    os.chmod(args.socket, 0o600)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    async with server:
        await done.wait()
    args.socket.unlink(missing_ok=True)
    return 1 if failed.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the engine host process."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="engine-host %(levelname)s %(message)s")
    return asyncio.run(_main(_parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
