"""The engine host's wire protocol: length-prefixed JSON frames over a unix stream socket, one type per op.

Each frame is a 4-byte big-endian payload length followed by one UTF-8 JSON object with an "op" field.
JSON rather than a binary codec because frames are tiny (a few token ids) and a human can read a capture.
`encode` turns a message into a frame and `decode_to_host` / `decode_to_agent` turn a payload back into a
message; nothing else in either process reads or writes frame fields.

agent -> host
  {"op": "generate", "id": int, "prompt": [int], "stop_ids": [int], "max_tokens": int, "temperature": float,
   "top_p": float, "seed": int|null, "presence_penalty": float, "frequency_penalty": float,
   "logit_bias": [[int, float]], "grammar": str|null, "logprobs": int|null}
                                                                    GenerationRequest (grammar: llguidance's;
                                                                    logprobs: alternatives per token, 0-20)
  {"op": "cancel", "id": int}                                       Cancel
  {"op": "embed", "id": int, "inputs": [[int]]}                    Embed: token ids per input, specials included
  {"op": "limit", "max_batch": int}                                 Limit: decode at most this many per step

host -> agent
  {"op": "progress", "stage": str, "done": int, "total": int}      Progress, while converting/loading
  {"op": "ready", "model": {...}, "encoder": {...}|null, "max_context": int, "pid": int}
                                                                    Ready, once, when requests can be served
  {"op": "tokens", "id": int, "ids": [int], "logprobs": [[float, [[int, float]]]]|absent}
                                                                    Tokens: sampled tokens of one sequence, with
                                                                    each one's logprob and top alternatives
  {"op": "done", "id": int, "finish_reason": "stop"|"length"|"cancelled",
   "prompt_tokens": int, "completion_tokens": int}                 Done
  {"op": "embeddings", "id": int, "shape": [n, dim], "data": str, "tokens": int}
                                                                    Embeddings; data: base64 of little-endian f32
  {"op": "stats", "scheduler": {...}}                              Stats: counters, when they change
  {"op": "limited", "max_batch": int}                               Limited: a Limit took effect (value applied)
  {"op": "error", "id": int|null, "message": str, "code": str}     Failed: this request failed, others carry on
                                                                    (code "overloaded": the queue is full;
                                                                    "bad_request": a malformed frame, id null
                                                                    when the frame did not say whose it was)
  {"op": "fatal", "message": str}                                   Fatal: the host cannot go on and is exiting

A frame whose JSON or fields are wrong is a `FrameError` (the framing itself is intact, so the reader answers it
and reads on); broken framing (a cut header, an end of stream inside a frame) is a `ProtocolError` and ends the
connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from engines.base import (
    MAX_TOP_LOGPROBS,
    Done,
    EngineError,
    Failed,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    Tokens,
)

_HEADER = struct.Struct(">I")
# Far above any legitimate frame (a 128k-token prompt is ~1 MB of JSON); anything bigger is a bug or garbage.
MAX_FRAME_BYTES = 16 * 1024 * 1024
_DISCARD_CHUNK = 64 * 1024


class ProtocolError(EngineError):
    """The peer's byte stream is not a sequence of frames (the connection cannot go on)."""


class FrameError(EngineError):
    """One frame is malformed (bad JSON, unknown op, wrong fields); `request_id` is its id if it had one."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class Cancel:
    """Stop a generation at the next token boundary."""

    id: int


@dataclass(frozen=True)
class Embed:
    """Embed token sequences with the host's encoder."""

    id: int
    inputs: list[list[int]]


@dataclass(frozen=True)
class Limit:
    """Decode at most `max_batch` sequences per step (thermal policy)."""

    max_batch: int


@dataclass(frozen=True)
class Progress:
    """A step of model preparation before Ready."""

    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class Ready:
    """The host serves requests now."""

    model: dict[str, Any]
    encoder: dict[str, Any] | None
    max_context: int
    pid: int


@dataclass(frozen=True)
class Embeddings:
    """Vectors for an Embed, one row per input."""

    id: int
    vectors: npt.NDArray[np.float32]
    tokens: int


@dataclass(frozen=True)
class Stats:
    """Scheduler counters for health reports."""

    scheduler: dict[str, Any]


@dataclass(frozen=True)
class Limited:
    """A Limit took effect with this value."""

    max_batch: int


@dataclass(frozen=True)
class Fatal:
    """The host cannot go on and is exiting."""

    message: str


ToHost: TypeAlias = GenerationRequest | Cancel | Embed | Limit
ToAgent: TypeAlias = Progress | Ready | Tokens | Done | Embeddings | Stats | Limited | Failed | Fatal
Message: TypeAlias = ToHost | ToAgent


# ---------------------------------------------------------------------------------------------------- encoding


def _fields(message: Message) -> dict[str, Any]:
    if isinstance(message, GenerationRequest):
        p = message.params
        return {
            "op": "generate",
            "id": message.id,
            "prompt": list(message.prompt),
            "stop_ids": sorted(message.stop_ids),
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "logit_bias": [[token, bias] for token, bias in p.logit_bias],
            "grammar": message.grammar,
            "logprobs": p.logprobs,
        }
    if isinstance(message, Embeddings):
        vectors = np.ascontiguousarray(message.vectors, dtype="<f4")
        return {
            "op": "embeddings",
            "id": message.id,
            "shape": list(vectors.shape),
            "data": base64.b64encode(vectors.tobytes()).decode(),
            "tokens": message.tokens,
        }
    if isinstance(message, Tokens):
        fields: dict[str, Any] = {"op": "tokens", "id": message.id, "ids": list(message.ids)}
        if message.logprobs is not None:
            fields["logprobs"] = [[s.logprob, [list(alt) for alt in s.top]] for s in message.logprobs]
        return fields
    op = _OPS[type(message)]
    return {"op": op, **{name: getattr(message, name) for name in message.__dataclass_fields__}}


_OPS: dict[type, str] = {
    Cancel: "cancel",
    Embed: "embed",
    Limit: "limit",
    Progress: "progress",
    Ready: "ready",
    Done: "done",
    Stats: "stats",
    Limited: "limited",
    Failed: "error",
    Fatal: "fatal",
}


def encode(message: Message) -> bytes:
    """One frame for `message`, header included; ProtocolError if it would exceed MAX_FRAME_BYTES."""
    payload = json.dumps(_fields(message), separators=(",", ":"), allow_nan=False).encode()
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return _HEADER.pack(len(payload)) + payload


# ---------------------------------------------------------------------------------------------------- framing


async def read_payload(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload; None on a clean end of stream between frames.

    An oversized frame is read past (in small pieces, never held whole) and reported as a FrameError, so the
    stream stays in step; a stream cut inside a frame is a ProtocolError.
    """
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame header") from exc
        return None
    (length,) = _HEADER.unpack(header)
    try:
        if length > MAX_FRAME_BYTES:
            left = length
            while left:
                left -= len(await reader.readexactly(min(left, _DISCARD_CHUNK)))
            raise FrameError(f"frame length {length} exceeds the {MAX_FRAME_BYTES}-byte limit; it was skipped")
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("stream ended inside a frame") from exc


# ---------------------------------------------------------------------------------------------------- decoding


class _Fields:
    """Typed access to one decoded frame's fields; every failure is a FrameError naming the op and the field."""

    def __init__(self, frame: dict[str, Any], op: str) -> None:
        self.frame = frame
        self.op = op
        raw_id = frame.get("id")
        self.request_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None

    def fail(self, name: str, expected: str) -> FrameError:
        shown = json.dumps(self.frame.get(name))[:80] if name in self.frame else "nothing"
        return FrameError(f"bad {self.op} frame: {name!r} must be {expected}, not {shown}", self.request_id)

    def integer(self, name: str, *, minimum: int | None = None) -> int:
        value = self.frame.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
            raise self.fail(name, "an integer" if minimum is None else f"an integer >= {minimum}")
        return value

    def integer_in(self, name: str, minimum: int, maximum: int) -> int:
        value = self.frame.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise self.fail(name, f"an integer in [{minimum}, {maximum}]")
        return value

    def optional_integer(self, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
        if self.frame.get(name) is None:
            return None
        if minimum is not None and maximum is not None:
            return self.integer_in(name, minimum, maximum)
        return self.integer(name)

    def number(self, name: str, default: float) -> float:
        value = self.frame.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(name, "a finite number")
        return float(value)

    def text(self, name: str) -> str:
        value = self.frame.get(name)
        if not isinstance(value, str):
            raise self.fail(name, "a string")
        return value

    def logit_bias(self, name: str) -> tuple[tuple[int, float], ...]:
        value = self.frame.get(name, [])
        pairs = []
        for pair in value if isinstance(value, list) else [None]:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise self.fail(name, "a list of [token id, bias] pairs")
            token, bias = pair
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise self.fail(name, "a list of [token id, bias] pairs")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
                raise self.fail(name, "a list of [token id, bias] pairs")
            pairs.append((token, float(bias)))
        return tuple(pairs)

    def optional_text(self, name: str) -> str | None:
        return None if self.frame.get(name) is None else self.text(name)

    def token_ids(self, name: str, value: Any = None, *, default: list[int] | None = None) -> list[int]:
        value = self.frame.get(name, default) if value is None else value
        if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value
        ):
            raise self.fail(name, "a list of token ids (integers >= 0)")
        return value

    def mapping(self, name: str, *, nullable: bool = False) -> dict[str, Any] | None:
        value = self.frame.get(name)
        if value is None and nullable:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, "an object")
        return value


def _generate(f: _Fields) -> GenerationRequest:
    params = SamplingParams(
        max_tokens=f.integer("max_tokens", minimum=1),
        temperature=f.number("temperature", 1.0),
        top_p=f.number("top_p", 1.0),
        seed=f.optional_integer("seed"),
        presence_penalty=f.number("presence_penalty", 0.0),
        frequency_penalty=f.number("frequency_penalty", 0.0),
        logit_bias=f.logit_bias("logit_bias"),
        logprobs=f.optional_integer("logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS),
    )
    return GenerationRequest(
        id=f.integer("id"),
        prompt=f.token_ids("prompt"),
        params=params,
        stop_ids=frozenset(f.token_ids("stop_ids", default=[])),
        grammar=f.optional_text("grammar"),
    )


def _embed(f: _Fields) -> Embed:
    inputs = f.frame.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise f.fail("inputs", "a non-empty list of token id lists")
    return Embed(id=f.integer("id"), inputs=[f.token_ids("inputs", item) for item in inputs])


def _embeddings(f: _Fields) -> Embeddings:
    shape = f.frame.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise f.fail("shape", "[rows, dimensions]")
    try:
        data = base64.b64decode(f.text("data"), validate=True)
    except binascii.Error as exc:
        raise f.fail("data", "base64") from exc
    if len(data) != shape[0] * shape[1] * 4:
        raise f.fail("data", f"{shape[0]} x {shape[1]} float32 values")
    vectors = np.frombuffer(data, dtype="<f4").reshape(shape[0], shape[1]).astype(np.float32)
    return Embeddings(id=f.integer("id"), vectors=vectors, tokens=f.integer("tokens", minimum=0))


def _tokens(f: _Fields) -> Tokens:
    ids = tuple(f.token_ids("ids"))
    raw = f.frame.get("logprobs")
    if raw is None:
        return Tokens(f.integer("id"), ids)
    expected = "one [logprob, [[token id, logprob], ...]] per token"
    if not isinstance(raw, list) or len(raw) != len(ids):
        raise f.fail("logprobs", expected)
    scored = []
    for entry in raw:
        try:
            logprob, top = entry
            scored.append(TokenLogprob(_logprob(logprob), tuple((_token_id(t), _logprob(lp)) for t, lp in top)))
        except (TypeError, ValueError):
            raise f.fail("logprobs", expected) from None
    return Tokens(f.integer("id"), ids, tuple(scored))


def _token_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def _logprob(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value <= 0.0:
        raise ValueError(value)
    return float(value)


def _failed(f: _Fields) -> Failed:
    return Failed(id=f.optional_integer("id"), message=f.text("message"), code=f.text("code"))


_TO_HOST: dict[str, Callable[[_Fields], ToHost]] = {
    "generate": _generate,
    "cancel": lambda f: Cancel(f.integer("id")),
    "embed": _embed,
    "limit": lambda f: Limit(f.integer("max_batch", minimum=1)),
}
_TO_AGENT: dict[str, Callable[[_Fields], ToAgent]] = {
    "progress": lambda f: Progress(f.text("stage"), f.integer("done"), f.integer("total")),
    "ready": lambda f: Ready(
        f.mapping("model") or {}, f.mapping("encoder", nullable=True), f.integer("max_context"), f.integer("pid")
    ),
    "tokens": _tokens,
    "done": lambda f: Done(
        f.integer("id"), f.text("finish_reason"), f.integer("prompt_tokens"), f.integer("completion_tokens")
    ),
    "embeddings": _embeddings,
    "stats": lambda f: Stats(f.mapping("scheduler") or {}),
    "limited": lambda f: Limited(f.integer("max_batch")),
    "error": _failed,
    "fatal": lambda f: Fatal(f.text("message")),
}


def _decode(payload: bytes, table: dict[str, Callable[[_Fields], Any]], direction: str) -> Any:
    try:
        frame = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(f"frame is not JSON: {exc}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
        raise FrameError("frame is not an object with a string 'op'")
    fields = _Fields(frame, frame["op"])
    build = table.get(frame["op"])
    if build is None:
        raise FrameError(
            f"unknown op {frame['op'][:40]!r} {direction}; expected one of {sorted(table)}", fields.request_id
        )
    return build(fields)


def decode_to_host(payload: bytes) -> ToHost:
    """A message the agent sent; FrameError when it is malformed."""
    message: ToHost = _decode(payload, _TO_HOST, "from the agent")
    return message


def decode_to_agent(payload: bytes) -> ToAgent:
    """A message the host sent; FrameError when it is malformed."""
    message: ToAgent = _decode(payload, _TO_AGENT, "from the engine host")
    return message
