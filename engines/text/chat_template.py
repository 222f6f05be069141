"""Chat templates: the Jinja template a GGUF ships, rendered in a sandbox the way Hugging Face renders it.

Templates come from downloaded model files, so they are untrusted code: they run in Jinja's
`ImmutableSandboxedEnvironment`, which refuses access to dunder attributes and mutation of the inputs.
The environment mirrors `transformers`' (trim_blocks, lstrip_blocks, loopcontrols, a non-escaping `tojson`,
`raise_exception`, `strftime_now`) so templates written for HF render byte-identically here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engines.base import EngineError
from engines.gguf_file import GgufFile

# Used when a GGUF carries no template, as llama.cpp does. ChatML is the most common format among small
# instruct models; a model trained on another format will still answer, but worse, so callers may log it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(EngineError):
    """The chat template refused the messages (its own `raise_exception`) or failed to compile or render."""


class _TemplateRaised(Exception):
    """Carries a template's own `raise_exception` message out of Jinja untouched."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes '<', '>' and '&'; HF's does not, and templates are written for HF.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the bos/eos texts it may refer to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc} (line {exc.lineno})") from exc

    @classmethod
    def from_reader(cls, reader: GgufFile, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """Template from the GGUF's `tokenizer.chat_template`, or ChatML when it has none."""
        value = reader.get("tokenizer.chat_template")
        source = CHATML_TEMPLATE if value is None else str(value)
        return cls(source, bos_token=bos_token, eos_token=eos_token)

    @property
    def is_fallback(self) -> bool:
        """True when this is the built-in ChatML fallback rather than the model's own template."""
        return self.source == CHATML_TEMPLATE

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render messages to the prompt text; `extra` adds template variables (e.g. `tools`)."""
        variables = {
            **extra,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        try:
            return self._template.render(**variables)
        except _TemplateRaised as exc:
            raise ChatTemplateError(str(exc)) from None
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"chat template attempted an unsafe operation: {exc}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            # Templates index messages freely; a message shape they did not expect must become a clear 4xx.
            raise ChatTemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc
