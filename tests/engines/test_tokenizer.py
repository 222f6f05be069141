"""GGUF tokenizer: token ids identical to llama.cpp's, exact round trips, special and stop ids.

The expected ids below were recorded once from real llama.cpp (llama-cpp-python 0.3.36, built from source with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF") with:

    <venv>/bin/python -c 'import json, sys; from llama_cpp import Llama; \
        llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False); \
        print(json.dumps([llm.tokenize(t.encode(), add_bos=False, special=True) \
                          for t in json.load(sys.stdin)]))' \
        <path of SmolLM2-135M-Instruct.Q4_1.gguf> < cases.json

where cases.json is the JSON list of the texts in PARITY. (A further 3,026 fuzzed strings and source files
matched too; they are not kept here.)
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from engines.base import ModelFormatError
from engines.gguf_file import GgufFile
from engines.text import GgufTokenizer
from tests.engines.text_model import smollm_pipeline

PARITY: list[tuple[str, list[int]]] = [
    ("Größe 東京 😀 naïve café",
     [27302, 7466, 34878, 85, 17097, 247, 126, 16736, 122, 40303, 218, 15486, 46494, 37366]),
    ("In 2024, 12345 + 678 = 13023",
     [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 1232, 216, 38, 39, 40, 446, 216, 33, 35,
      32, 34, 35]),
    ("½ cup, x² + ٣ Ⅻ 2.5e-3",
     [16738, 7118, 28, 1792, 19133, 1232, 216, 164, 113, 216, 173, 223, 121, 216, 34, 30, 37, 85, 29,
      35]),
    ('def add(a, b):\n    """Add two numbers."""\n    if a > 0:\n        return a + b  # sum\n'
     "\treturn None\n\nprint(add(1, 2))\n",
     [1604, 803, 24, 81, 28, 278, 727, 472, 1620, 7684, 827, 2966, 7996, 472, 585, 253, 2986, 216, 32,
      42, 448, 1003, 253, 1232, 278, 216, 907, 2028, 198, 197, 5406, 1943, 198, 198, 3272, 24, 2104,
      24, 33, 28, 216, 34, 1292, 198]),
    ("<|im_start|>user\nHi!<|im_end|>\n",
     [1, 4093, 198, 26843, 17, 2, 198]),
    ("<|im_end|><|im_start|>x<|endoftext|>y <|im_start|",
     [2, 1, 104, 0, 105, 2067, 108, 306, 79, 3738, 108]),
    ("I'm sure they'll don't won't YOU'LL it's",
     [57, 5248, 2090, 502, 3060, 1326, 982, 3763, 982, 12246, 23, 16421, 357, 506]),
    ("  leading and trailing   ",
     [216, 2899, 284, 35079, 333]),
    ("multiple    spaces\t\ttabs\n\n\nnewlines  \n  end ",
     [30404, 333, 5600, 197, 197, 100, 7366, 1116, 198, 2241, 5110, 256, 3805, 1112, 216]),
    (" ",
     [216]),
    ("",
     []),
    ("<|im_start|>system\n"
     "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
     "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
     [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
      19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198]),
]  # fmt: skip


@pytest.fixture
def tokenizer() -> GgufTokenizer:
    return smollm_pipeline().tokenizer


@pytest.mark.parametrize(("text", "expected"), PARITY, ids=[f"case{i}" for i in range(len(PARITY))])
def test_ids_match_llama_cpp(tokenizer: GgufTokenizer, text: str, expected: list[int]) -> None:
    assert tokenizer.encode(text) == expected


@pytest.mark.parametrize(("text", "expected"), PARITY, ids=[f"case{i}" for i in range(len(PARITY))])
def test_decode_round_trips(tokenizer: GgufTokenizer, text: str, expected: list[int]) -> None:
    assert tokenizer.decode(expected) == text


def test_token_bytes_are_raw_bytes(tokenizer: GgufTokenizer) -> None:
    assert tokenizer.token_bytes(216) == b" "  # stored as the byte-level "Ġ"
    assert tokenizer.token_bytes(198) == b"\n"
    assert tokenizer.token_bytes(tokenizer.bos_id) == b"<|im_start|>"
    # Part of an emoji: not valid UTF-8 on its own.
    emoji = tokenizer.encode("😀")
    assert len(emoji) > 1
    assert b"".join(tokenizer.token_bytes(i) for i in emoji) == "😀".encode()
    with pytest.raises(IndexError):
        tokenizer.token_bytes(tokenizer.vocab_size)


def test_model_ids(tokenizer: GgufTokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert not tokenizer.add_bos
    assert tokenizer.special_ids == frozenset(range(17))
    # eos is <|im_end|>; <|endoftext|> also ends generation, as in llama.cpp.
    assert tokenizer.stop_ids == frozenset({0, 2})


def test_decode_can_skip_special_tokens(tokenizer: GgufTokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nHi!<|im_end|>\n")
    assert tokenizer.decode(ids, skip_special=True) == "user\nHi!\n"


def tiny(*, pre: str = "smollm", bos_id: int = 0, eos_id: int = 0, add_bos: bool = True) -> GgufTokenizer:
    """A four-token vocabulary: enough to exercise BOS handling and refusals without the real model."""
    return GgufTokenizer(
        ["<s>", "a", "b", "ab"], [3, 1, 1, 1], ["a b"], pre=pre, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos
    )


def test_bos_is_added_when_the_model_asks_and_never_twice() -> None:
    tok = tiny()
    assert tok.encode("ab") == [0, 3]
    assert tok.encode("<s>ab") == [0, 3]
    assert tok.encode("ab", add_special=False) == [3]


def test_unverified_pre_tokenizer_is_refused_by_name() -> None:
    with pytest.raises(ModelFormatError, match="'llama-bpe'"):
        tiny(pre="llama-bpe")


def test_non_bpe_tokenizer_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match="'llama'"):
        GgufTokenizer.from_reader(GgufFile(path))
