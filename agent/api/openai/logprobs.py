"""`logprobs` in OpenAI's two shapes: chat's `choices[].logprobs.content` and the legacy completions' object.

The engine reports, for each generated token, its log-probability and the most likely alternatives
(engines.base.TokenLogprob: after logit_bias, penalties and the grammar's mask, before temperature and top_p).
Here token ids become their text: a token that ends inside a UTF-8 character shows U+FFFD in `token` and its
exact bytes in `bytes`, as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engines.base import TokenLogprob
from engines.text.detokenizer import TokenBytes


@dataclass(frozen=True)
class Scored:
    """One generated token with its logprobs (generation yields it before the text the token completes)."""

    token: int
    logprob: TokenLogprob


def _token(tokenizer: TokenBytes, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_content(tokenizer: TokenBytes, scored: list[Scored]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries for these tokens."""
    entries = []
    for item in scored:
        text, raw = _token(tokenizer, item.token)
        alternatives = []
        for token_id, logprob in item.logprob.top:
            alt_text, alt_raw = _token(tokenizer, token_id)
            alternatives.append({"token": alt_text, "logprob": logprob, "bytes": alt_raw})
        entries.append({"token": text, "logprob": item.logprob.logprob, "bytes": raw, "top_logprobs": alternatives})
    return entries


def chat_logprobs(tokenizer: TokenBytes, scored: list[Scored]) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs` object."""
    return {"content": chat_content(tokenizer, scored), "refusal": None}


class CompletionLogprobs:
    """The legacy completions' `logprobs` object, chunk by chunk: `text_offset` counts on across chunks."""

    def __init__(self, tokenizer: TokenBytes) -> None:
        self._tokenizer = tokenizer
        self._offset = 0

    def shape(self, scored: list[Scored]) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for item in scored:
            text, _ = _token(self._tokenizer, item.token)
            tokens.append(text)
            token_logprobs.append(item.logprob.logprob)
            top.append({_token(self._tokenizer, t)[0]: lp for t, lp in item.logprob.top})
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
