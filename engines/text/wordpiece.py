"""BERT WordPiece tokenizer from a model's tokenizer.json, without the silent truncation the file asks for.

Hugging Face tokenizer.json files often enable truncation (all-MiniLM-L6-v2's cuts at 128 tokens) and fixed
padding. Either would change what we embed without telling the caller, so both are switched off: `encode`
returns every token, and the API compares the count against `max_tokens` and refuses over-long inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from engines.base import ModelFormatError
from engines.bert_config import BertConfig

TOKENIZER_FILE = "tokenizer.json"


class WordPieceTokenizer:
    """Text -> token ids for a BERT encoder, [CLS] and [SEP] included, with the model's input limit."""

    def __init__(self, tokenizer: Tokenizer, *, max_tokens: int) -> None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for [CLS] and [SEP], not {max_tokens}")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        # The post-processor adds the special tokens the encoder was trained with; without it every vector drifts.
        special = tokenizer.encode("").ids
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        if cls_id is None or sep_id is None or special != [cls_id, sep_id]:
            raise ModelFormatError(
                f"tokenizer does not wrap text in [CLS] ... [SEP] (empty text encodes to {special}); "
                "only BERT-style tokenizers are supported"
            )
        self._tok = tokenizer
        self._max_tokens = max_tokens
        self._cls_id, self._sep_id = cls_id, sep_id

    @classmethod
    def from_file(cls, path: Path, *, max_tokens: int) -> WordPieceTokenizer:
        """Load a tokenizer.json; `max_tokens` is the limit the caller enforces."""
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception for unreadable or malformed files
            raise ModelFormatError(f"{path}: not a usable tokenizer.json ({exc})") from exc
        return cls(tokenizer, max_tokens=max_tokens)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> WordPieceTokenizer:
        """Load the model's tokenizer.json with the limit its config files give (see `BertConfig.max_tokens`)."""
        return cls.from_file(model_dir / TOKENIZER_FILE, max_tokens=BertConfig.from_model_dir(model_dir).max_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def max_tokens(self) -> int:
        """Longest input the model takes, special tokens included; longer inputs must be refused, not cut."""
        return self._max_tokens

    @property
    def cls_id(self) -> int:
        """Id of [CLS], the first token of every encoding."""
        return self._cls_id

    @property
    def sep_id(self) -> int:
        """Id of [SEP], the last token of every encoding."""
        return self._sep_id

    def encode(self, text: str) -> list[int]:
        """All token ids of `text` as the model expects them: [CLS] ... [SEP]; never truncated."""
        ids: list[int] = self._tok.encode(text).ids
        return ids

    def wrap(self, ids: Sequence[int]) -> list[int]:
        """Raw token ids (an API client's token-array input) as the model expects them: [CLS] ids [SEP]."""
        return [self._cls_id, *ids, self._sep_id]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (tokenizers splits the work over its own threads)."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]
