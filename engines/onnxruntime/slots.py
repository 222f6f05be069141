"""The fused graph's KV cache: per layer one keys and one values buffer [max_batch, n_kv, capacity, head_dim].

Live sequences sit in slots 0..n-1, so one batched step binds the contiguous view [:n] of every buffer and
GroupQueryAttention writes each row's new position in place (past and present share the memory). Capacity grows
by reallocation when a sequence needs more room, so memory follows the longest live sequence rather than the
context limit. The buffers are anonymous memory maps without transparent huge pages, so pages nobody wrote (slots
not in use, positions past a sequence's end) are never committed: RSS follows the tokens actually held.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

MIN_CAPACITY = 64


def lazy_buffer(shape: tuple[int, ...]) -> F32:
    """A float32 array over fresh anonymous memory: zero-filled, committed page by page as it is written.

    numpy would advise huge pages for an array this large, and one written float would then commit 2 MB.
    """
    memory = mmap.mmap(-1, max(1, math.prod(shape)) * 4)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=np.float32, count=math.prod(shape)).reshape(shape)


class SlotPool:
    """KV buffers for `max_batch` slots; slot contents move only through the methods here."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, max_batch: int, max_context: int) -> None:
        self.n_layers, self.n_kv, self.head_dim = n_layers, n_kv, head_dim
        self.max_batch, self.max_context = max_batch, max_context
        self.capacity = 0
        self.generation = 0  # bumped whenever the buffers are replaced, so bindings over them are rebuilt
        self.buffers: list[F32] = []  # layer i: keys at 2*i, values at 2*i + 1

    def ensure(self, needed: int, lengths: list[int]) -> None:
        """Make every slot hold at least `needed` positions, keeping the first lengths[s] of slot s."""
        if needed <= self.capacity:
            return
        if needed > self.max_context:
            raise ValueError(f"{needed} positions exceed the pool's limit of {self.max_context}")
        capacity = min(self.max_context, max(needed, 2 * self.capacity, MIN_CAPACITY))
        shape = (self.max_batch, self.n_kv, capacity, self.head_dim)
        fresh = [lazy_buffer(shape) for _ in range(2 * self.n_layers)]
        n, keep = len(lengths), max(lengths, default=0)
        if n and keep:
            for old, new in zip(self.buffers, fresh, strict=True):
                new[:n, :, :keep] = old[:n, :, :keep]
        self.buffers = fresh
        self.capacity = capacity
        self.generation += 1

    def views(self, start: int, stop: int) -> list[F32]:
        """Slots [start, stop) of every buffer, as contiguous views (no copy)."""
        return [b[start:stop] for b in self.buffers]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        if length:
            for b in self.buffers:
                b[dst, :, :length] = b[src, :, :length]

    def swap(self, a: int, len_a: int, b: int, len_b: int) -> None:
        """Exchange the contents of two slots."""
        for buf in self.buffers:
            saved = buf[a, :, :len_a].copy()
            if len_b:
                buf[a, :, :len_b] = buf[b, :, :len_b]
            buf[b, :, :len_a] = saved

    def read(self, slot: int, length: int) -> F32:
        """A host copy of the first `length` positions: [n_layers, 2, n_kv, length, head_dim]."""
        out = np.empty((self.n_layers, 2, self.n_kv, length, self.head_dim), np.float32)
        for i, buf in enumerate(self.buffers):
            out[i // 2, i % 2] = buf[slot, :, :length]
        return out

    def write(self, slot: int, kv: F32) -> None:
        """Fill the first kv.shape[3] positions of `slot` from a `read` copy."""
        length = kv.shape[3]
        for i, buf in enumerate(self.buffers):
            buf[slot, :, :length] = kv[i // 2, i % 2]

    def free(self) -> None:
        """Drop the buffers."""
        self.buffers = []
        self.capacity = 0
        self.generation += 1
