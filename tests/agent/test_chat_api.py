"""Chat completions through real HTTP against the real agent and model, with the official OpenAI SDK."""

from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.agent_process import RunningAgent

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_with_the_default_model(client: openai.OpenAI, running_agent: RunningAgent) -> None:
    completion = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, temperature=0)
    choice = completion.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert completion.object == "chat.completion"
    assert completion.model == "smollm2-135m-instruct"
    usage = completion.usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # ChatML: template with the default system prompt + the question; the count is exact, not estimated.
    assert usage.prompt_tokens > len("What is the capital of France?".split())


def test_omitted_model_uses_the_loaded_default(running_agent: RunningAgent) -> None:
    from tests.agent_process import http_json

    status, _, body = http_json(
        "POST",
        f"{running_agent.inference_url}/chat/completions",
        {"messages": QUESTION, "temperature": 0, "max_tokens": 40},
    )
    assert status == 200, body
    assert body["model"] == "smollm2-135m-instruct"
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_usage_counts_completion_tokens_exactly(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(messages=QUESTION, model="smollm2-135m-instruct", max_tokens=7)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        messages=QUESTION, model="smollm2-135m-instruct", max_completion_tokens=3
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_streaming_chunks_follow_the_openai_shape(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        messages=QUESTION,
        model="smollm2-135m-instruct",
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finishes) == 1 and finishes[0].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    # Streaming and non-streaming produce the same greedy answer and the same counts.
    whole = client.chat.completions.create(messages=QUESTION, model="smollm2-135m-instruct", temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.usage == usage_chunk.usage


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(messages=QUESTION, model="smollm2-135m-instruct", max_tokens=4, stream=True)
    )
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_the_answer_and_are_never_emitted(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(messages=QUESTION, model="smollm2-135m-instruct", temperature=0)
    text = free.choices[0].message.content or ""
    assert "Paris" in text
    stopped = client.chat.completions.create(
        messages=QUESTION, model="smollm2-135m-instruct", temperature=0, stop=["Paris", "zzz"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index("Paris")]
    assert stopped.usage is not None and free.usage is not None
    assert stopped.usage.completion_tokens < free.usage.completion_tokens
    # The same holds when streaming: the stop string never reaches the client.
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            messages=QUESTION, model="smollm2-135m-instruct", temperature=0, stop="Paris", stream=True
        )
        if c.choices
    )
    assert streamed == text[: text.index("Paris")]


def test_same_seed_same_answer(client: openai.OpenAI) -> None:
    prompt: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write a short poem about the sea."}]

    def sample(seed: int) -> str:
        completion = client.chat.completions.create(
            messages=prompt, model="smollm2-135m-instruct", temperature=1.0, top_p=0.95, seed=seed, max_tokens=40
        )
        return completion.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(99), sample(7)}) > 1
    # OpenAI seeds are signed 64-bit integers; negative ones are as reproducible as any.
    assert sample(-5) == sample(-5)


def test_penalties_change_sampling(client: openai.OpenAI) -> None:
    # Counting repeats digits and commas, which is exactly what the penalties push against.
    prompt: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]

    def answer(
        frequency_penalty: float | openai.Omit = openai.omit, presence_penalty: float | openai.Omit = openai.omit
    ) -> str:
        completion = client.chat.completions.create(
            messages=prompt,
            model="smollm2-135m-instruct",
            temperature=0,
            max_tokens=40,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
        )
        return completion.choices[0].message.content or ""

    plain = answer()
    assert answer(frequency_penalty=2.0) != plain
    assert answer(presence_penalty=2.0) != plain


def test_models_list_and_lookup(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["smollm2-135m-instruct", "all-minilm-l6-v2"]  # the default chat model first
    model = client.models.retrieve("smollm2-135m-instruct")
    assert model.object == "model" and model.owned_by == "thox" and model.created > 0


def test_unknown_model_is_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-9")
    assert info.value.code == "model_not_found"
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(messages=QUESTION, model="gpt-9")
    assert info.value.code == "model_not_found"
