"""Incremental detokenization: whole characters only, equal to a full decode, specials not rendered."""

from __future__ import annotations

import pytest

from engines.text import GgufTokenizer, IncrementalDetokenizer
from tests.engines.text_model import smollm_pipeline

MULTIBYTE = "Emoji 😀🎉👩‍💻, CJK 東京都庁 漢字テスト, accents naïve Größe, math ∑∫√ end"


@pytest.fixture
def tokenizer() -> GgufTokenizer:
    return smollm_pipeline().tokenizer


def byte_token(tokenizer: GgufTokenizer, raw: bytes) -> int:
    """Id of the token that stands for exactly these bytes."""
    return next(i for i in range(tokenizer.vocab_size) if tokenizer.token_bytes(i) == raw)


def test_multibyte_characters_split_across_tokens_are_never_cut(tokenizer: GgufTokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE)
    # Make sure the text really splits characters across tokens, or the test below proves nothing.
    partial = [i for i in ids if not _is_utf8(tokenizer.token_bytes(i))]
    assert len(partial) >= 4
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # a token that ended mid-character produced nothing yet
    assert "".join(pieces) + detok.flush() == MULTIBYTE


def test_each_piece_ends_on_a_character_boundary(tokenizer: GgufTokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(tokenizer)
    emitted = ""
    for n, i in enumerate(ids, start=1):
        emitted += detok.push(i)
        # Everything emitted so far is a prefix of the full text, character for character.
        assert MULTIBYTE.startswith(emitted)
        assert len(tokenizer.decode(ids[:n]).rstrip("\ufffd")) == len(emitted)


def test_flush_turns_an_unfinished_character_into_replacement(tokenizer: GgufTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.push(tokenizer.encode("ok")[0]) == "ok"
    assert detok.push(byte_token(tokenizer, b"\xf0")) == ""  # first byte of a 4-byte sequence: held back
    assert detok.push(byte_token(tokenizer, b"\x9f")) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""  # flushing empties the buffer


def test_invalid_bytes_are_replaced_at_once(tokenizer: GgufTokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    # A lone continuation byte can never become valid, so there is nothing to wait for.
    assert detok.push(byte_token(tokenizer, b"\x80")) == "\ufffd"
    assert detok.push(byte_token(tokenizer, b"\xe6")) == ""
    assert detok.push(tokenizer.encode("A")[0]) == "\ufffdA"  # a broken sequence is replaced, then "A"


def test_control_tokens_are_not_rendered(tokenizer: GgufTokenizer) -> None:
    text = "<|im_start|>assistant\nSure 😀<|im_end|>\n"
    ids = tokenizer.encode(text)
    assert tokenizer.bos_id in ids
    detok = IncrementalDetokenizer(tokenizer)
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    assert out == "assistant\nSure 😀\n"
    assert out == tokenizer.decode(ids, skip_special=True)
    assert tokenizer.decode(ids) == text


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
