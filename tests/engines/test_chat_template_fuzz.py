"""Fuzzing chat templates: any template source and any messages render, or fail with a ChatTemplateError, in bounds."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from engines.text.chat_template import CHATML_TEMPLATE, MAX_TEMPLATE_CHARS, ChatTemplate, ChatTemplateError
from engines.text.template_sandbox import MAX_INT_BITS, MAX_RENDER_STEPS, MAX_RENDER_TEXT, RenderLimits
from tests.engines.text_model import smollm_pipeline

# Small bounds keep each example fast; the explicit tests below use the real ones.
SMALL = RenderLimits(steps=20_000, text=200_000, seconds=2.0)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <b>&</b>"},
    {"role": "assistant", "content": "Hello."},
]


def render_or_refuse(source: str, messages: Any = MESSAGES, limits: RenderLimits = SMALL, **extra: Any) -> str | None:
    """Compile and render; only ChatTemplateError may come out, and only within the time bound (plus slack)."""
    started = time.monotonic()
    try:
        result: str | None = ChatTemplate(source, limits=limits).render(messages, **extra)
    except ChatTemplateError:
        result = None
    assert time.monotonic() - started < limits.seconds + 1.0
    return result


# --- template sources ------------------------------------------------------------------------------------------

# Pieces of Jinja that, thrown together, make every kind of template: broken, valid, looping, huge, recursive.
_FRAGMENTS = [
    "{{ ",
    " }}",
    "{% ",
    " %}",
    "{#",
    "#}",
    "{%- ",
    " -%}",
    "for x in ",
    "for m in messages",
    "endfor",
    "if ",
    "else",
    "endif",
    "set ",
    "endset",
    "macro f(n) ",
    "endmacro",
    "f(",
    "n",
    "call ",
    "endcall",
    "caller()",
    "recursive",
    "loop(",
    "loop.index",
    "loop.length",
    "x",
    "m",
    "ns",
    "namespace(v=1)",
    "ns.v",
    "messages",
    "messages[0]",
    "m['content']",
    "m.role",
    "bos_token",
    "add_generation_prompt",
    "range(",
    "99999",
    "9",
    "0",
    "-1",
    "2**62",
    "100000",
    "'a'",
    "'%9999d'",
    "'{:>99999}'",
    "''",
    "[",
    "]",
    "(",
    ")",
    ",",
    ":",
    ".",
    "|",
    "~",
    "+",
    "*",
    "**",
    "/",
    "//",
    "%",
    " and ",
    " not ",
    " in ",
    " is ",
    "defined",
    "==",
    "=",
    "upper",
    "join(",
    "center(",
    "replace(",
    "tojson",
    "list",
    "batch(",
    "format(",
    "int",
    "string",
    "length",
    "indent(",
    "wordwrap(",
    "sum",
    "e",
    "first",
    "ljust(",
    "format",
    "items()",
    "__class__",
    "__mro__",
    "mro",
    "raise_exception(",
    "strftime_now(",
    "'%Y'",
    "cycler(",
    "joiner(",
    "dict(",
    "break",
    "continue",
    "\n",
    " ",
    "text",
]
_sources = st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join)


@given(_sources)
@example("{% for x in range(99999) %}{% for y in range(99999) %}{% endfor %}{% endfor %}")
@example("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}")
@example("{{ 'a' * 2**62 }}")
def test_any_template_source_renders_or_is_refused(source: str) -> None:
    render_or_refuse(source)


@given(st.text(max_size=200))
def test_any_text_renders_or_is_refused(source: str) -> None:
    render_or_refuse(source)


# A grammar of well-formed templates, so the fuzzing reaches rendering rather than stopping at syntax errors.
_names = st.sampled_from(["x", "m", "messages", "n", "ns.v", "loop", "bos_token", "s"])
_leaves = st.one_of(
    _names,
    st.integers(-3, 3).map(str),
    st.sampled_from(["99999", "100000", "2**62", "10**30", "-1", "0.5", "1e308"]),
    st.text(alphabet="ab%{}:>9 \n\\", max_size=6).map(repr),
    st.sampled_from(["[]", "[1, 2]", "{}", "{'a': 1}", "(1,)", "none", "true", "namespace(v=1)", "range(3)"]),
)


def _compound(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binop = st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "~", "==", "in", "and"]), inner)
    filt = st.tuples(
        inner,
        st.sampled_from(
            [
                "upper",
                "length",
                "list",
                "string",
                "tojson",
                "tojson(indent=2)",
                "join(', ')",
                "join(x)",
                "center(99999)",
                "replace('a', 'aaaa')",
                "replace('', x)",
                "batch(3)",
                "batch(99999, 'f')",
                "format(x)",
                "int",
                "sum",
                "indent(4)",
                "indent(x)",
                "wordwrap(1)",
                "first",
                "last",
                "reverse",
                "sort",
                "unique",
                "items",
                "trim",
                "default('d')",
                "e",
                "pprint",
                "urlencode",
                "map('upper')",
                "select",
                "selectattr('role')",
                "dictsort",
            ]
        ),
    )
    call = st.tuples(
        inner,
        st.sampled_from(
            [
                ".ljust(99999)",
                ".format(x)",
                ".split()",
                ".join(x)",
                ".replace(x, x)",
                ".expandtabs(99999)",
                ".items()",
                ".get('role')",
                ".upper()",
                "[0]",
                "[1:]",
                "[::-1]",
                "['content']",
                ".content",
                ".__class__",
                ".mro()",
            ]
        ),
    )
    return st.one_of(
        binop.map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        filt.map(lambda t: f"({t[0]}|{t[1]})"),
        call.map(lambda t: f"({t[0]}){t[1]}"),
        st.lists(inner, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
        inner.map(lambda e: f"range({e})"),
        st.tuples(inner, inner).map(lambda t: f"({t[0]} if {t[1]} else none)"),
    )


_expressions = st.recursive(_leaves, _compound, max_leaves=6)


def _statements(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    body = st.lists(inner, max_size=3).map("".join)
    return st.one_of(
        st.tuples(_expressions, body).map(lambda t: f"{{% for x in {t[0]} %}}{t[1]}{{% endfor %}}"),
        st.tuples(_expressions, body).map(
            lambda t: f"{{% for x in {t[0]} recursive %}}{t[1]}{{{{ loop([x]) }}}}{{% endfor %}}"
        ),
        st.tuples(_expressions, body, body).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% else %}}{t[2]}{{% endif %}}"),
        st.tuples(body, _expressions).map(lambda t: f"{{% macro f(n) %}}{t[0]}{{% endmacro %}}{{{{ f({t[1]}) }}}}"),
        st.tuples(_expressions, body).map(lambda t: f"{{% set ns = namespace(v={t[0]}) %}}{t[1]}"),
        body.map(lambda b: f"{{% set s %}}{b}{{% endset %}}{{{{ s ~ s }}}}"),
    )


_outputs = st.one_of(
    _expressions.map(lambda e: f"{{{{ {e} }}}}"),
    _expressions.map(lambda e: f"{{% set ns.v = ns.v ~ {e} %}}"),
    st.sampled_from(["{{ f(n) }}", "{{ f(n ~ n) }}", "{% break %}", "text\n", "{{ raise_exception('no') }}"]),
)
_templates = st.recursive(_outputs, _statements, max_leaves=8).map(
    lambda body: "{% set ns = namespace(v='ab') %}{% set s = 'xy' %}{% set n = 2 %}" + body
)


@given(_templates)
@example("{% set ns = namespace(v='ab') %}{% for x in range(99) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}")
@example("{% macro f(n) %}{{ f(n ~ n) }}{% endmacro %}{{ f('ab') }}")
@example("{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}")
def test_any_well_formed_template_renders_or_is_refused(source: str) -> None:
    render_or_refuse(source)


# --- messages and variables ------------------------------------------------------------------------------------

_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), _values),
                "content": st.one_of(st.text(max_size=40), _values),
            }
        ),
        st.dictionaries(st.text(max_size=8), _values, max_size=3),
        _values,
    ),
    max_size=4,
)


@pytest.fixture(scope="module")
def smollm_template_source() -> str:
    return smollm_pipeline().template.source


@given(messages=_messages, generation=st.booleans(), tools=_values)
def test_real_templates_render_any_messages_or_refuse_them(
    smollm_template_source: str, messages: Any, generation: bool, tools: Any
) -> None:
    for source in (smollm_template_source, CHATML_TEMPLATE):
        started = time.monotonic()
        try:
            ChatTemplate(source, limits=SMALL).render(messages, add_generation_prompt=generation, tools=tools)
        except ChatTemplateError:
            pass
        assert time.monotonic() - started < 3.0


# --- regressions: each used to escape as another exception, hang, or allocate without bound ---------------------


@pytest.mark.parametrize(
    ("source", "match"),
    [
        # ZeroDivisionError, OverflowError and RuntimeError escaped render() as themselves.
        ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
        ("{{ range(10**6) }}", "OverflowError: Range too big"),
        ("{{ 2.0 ** 10000 }}", "OverflowError"),
        ("{{ cycler().next() }}", "RuntimeError: at least one item has to be provided"),
        # RecursionError escaped render().
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
        ("{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}", "recursed too deeply"),
        # A 10 GB string, list or byte string was allocated (MemoryError, or the box swapping).
        ("{{ 'a' * 10**10 }}", r"operator '\*'\) of about 10000000000 characters"),
        ("{{ [1] * 10**10 }}", r"operator '\*'\) of about 80000000000 characters"),  # 8 a list item
        ("{{ 'x'.ljust(10**10) }}", r"ljust\(10000000000\)"),
        ("{{ 'x'.zfill(10**10) }}", r"zfill\(10000000000\)"),
        ("{{ (1).to_bytes(10**10, 'big') }}", r"to_bytes\(10000000000\)"),
        ("{{ '{:>9999999999}'.format(1) }}", "formatted field of about 9999999999"),
        ("{{ '{:>{w}}'.format(1, w=10**10) }}", "formatted field of about 10000000000"),
        ("{{ '%999999999d' % 1 }}", r"operator '%'\)"),
        ("{{ '%*d' % (999999999, 1) }}", r"operator '%'\)"),
        ("{{ '%999999999d'.encode() % 1 }}", r"operator '%'\)"),
        ("{{ '%999999999d'|format(1) }}", "filter 'format'"),
        ("{{ 'a'|center(10**10) }}", "filter 'center'"),
        ("{{ ('a' * 1000)|replace('', 'b' * 100000) }}", "filter 'replace'"),
        ("{{ ('a' * 1000).replace('', 'b' * 100000) }}", r"text \(replace\)"),
        ("{{ ('\t' * 1000).expandtabs(1000000) }}", r"text \(expandtabs\)"),
        ("{{ range(100000)|join('x' * 1000) }}", "filter 'join'"),
        ("{{ ('x' * 2000).join(range(20000)|map('string')) }}", r"text \(join\)"),
        # Joining the characters of a string: 10**4 separators of 10**4 characters.
        ("{{ ('a' * 10000)|join('x' * 10000) }}", "filter 'join'"),
        ("{{ ('x' * 10000).join('a' * 10000) }}", r"text \(join\)"),
        ("{{ [1]|batch(10**10, 'f')|list }}", "filter 'batch'"),
        # A new list for every character of a 10**7-character string.
        ("{{ ('a' * 10**7)|batch(1)|list|length }}", "filter 'batch'"),
        ("{{ messages|tojson(indent=10**10) }}", "tojson indent of 10000000000"),
        ("{{ ('a\\n' * 1000)|indent('x' * 10**6) }}", "filter 'indent'"),
        ("{{ strftime_now('%c' * 10**6) }}", "strftime_now format of 2000000 characters"),
        # Doubling a string 60 times: 2**61 characters.
        (
            "{% set ns = namespace(v='ab') %}{% for i in range(60) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}",
            r"text \(~\)",
        ),
        # Nested literals: a list that prints as 10**12 characters without any operator building it.
        (
            "{% set a = 'x' * 10**6 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
            "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}{{ d }}",
            "builds output",
        ),
        (f"{{{{ 3 ** {MAX_INT_BITS} }}}}", r"operator '\*\*'\)"),
        # lipsum(10**6) generated text for minutes.
        ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    ],
)
def test_hostile_template_is_refused_within_bounds(source: str, match: str) -> None:
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(ChatTemplateError, match=match):
            ChatTemplate(source).render(MESSAGES)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 2.0
    assert peak < 50 * 2**20, f"refusing the template took {peak} bytes"


@pytest.mark.parametrize(
    "source",
    [
        # Both looped for hours: 10**10 and 10**15 iterations.
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% for k in r %}"
        "{% endfor %}{% endfor %}{% endfor %}",
        # 2**60 macro calls.
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        # 10**10 cheap comparisons.
        "{% set r = range(100000)|list %}{% for i in r %}{% if i in r %}{% endif %}{% endfor %}",
    ],
)
def test_endless_work_ends_with_a_clear_error(source: str) -> None:
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match=f"more than ({MAX_RENDER_STEPS} steps|2 s)"):
        ChatTemplate(source).render(MESSAGES)
    assert time.monotonic() - started < 2.0 + 1.0


@pytest.mark.parametrize(
    ("source", "match"),
    [
        # SyntaxError (Python's limit of 20 nested blocks) and RecursionError escaped the constructor.
        ("{% for a in range(1) %}" * 25 + "{% endfor %}" * 25, "does not compile: SyntaxError"),
        ("{{ " + "(" * 300 + "1" + ")" * 300 + " }}", "does not compile: RecursionError"),
        ("{{ " + "[" * 3000 + "]" * 3000 + " }}", "does not compile"),
        ("x" * (MAX_TEMPLATE_CHARS + 1), f"the most this server compiles is {MAX_TEMPLATE_CHARS}"),
    ],
)
def test_uncompilable_template_is_a_chat_template_error(source: str, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate(source)


@pytest.mark.parametrize("messages", [[1], ["role"], [None], [[("role", "user")], 5]])
def test_messages_that_are_not_mappings_are_a_chat_template_error(messages: Any) -> None:
    # dict(m) ran before the try: TypeError or ValueError escaped render().
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate(CHATML_TEMPLATE).render(messages)


def test_long_error_messages_are_cut() -> None:
    with pytest.raises(ChatTemplateError) as caught:
        ChatTemplate("{{ raise_exception('no' * 100000) }}").render([])
    assert len(str(caught.value)) < 600 and str(caught.value).endswith("(200000 characters)")


def test_ordinary_work_fits_easily_within_the_bounds() -> None:
    # A 200-message conversation of 10 KB messages through the real template: far from any bound.
    messages = [{"role": "user" if i % 2 else "assistant", "content": "word " * 2000} for i in range(200)]
    template = smollm_pipeline().template
    started = time.monotonic()
    prompt = template.render(messages)
    assert time.monotonic() - started < 1.0
    assert len(prompt) > 200 * 10_000 and len(prompt) < MAX_RENDER_TEXT
