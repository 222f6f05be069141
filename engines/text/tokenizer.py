"""Byte-level BPE tokenizer rebuilt from a GGUF file's own metadata, matching llama.cpp token for token.

The GGUF carries the vocabulary, merges, token types and special ids; we rebuild the equivalent HF
`tokenizers` pipeline from them so no `tokenizer.json` has to ship beside the model. Only pre-tokenizers whose
llama.cpp behaviour we have verified id-for-id (see tests/engines/test_tokenizer.py) are accepted; any other
one is refused rather than silently tokenizing differently from what the model was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from engines.base import ModelFormatError
from engines.gguf_file import GgufFile

# llama.cpp's token types (gguf TokenType): only these two change how text is split.
_TYPE_UNKNOWN = 2
_TYPE_CONTROL = 3
_TYPE_USER_DEFINED = 4

# Control-token texts llama.cpp treats as end-of-generation (llama-vocab.cpp, `special_eog_ids`), so a model
# whose GGUF names only one eos still stops at its end-of-turn marker.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<end_of_utterance>",
    }
)


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # llama.cpp "smollm": split every digit alone (\p{N}), then the GPT-2 regex; verified id-for-id.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


_PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


def _byte_decoder() -> dict[int, int]:
    """Map each code point of GPT-2's byte-to-unicode table back to its byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    code_points = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(code_points, printable, strict=True))


def _required(reader: GgufFile, key: str) -> Any:
    value = reader.get(key)
    if value is None:
        raise ModelFormatError(f"GGUF has no {key!r}; cannot build its tokenizer")
    return value


def _strings(reader: GgufFile, key: str) -> list[str]:
    value = _required(reader, key)
    # GGUF arrays hold one item type, so the first item tells a string array from an array of arrays.
    if not isinstance(value, list) or (value and not isinstance(value[0], str)):
        raise ModelFormatError(f"GGUF {key!r} is not an array of strings")
    return value


def _ints(reader: GgufFile, key: str) -> list[int]:
    value = _required(reader, key)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        raise ModelFormatError(f"GGUF {key!r} is not an array of integers")
    ints: list[int] = value.tolist()  # plain ints: the constructor scans them in Python
    return ints


class GgufTokenizer:
    """Tokenizer of a GGUF model: encode/decode text and expose the ids that matter to generation."""

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        *,
        pre: str,
        bos_id: int,
        eos_id: int,
        add_bos: bool = False,
    ) -> None:
        builder = _PRE_TOKENIZERS.get(pre)
        if builder is None:
            supported = ", ".join(sorted(_PRE_TOKENIZERS))
            raise ModelFormatError(
                f"GGUF pre-tokenizer {pre!r} is not supported (supported: {supported}); "
                "its splitting rules have not been verified against llama.cpp"
            )
        if len(tokens) != len(token_types):
            raise ModelFormatError(f"GGUF has {len(tokens)} tokens but {len(token_types)} token types")
        vocab = {text: i for i, text in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ModelFormatError("GGUF vocabulary has duplicate token texts")
        for name, tid in (("bos", bos_id), ("eos", eos_id)):
            if not 0 <= tid < len(tokens):
                raise ModelFormatError(f"GGUF {name} token id {tid} is outside the vocabulary")
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ModelFormatError(f"GGUF merge {merge!r} is not 'left right'")
            pairs.append((left, right))

        tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = builder()
        tok.decoder = decoders.ByteLevel()
        # Control (and unknown) tokens are split out of text before BPE, as llama.cpp does with
        # parse_special=True; user-defined tokens are always matched whole but are ordinary text.
        special = [i for i, t in enumerate(token_types) if t in (_TYPE_CONTROL, _TYPE_UNKNOWN)]
        user = [i for i, t in enumerate(token_types) if t == _TYPE_USER_DEFINED]
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
        tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
        self._tok = tok

        self._special_ids = frozenset(special)
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._add_bos = add_bos
        self._stop_ids = frozenset({eos_id} | {i for i, text in enumerate(tokens) if text in _EOG_TEXTS})
        self._texts = tuple(tokens)
        self._bytes = self._token_bytes_table(tokens, self._special_ids | frozenset(user))

    @staticmethod
    def _token_bytes_table(tokens: Sequence[str], literal: frozenset[int]) -> tuple[bytes, ...]:
        # Built once: str.translate + latin-1 turns byte-level text into raw bytes at C speed.
        table = {cp: chr(b) for cp, b in _byte_decoder().items()}
        out: list[bytes] = []
        for i, text in enumerate(tokens):
            if i in literal:
                out.append(text.encode("utf-8"))  # added tokens are stored as plain text, not byte-level
                continue
            try:
                out.append(text.translate(table).encode("latin-1"))
            except UnicodeEncodeError:
                # A piece outside the byte alphabet (malformed vocab): keep its text, don't fail the model.
                out.append(text.encode("utf-8"))
        return tuple(out)

    @classmethod
    def from_reader(cls, reader: GgufFile) -> GgufTokenizer:
        """Build the tokenizer from an open GGUF file's metadata."""
        model = _required(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelFormatError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
        return cls(
            _strings(reader, "tokenizer.ggml.tokens"),
            _ints(reader, "tokenizer.ggml.token_type"),
            _strings(reader, "tokenizer.ggml.merges"),
            pre=str(reader.get("tokenizer.ggml.pre", "default")),
            bos_id=int(_required(reader, "tokenizer.ggml.bos_token_id")),
            eos_id=int(_required(reader, "tokenizer.ggml.eos_token_id")),
            add_bos=bool(reader.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_gguf(cls, path: str | PathLike[str]) -> GgufTokenizer:
        """Build the tokenizer from a GGUF file."""
        return cls.from_reader(GgufFile(path))

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self._texts)

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence token id."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        """End-of-sequence token id."""
        return self._eos_id

    @property
    def add_bos(self) -> bool:
        """Whether the model expects BOS in front of every prompt (GGUF `add_bos_token`)."""
        return self._add_bos

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: eos plus end-of-turn control tokens present in the vocabulary."""
        return self._stop_ids

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control tokens (never rendered by the incremental detokenizer)."""
        return self._special_ids

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokenize `text`; special-token texts such as `<|im_start|>` become their ids."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        # BOS only if the model asks for it, and never twice (templates that render bos_token have one).
        if add_special and self._add_bos and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Turn ids back into text; invalid UTF-8 becomes U+FFFD."""
        raw = b"".join(self.token_bytes(i) for i in ids if not (skip_special and i in self._special_ids))
        return raw.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes the token stands for (special tokens: their literal text)."""
        if not 0 <= token_id < len(self._bytes):
            raise IndexError(f"token id {token_id} is outside the vocabulary of {len(self._bytes)}")
        return self._bytes[token_id]

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (byte-level form for ordinary tokens)."""
        return self._texts[token_id]
