"""Chat templates: the Jinja template a GGUF ships, rendered in a sandbox the way Hugging Face renders it.

Templates come from downloaded model files, so they are untrusted code. `engines.text.template_sandbox` compiles
and renders them in HF's environment, sandboxed and bounded by `RenderLimits`; this module picks the template
(the model's own or ChatML), feeds it the messages, and turns whatever goes wrong (a bound hit, the template's
own `raise_exception`, an unsafe operation, endless recursion, any other failure) into a ChatTemplateError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from engines.base import EngineError
from engines.gguf_file import GgufFile
from engines.text.template_sandbox import (
    LimitExceeded,
    RenderLimits,
    TemplateRaised,
    compile_bounded,
    render_budget,
    sandbox_environment,
)

# Used when a GGUF carries no template, as llama.cpp does. ChatML is the most common format among small
# instruct models; a model trained on another format will still answer, but worse, so callers may log it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The largest chat templates in the wild (tool-calling ones) are about 20 KB; compiling megabytes of template would
# itself take seconds, so a template beyond this is refused when the model is loaded.
MAX_TEMPLATE_CHARS = 256 * 1024
# A template's own raise_exception message, and any other error text, is cut to this in the ChatTemplateError.
MAX_ERROR_MESSAGE = 500


class ChatTemplateError(EngineError):
    """The chat template refused the messages (its own `raise_exception`) or failed to compile or render."""


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_MESSAGE else text[:MAX_ERROR_MESSAGE] + f"... ({len(text)} characters)"


class ChatTemplate:
    """A compiled chat template plus the bos/eos texts it may refer to."""

    def __init__(
        self, source: str, *, bos_token: str = "", eos_token: str = "", limits: RenderLimits | None = None
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.limits = limits or RenderLimits()
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(
                f"chat template is {len(source)} characters; the most this server compiles is {MAX_TEMPLATE_CHARS}"
            )
        env = sandbox_environment()
        try:
            self._template = compile_bounded(env, source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not compile: {_short(str(exc))} (line {exc.lineno})") from exc
        except Exception as exc:  # untrusted source: Python's compiler limits, nesting too deep to parse, ...
            raise ChatTemplateError(
                f"chat template does not compile: {type(exc).__name__}: {_short(str(exc))}"
            ) from exc

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
        with render_budget(self.limits):
            try:
                variables = {
                    **extra,
                    "messages": [dict(m) for m in messages],
                    "add_generation_prompt": add_generation_prompt,
                    "bos_token": self.bos_token,
                    "eos_token": self.eos_token,
                }
                return self._template.render(**variables)
            except TemplateRaised as exc:
                raise ChatTemplateError(_short(str(exc))) from None
            except LimitExceeded as exc:
                raise ChatTemplateError(str(exc)) from None
            except jinja2.exceptions.SecurityError as exc:
                raise ChatTemplateError(f"chat template attempted an unsafe operation: {_short(str(exc))}") from None
            except RecursionError:
                raise ChatTemplateError(
                    "chat template recursed too deeply (a macro or recursive loop without end)"
                ) from None
            except Exception as exc:  # untrusted code: whatever it makes fail must become a clear 4xx
                raise ChatTemplateError(
                    f"chat template failed to render: {type(exc).__name__}: {_short(str(exc))}"
                ) from exc
