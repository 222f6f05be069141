"""Text processing around a model: tokenizer, chat template, incremental detokenizer and stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

from engines.gguf_file import GgufFile
from engines.text.chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from engines.text.detokenizer import IncrementalDetokenizer
from engines.text.stop import StopMatcher, StopResult
from engines.text.tokenizer import GgufTokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplate",
    "ChatTemplateError",
    "GgufTokenizer",
    "IncrementalDetokenizer",
    "StopMatcher",
    "StopResult",
    "TextPipeline",
]


@dataclass(frozen=True)
class TextPipeline:
    """Everything needed to turn chat messages into token ids and token ids back into text for one model."""

    tokenizer: GgufTokenizer
    template: ChatTemplate

    @classmethod
    def from_reader(cls, reader: GgufFile) -> TextPipeline:
        """Build from an already open GGUF file (shares its parsed metadata with other users)."""
        tokenizer = GgufTokenizer.from_reader(reader)
        template = ChatTemplate.from_reader(
            reader,
            bos_token=tokenizer.token_text(tokenizer.bos_id),
            eos_token=tokenizer.token_text(tokenizer.eos_id),
        )
        return cls(tokenizer, template)

    @classmethod
    def from_gguf(cls, path: str | PathLike[str]) -> TextPipeline:
        """Build from a GGUF file, parsing its metadata once."""
        return cls.from_reader(GgufFile(path))

    def detokenizer(self) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one completion."""
        return IncrementalDetokenizer(self.tokenizer)
