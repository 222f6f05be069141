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
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines import executors
from engines.base import EngineError, Executor, Failed, GenerationRequest
from engines.convert import ensure_converted
from engines.encoder import OrtEncoder
from engines.runtime.grammar import Grammars, MaskBatch, mask_executor, spare_cores, token_table
from engines.runtime.scheduler import Scheduler, SchedulerLimits
from engines.text.tokenizer import GgufTokenizer
from engines.wire import (
    Cancel,
    Embed,
    Embeddings,
    Fatal,
    FrameError,
    Limit,
    Limited,
    Progress,
    Ready,
    Stats,
    ToAgent,
    ToHost,
    decode_to_host,
    encode,
    read_payload,
)

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
    parser.add_argument(
        "--executor",
        default="onnxruntime",
        choices=executors.names(),
        help="what runs the model (engines/executors.py)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the executor")
    parser.add_argument("--max-context", type=int, default=2048, help="tokens per sequence (prompt + output)")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="requests waiting for a slot")
    parser.add_argument("--kv-budget-tokens", type=int, default=defaults.kv_budget_tokens, help="KV pool bound")
    parser.add_argument(
        "--prefix-cache-tokens", type=int, default=defaults.prefix_cache_tokens, help="KV kept for prefix reuse"
    )
    return parser.parse_args(argv)


class _Connection:
    """The one agent connection: frames go out through a single writer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, message: ToAgent) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))


@dataclass
class _Models:
    executor: Executor
    encoder: OrtEncoder | None
    info: dict[str, Any]
    grammars: Grammars

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
            loop.call_soon_threadsafe(conn.send, Progress(stage, done, total))

    started = time.monotonic()
    converted = await asyncio.to_thread(
        ensure_converted, args.gguf, args.cache_dir, sha256=args.sha256, progress=progress
    )
    conn.send(Progress("load", 0, 1))
    options = executors.ExecutorOptions(threads=args.threads, max_context=args.max_context, max_batch=args.max_batch)
    executor = await asyncio.to_thread(executors.create, args.executor, converted, options)
    encoder = None
    if args.encoder is not None:
        encoder = await asyncio.to_thread(
            OrtEncoder.from_model_dir, args.encoder, args.cache_dir, threads=args.threads, progress=progress
        )
    # The grammar engine works on the model's own vocabulary, read from the same file the model came from.
    table = await asyncio.to_thread(lambda: token_table(GgufTokenizer.from_gguf(args.gguf)))
    info = {
        "gguf_sha256": converted.gguf_sha256,
        "onnx": str(converted.model_path),
        "flavour": converted.flavour,
        "executor": args.executor,
        "vocab_size": executor.vocab_size,
        "max_batch": executor.max_batch,
        "load_seconds": round(time.monotonic() - started, 3),
    }
    return _Models(executor, encoder, info, Grammars(table))


async def _embed(request: Embed, models: _Models, scheduler: Scheduler, conn: _Connection) -> None:
    encoder = models.encoder
    if encoder is None:
        conn.send(Failed(request.id, "bad_request", "no embedding model is loaded"))
        return
    try:
        vectors = await scheduler.call(lambda: encoder.embed(request.inputs))
    except (EngineError, ValueError) as exc:
        conn.send(Failed(request.id, "bad_request", f"embedding failed: {exc}"))
        return
    conn.send(Embeddings(request.id, vectors, sum(len(item) for item in request.inputs)))


async def _report_stats(scheduler: Scheduler, conn: _Connection) -> None:
    last: dict[str, Any] = {}
    while True:
        await asyncio.sleep(_STATS_INTERVAL_S)
        stats = scheduler.stats()
        if stats != last:
            conn.send(Stats(stats))
            last = stats


async def _serve_connection(args: argparse.Namespace, conn: _Connection) -> None:
    models = await _load(args, conn)
    limits = SchedulerLimits(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        kv_budget_tokens=args.kv_budget_tokens,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )
    masks = MaskBatch(mask_executor(args.threads), models.executor.vocab_size, overlap=spare_cores(args.threads))
    scheduler = Scheduler(models.executor, conn.send, limits, (models.grammars, masks))
    encoder_info = (
        None
        if models.encoder is None
        else {"dimensions": models.encoder.dimensions, "max_tokens": models.encoder.max_tokens}
    )
    conn.send(Ready(models.info, encoder_info, models.executor.max_context, os.getpid()))
    background = {
        asyncio.create_task(scheduler.run(), name="scheduler"),
        asyncio.create_task(_report_stats(scheduler, conn), name="stats"),
    }
    try:
        while True:
            try:
                payload = await read_payload(conn.reader)
                if payload is None:
                    break
                message = decode_to_host(payload)
            except FrameError as exc:
                # The framing is intact: answer this one frame and serve the next.
                log.warning("malformed frame from the agent: %s", exc)
                conn.send(Failed(exc.request_id, "bad_request", str(exc)))
                continue
            _dispatch(message, models, scheduler, conn, background)
            await conn.writer.drain()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        models.close()


def _dispatch(
    message: ToHost, models: _Models, scheduler: Scheduler, conn: _Connection, background: set[asyncio.Task[None]]
) -> None:
    if isinstance(message, GenerationRequest):
        scheduler.submit(message)
    elif isinstance(message, Cancel):
        scheduler.cancel(message.id)
    elif isinstance(message, Limit):
        conn.send(Limited(scheduler.set_concurrency(message.max_batch)))
    else:
        task = asyncio.create_task(_embed(message, models, scheduler, conn))
        background.add(task)
        task.add_done_callback(background.discard)


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
            # Our own errors say what happened; anything else is a bug, named by its type.
            conn.send(Fatal(str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"))
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
