"""Fixed SmolLM2 prompts as token ids (from a BPE tokenizer built on the GGUF vocab and merges)."""

from __future__ import annotations

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CHATML_SHORT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]

# The same question rendered by the GGUF's chat template, which adds SmolLM2's default system prompt.
CHATML_WITH_SYSTEM = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
    8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
]  # fmt: skip

EOS = 2


def detokenize(vocab: list[str], ids: list[int]) -> str:
    """Good enough for assertions: join byte-level BPE tokens and map the space/newline glyphs back."""
    return "".join(vocab[i] for i in ids).replace("\u0120", " ").replace("\u010a", "\n")
