"""The engine host process: owns the executor, its KV caches and the scheduler, behind a unix socket.

Run as `python -m engines.host --socket PATH --gguf FILE --cache-dir DIR`. It listens at once, accepts exactly
one client (the agent), converts the model if the cache misses (sending progress frames), loads it, sends
"ready" and then serves generate/cancel frames (see `engines.wire`). When the client goes away the host exits:
a crashed agent must not leave an engine holding memory, and the agent always starts a fresh host.
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
from pathlib import Path
from typing import Any

from engines.base import SamplingParams
from engines.convert import ensure_converted
from engines.onnxruntime import OrtExecutor
from engines.runtime.scheduler import GenerationRequest, Scheduler
from engines.wire import Frame, encode_frame, read_frame

log = logging.getLogger("engines.host")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engines.host", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True, help="unix socket path to listen on")
    parser.add_argument("--gguf", type=Path, required=True, help="model file")
    parser.add_argument("--sha256", default=None, help="the model file's sha256, if already known")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where converted graphs are cached")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--max-context", type=int, default=2048, help="tokens per sequence (prompt + output)")
    parser.add_argument("--max-active", type=int, default=4, help="sequences stepped concurrently")
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
    """The one agent connection: frames out through a single writer, frames in dispatched to the scheduler."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, frame: Frame) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode_frame(frame))


async def _load(args: argparse.Namespace, conn: _Connection) -> tuple[OrtExecutor, dict[str, Any]]:
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
        ensure_converted, args.gguf, args.cache_dir, sha256=args.sha256, progress=progress
    )
    converted_at = time.monotonic()
    conn.send({"op": "progress", "stage": "load", "done": 0, "total": 1})
    executor = await asyncio.to_thread(OrtExecutor, converted, threads=args.threads, max_context=args.max_context)
    info = {
        "gguf_sha256": converted.gguf_sha256,
        "onnx": str(converted.model_path),
        "vocab_size": executor.vocab_size,
        "prepare_seconds": round(converted_at - started, 3),
        "load_seconds": round(time.monotonic() - converted_at, 3),
    }
    return executor, info


async def _serve_connection(args: argparse.Namespace, conn: _Connection) -> None:
    executor, info = await _load(args, conn)
    scheduler = Scheduler(executor, conn.send, max_active=args.max_active)
    conn.send({"op": "ready", "model": info, "max_context": executor.max_context, "pid": os.getpid()})
    stepping = asyncio.create_task(scheduler.run(), name="scheduler")
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
            else:
                log.warning("ignoring unknown op %r", op)
            await conn.writer.drain()
    finally:
        stepping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stepping
        executor.close()


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
