"""Chat templates: the GGUF's own ChatML template, HF-compatible helpers, errors and the sandbox."""

from __future__ import annotations

import datetime
from pathlib import Path

import gguf
import jinja2
import pytest

from engines.gguf_file import GgufFile
from engines.text import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from tests.engines.text_model import smollm_pipeline


@pytest.fixture
def template() -> ChatTemplate:
    return smollm_pipeline().template


def test_gguf_template_renders_system_user_assistant(template: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ]
    assert template.render(messages) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(messages[:3], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert not template.is_fallback


def test_gguf_template_inserts_its_default_system_prompt(template: ChatTemplate) -> None:
    # SmolLM2's template adds this system message when the conversation does not start with one.
    assert template.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_bos_and_eos_token_variables() -> None:
    t = ChatTemplate("{{ bos_token }}|{{ eos_token }}", bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert t.render([]) == "<|im_start|>|<|im_end|>"


def test_pipeline_passes_bos_and_eos_texts(template: ChatTemplate) -> None:
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_raise_exception_surfaces_as_chat_template_error() -> None:
    t = ChatTemplate(
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError) as info:
        t.render([{"role": "tool", "content": "x"}])
    assert str(info.value) == "Unknown role: tool"
    assert t.render([{"role": "user", "content": "x"}]) == ""


def test_sandbox_refuses_dunder_attribute_access() -> None:
    evil = "{{ ''.__class__.__mro__ }}"
    # Outside a sandbox the template reaches Python's object model...
    assert "object" in jinja2.Environment().from_string(evil).render()
    # ...ours refuses it.
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatTemplate(evil).render([])


def test_sandbox_refuses_mutating_inputs() -> None:
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ChatTemplate("{{ messages.append({'role': 'x'}) }}").render([{"role": "user", "content": "hi"}])


def test_tojson_does_not_html_escape_and_accepts_hf_arguments() -> None:
    t = ChatTemplate("{{ messages[0] | tojson }}|{{ {'b': 1, 'a': [1]} | tojson(indent=None, sort_keys=True) }}")
    rendered = t.render([{"role": "user", "content": "<b>&é</b>"}])
    assert rendered == '{"role": "user", "content": "<b>&é</b>"}|{"a": [1], "b": 1}'


def test_strftime_now_and_whitespace_control_match_hf() -> None:
    t = ChatTemplate("{% if true %}\n  {{ strftime_now('%Y') }}\n{% endif %}\n")
    # trim_blocks eats the newline after a block tag, lstrip_blocks the indentation before one.
    assert t.render([]) == f"  {datetime.date.today().year}\n"


def test_syntax_error_is_a_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_missing_message_field_is_a_chat_template_error(template: ChatTemplate) -> None:
    with pytest.raises(ChatTemplateError, match="render"):
        template.render([{"role": "user"}])


def test_gguf_without_template_falls_back_to_chatml(tmp_path: Path) -> None:
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = ChatTemplate.from_reader(GgufFile(path))
    assert t.is_fallback
    assert t.source == CHATML_TEMPLATE
    assert t.render([{"role": "user", "content": "Hi"}]) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
