"""Legacy text completions (`/v1/completions`) through real HTTP and the OpenAI SDK."""

from __future__ import annotations

import openai

from engines.text import TextPipeline
from tests.bundled import smollm2_gguf


def test_completion_continues_the_prompt(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert completion.object == "text_completion"
    choice = completion.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason in ("length", "stop")
    assert completion.usage is not None and completion.usage.prompt_tokens == 5


def test_completion_defaults_to_sixteen_tokens(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="smollm2-135m-instruct", prompt="Once upon a time", temperature=0, stop=None
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 16
    if completion.choices[0].finish_reason == "length":
        assert completion.usage.completion_tokens == 16


def test_streamed_completion_matches_the_whole_one(client: openai.OpenAI) -> None:
    model, prompt = "smollm2-135m-instruct", "The capital of France is"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].usage == whole.usage


def test_completion_accepts_token_ids(client: openai.OpenAI) -> None:
    as_text = client.completions.create(
        model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    ids = TextPipeline.from_gguf(smollm2_gguf()).tokenizer.encode("The capital of France is")
    as_ids = client.completions.create(model="smollm2-135m-instruct", prompt=ids, max_tokens=4, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text
