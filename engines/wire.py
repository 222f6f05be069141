"""The engine host's wire protocol: length-prefixed JSON frames over a unix stream socket.

Each frame is a 4-byte big-endian payload length followed by one UTF-8 JSON object with an "op" field.
JSON rather than a binary codec because frames are tiny (a few token ids) and a human can read a capture.

agent -> host
  {"op": "generate", "id": int, "prompt": [int], "max_tokens": int, "temperature": float, "top_p": float,
   "seed": int|null, "presence_penalty": float, "frequency_penalty": float}
  {"op": "cancel", "id": int}
  {"op": "embed", "id": int, "inputs": [[int]]}                    token ids per input, special tokens included
  {"op": "limit", "max_batch": int}                                 decode at most this many sequences per step

host -> agent
  {"op": "progress", "stage": str, "done": int, "total": int}      while converting/loading, before "ready"
  {"op": "ready", "model": {...}, "encoder": {...}|null, "max_context": int, "pid": int}
                                                                    once, when requests can be served
  {"op": "tokens", "id": int, "ids": [int]}                         sampled tokens of one sequence
  {"op": "done", "id": int, "finish_reason": "stop"|"length"|"cancelled",
   "prompt_tokens": int, "completion_tokens": int}
  {"op": "embeddings", "id": int, "shape": [n, dim], "data": str, "tokens": int}
                                                                    data: base64 of little-endian float32
  {"op": "stats", "scheduler": {...}}                              counters, when they change
  {"op": "limited", "max_batch": int}                               a "limit" took effect (the value applied)
  {"op": "error", "id": int, "message": str, "code": str}          this request failed; others carry on
                                                                    (code "overloaded": the queue is full)
  {"op": "fatal", "message": str}                                   the host cannot go on and is exiting
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from engines.base import EngineError

Frame = dict[str, Any]

_HEADER = struct.Struct(">I")
# Far above any legitimate frame (a 128k-token prompt is ~1 MB of JSON); anything bigger is a bug or garbage.
MAX_FRAME_BYTES = 16 * 1024 * 1024


class ProtocolError(EngineError):
    """The peer sent bytes that are not a valid frame."""


def encode_frame(frame: Frame) -> bytes:
    """Serialise one frame, header included."""
    payload = json.dumps(frame, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame; None on a clean end of stream between frames."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame header") from exc
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame length {length} exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("stream ended inside a frame") from exc
    try:
        frame = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from exc
    if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
        raise ProtocolError("frame is not an object with a string 'op'")
    return frame
