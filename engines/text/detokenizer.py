"""Incremental detokenization: turn a stream of token ids into text without ever splitting a character.

A byte-level BPE token can end in the middle of a UTF-8 sequence (an emoji is often 2-4 tokens), so each
token's raw bytes go through an incremental UTF-8 decoder that holds back an incomplete tail until the
bytes that finish it arrive. Bytes that can never become valid are replaced with U+FFFD at once.

Control tokens (`tokenizer.special_ids`, e.g. `<|im_start|>`) are not rendered: they are structure, not
text, and llama.cpp's server and HF's `skip_special_tokens` leave them out too. End-of-turn tokens are in
`stop_ids` and normally never reach `push` at all. So `"".join(push(i) for i in ids) + flush()` equals
`tokenizer.decode(ids, skip_special=True)`.
"""

from __future__ import annotations

import codecs
from typing import Protocol


class TokenBytes(Protocol):
    """What the detokenizer needs from a tokenizer."""

    @property
    def special_ids(self) -> frozenset[int]: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class IncrementalDetokenizer:
    """Turns pushed token ids into newly completed text, one call per token."""

    def __init__(self, tokenizer: TokenBytes) -> None:
        self._tokenizer = tokenizer
        self._special = tokenizer.special_ids
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        if token_id in self._special:
            return ""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        """Return what is held back at the end of generation (an unfinished character becomes U+FFFD)."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
