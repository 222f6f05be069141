"""The sandbox chat templates render in: Hugging Face's Jinja environment, bounded by a per-render budget.

Templates come from downloaded model files, so they are untrusted code: they run in Jinja's
`ImmutableSandboxedEnvironment`, which refuses access to dunder attributes and mutation of the inputs.
The environment mirrors `transformers`' (trim_blocks, lstrip_blocks, loopcontrols, a non-escaping `tojson`,
`raise_exception`, `strftime_now`) so templates written for HF render byte-identically here.

The sandbox stops a template from escaping; `RenderLimits` stop it from taking the box down instead. Every loop
iteration, call, operator and output piece is a step, and every string or list a template builds is charged by
its size, checked before it is built wherever the size is known in advance (`'x' * n`, `'%9999999d'`,
`s.ljust(n)`, `sep.join(items)`, ...). A render that runs out of steps, text or time raises LimitExceeded, which
says which bound it hit; a template's own `raise_exception` raises TemplateRaised. `engines.text.chat_template`
turns both, and anything else a template can make go wrong, into a ChatTemplateError.
"""

from __future__ import annotations

import json
import re
import time
import types
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, Sequence, ValuesView
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from string import Formatter
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

# A render that needs more than these is broken or hostile: real templates take a few hundred steps and produce a
# prompt smaller than any model's context window (the default request is at most 4 MiB).
MAX_RENDER_STEPS = 1_000_000
MAX_RENDER_TEXT = 32 * 2**20  # characters built during one render, output included; a list item counts as 8
MAX_RENDER_SECONDS = 2.0
# Integers a template computes (token counts, indices) are small; this stops `3 ** 10**8` before it is computed.
MAX_INT_BITS = 4096
# tojson's indent, and strftime_now's format: far more than any template uses, far less than a memory problem.
MAX_JSON_INDENT = 64
MAX_STRFTIME_FORMAT = 256


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render: steps, characters built (output included) and wall-clock seconds."""

    steps: int = MAX_RENDER_STEPS
    text: int = MAX_RENDER_TEXT
    seconds: float = MAX_RENDER_SECONDS


class TemplateRaised(Exception):
    """Carries a template's own `raise_exception` message out of Jinja untouched."""


class LimitExceeded(Exception):
    """A render ran past one of its RenderLimits; the message says which one."""


class _Budget:
    """What is left of one render's RenderLimits."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps = limits.steps
        self.room = limits.text
        self.deadline = time.monotonic() + limits.seconds

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise LimitExceeded(
                f"chat template took more than {self.limits.steps} steps (loop iterations, calls "
                "and operations); it loops without end or does far too much work"
            )
        if not self.steps & 63 and time.monotonic() > self.deadline:  # the clock costs more than a step
            raise LimitExceeded(f"chat template took more than {self.limits.seconds:g} s to render")

    def check(self, size: int, what: str = "text", *details: object) -> None:
        """Refuse, before building it, something `size` characters (or items) long that does not fit."""
        if size > self.room:  # `what` is formatted with `details` only here: checks are on the hot path
            raise LimitExceeded(
                f"chat template builds {what.format(*details)} of about {size} characters, "
                f"past the {self.limits.text} one render may build in all"
            )

    def charge(self, size: int, what: str = "text", *details: object) -> None:
        if size > self.room:
            self.check(size, what, *details)
        self.room -= size


# The render in progress on this thread (renders run in worker threads). Unset while a template compiles: Jinja
# folds constant expressions then, and those are bounded by the template's own size.
_BUDGET: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _size(value: Any, limit: int) -> int:
    """About how many characters str(value) makes, counted only until past `limit` (iterative: inputs nest)."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, Undefined):
            continue
        elif isinstance(item, Namespace):
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
            total += 12
        elif isinstance(item, (Mapping, KeysView, ValuesView, ItemsView, list, tuple, set, frozenset)):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.items() if isinstance(item, Mapping) else item)
        else:  # floats, macros, loops, ranges...: their str() is short
            total += 32
    return total


# What one item of a list, tuple, dict or set is charged, in characters: about what its slot costs in memory.
_ITEM = 8
_CONTAINERS = (list, tuple, dict, set, frozenset)


def _allocated(value: Any) -> int:
    """Characters a freshly built value holds itself, its items counted at _ITEM each (not what they hold)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, _CONTAINERS):
        return _ITEM * len(value)
    if isinstance(value, Namespace):
        return _ITEM * len(object.__getattribute__(value, "_Namespace__attrs"))
    return 0


def _int_too_big(value: Any) -> bool:
    return isinstance(value, int) and value.bit_length() > MAX_INT_BITS


def _replace_size(s: str, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return len(str(s))
    hits = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _join_size(sep: Any, items: Sequence[Any], limit: int) -> int:
    total = _size(sep, limit) * max(0, len(items) - 1)
    for item in items:
        if total > limit:
            break
        total += _size(item, limit)
    return total


# printf-style conversions: optional (key), flags, width, precision, length modifier, conversion.
_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+)?)?[hlL]?([a-zA-Z%])")


def _percent_size(fmt: str, args: Any, limit: int) -> int:
    """Upper bound of len(fmt % args), worked out before formatting (a width can ask for gigabytes)."""
    positional = list(args) if isinstance(args, tuple) else [args]
    mapping = args if isinstance(args, Mapping) else None
    total = len(fmt)
    for match in _PERCENT.finditer(fmt):
        key, width, precision, conversion = match.groups()
        field = 0
        for spec in (width, precision):
            if spec == "*":
                star = positional.pop(0) if positional else 0
                field = max(field, star if isinstance(star, int) else 0)
            elif spec is not None:
                field = max(field, int(spec) if len(spec) < 12 else limit + 1)
        if conversion == "%":
            continue
        if key is not None and mapping is not None:
            arg = mapping.get(key)
        else:
            arg = positional.pop(0) if positional else None
        scale = 4 if conversion in "ra" else 1
        field = max(field + (320 if conversion in "eEfFgG" else 0), scale * _size(arg, limit))
        total += field
        if total > limit:
            break
    return total


def _spec_width(spec: str) -> int:
    """The largest width or precision a format spec ("{:>80}") asks for."""
    numbers = re.findall(r"\d+", spec)
    return max((int(n) if len(n) < 12 else 10**12 for n in numbers), default=0)


class _BoundedFormatterMixin(Formatter):
    """str.format in the sandbox, each field checked against the budget before it is formatted."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.step()
            budget.check(max(_spec_width(format_spec), _size(value, budget.room)), "a formatted field")
        result = super().format_field(value, format_spec)
        if budget is not None:
            budget.charge(len(result))
        return result


class _BoundedFormatter(_BoundedFormatterMixin, SandboxedFormatter): ...


class _BoundedEscapeFormatter(_BoundedFormatterMixin, SandboxedEscapeFormatter): ...


def _str_method_size(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> int:
    """Upper bound of what a str (or bytes) method builds, for the methods that can build far more than they get."""
    owner, name = method.__self__, method.__name__
    arg = args[0] if args else None
    if name == "join":
        return _join_size(owner, arg if isinstance(arg, (list, tuple, str)) else [], limit)
    if name == "replace" and len(args) >= 2:
        return _replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    if name == "expandtabs":
        tabsize = arg if isinstance(arg, int) else kwargs.get("tabsize", 8)
        tabs: int = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        return len(owner) + tabs * max(0, int(tabsize))
    if name == "translate" and isinstance(arg, Mapping):
        longest = max((len(v) for v in arg.values() if isinstance(v, (str, bytes))), default=1)
        return len(owner) * max(1, longest)
    return len(owner)


# Filters that turn their input into text, with how many characters they may build per character of it, and the
# ones whose arguments multiply it; the others build at most what they are given and are charged afterwards.
_TEXT_FILTERS = {
    "string": 1,
    "safe": 1,
    "title": 3,
    "upper": 3,
    "lower": 3,
    "capitalize": 3,
    "trim": 1,
    "striptags": 1,
    "wordcount": 1,
    "tojson": 1,
    "list": 1,
    "urlencode": 3,
    "pprint": 8,
    "escape": 6,
    "e": 6,
    "forceescape": 6,
    "xmlattr": 6,
    "urlize": 10,
    "truncate": 1,
}


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _filter_size(name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any], limit: int) -> int:
    """Upper bound of what filter `name` builds from `value`, worked out before it runs."""
    if name == "center":
        width = _arg(args, kwargs, 0, "width", 80)
        return max(_size(value, limit), width if isinstance(width, int) else 0)
    if name == "indent":
        width = _arg(args, kwargs, 0, "width", 4)
        text = str(value) if _size(value, limit) <= limit else ""
        per_line = width if isinstance(width, int) else len(str(width))
        return len(text) + (text.count("\n") + 1) * max(0, per_line) if text else limit + 1
    if name == "wordwrap":
        width = _arg(args, kwargs, 0, "width", 79)
        wrap = _arg(args, kwargs, 2, "wrapstring", None) or "\n"
        n = _size(value, limit)
        return n + (n // max(1, width if isinstance(width, int) else 1) + 1) * len(str(wrap))
    if name == "replace" and len(args) >= 2:
        return _replace_size(value, args[0], args[1], _arg(args, kwargs, 2, "count", None))
    if name == "join":
        return _join_size(_arg(args, kwargs, 0, "d", ""), value if isinstance(value, (list, tuple, str)) else [], limit)
    if name == "format":
        return _percent_size(str(value), kwargs or args, limit) if isinstance(value, str) else _size(value, limit)
    if name in ("batch", "slice"):  # a new list per group, and `fill_with` up to the group size
        n = _size(value, limit)
        count = _arg(args, kwargs, 0, "linecount" if name == "batch" else "slices", 1)
        count = count if isinstance(count, int) and count > 0 else 1
        groups = n // count + 1 if name == "batch" else count
        return _ITEM * (n + count + 8 * groups)
    if name == "sum" and isinstance(_arg(args, kwargs, 1, "start", 0), (list, tuple)):
        # Summing lists copies the growing result once per item.
        items = value if isinstance(value, (list, tuple)) else []
        return len(items) * sum(len(i) for i in items if isinstance(i, (list, tuple)))
    factor = _TEXT_FILTERS.get(name)
    return 0 if factor is None else factor * _size(value, limit)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a filter so it counts as a step, is refused when it would build too much, and is charged for its result."""
    passes = getattr(getattr(func, "jinja_pass_arg", None), "name", None)

    # pass_context also keeps Jinja from running the filter at compile time, outside any render's budget.
    @jinja2.pass_context
    def bounded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.step()
            if name == "join" and not isinstance(value, (str, list, tuple, Undefined)):
                value = list(value)  # a generator can be measured only once, so it is measured as a list
            budget.check(_filter_size(name, value, args, kwargs, budget.room), "text (filter {!r})", name)
        if passes == "context":
            result = func(context, value, *args, **kwargs)
        elif passes == "eval_context":
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif passes == "environment":
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        if budget is not None:
            budget.charge(_allocated(result), "text (filter {!r})", name)
        return result

    bounded.__name__ = getattr(func, "__name__", name)
    return bounded


def _counted(iterable: Any, budget: _Budget) -> Iterator[Any]:
    for item in iterable:
        budget.step()
        yield item


@jinja2.pass_context
def _each(_context: Context, iterable: Any) -> Any:
    # A generator, so `loop.length` makes Jinja list what is left of it, a step per item like any iteration.
    budget = _BUDGET.get()
    return iterable if budget is None else _counted(iterable, budget)


@jinja2.pass_context
def _emit(_context: Context, value: Any) -> Any:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        budget.charge(_size(value, budget.room), "output")
    return value


@jinja2.pass_context
def _concat(_context: Context, parts: list[Any]) -> str:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        budget.charge(_join_size("", parts, budget.room), "text (~)")
    return "".join(map(str, parts))


@jinja2.pass_context
def _literal(_context: Context, value: Any) -> Any:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()
        budget.charge(_allocated(value))
    return value


_HOOKS = {"__thox_each": _each, "__thox_emit": _emit, "__thox_concat": _concat, "__thox_literal": _literal}


def _hook(name: str, node: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so loops, output, `~` and literals go through the budget hooks."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _hook("__thox_each", node.iter)  # type: ignore[arg-type]  # an Expr: what follows "in"
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        # Template text too: a loop body's text is output again on every iteration.
        self.generic_visit(node)
        node.nodes = [_hook("__thox_emit", child) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _hook("__thox_concat", nodes.List(node.nodes, lineno=node.lineno))

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return _hook("__thox_literal", node)

    visit_List = visit_Dict = _literal

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        return self._literal(node) if node.ctx == "load" else self.generic_visit(node)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """HF's sandbox, with every operator, call and slice counted and checked against the render's budget."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            return self.binop_table[operator](left, right)
        budget.step()
        if operator in ("*", "**", "%"):  # the others build at most as much as they are given
            budget.check(self._binop_size(operator, left, right, budget.room), "a value (operator {!r})", operator)
        result = self.binop_table[operator](left, right)
        if _int_too_big(result):
            raise LimitExceeded(f"chat template computed an integer of more than {MAX_INT_BITS} bits")
        budget.charge(_allocated(result), "a value (operator {!r})", operator)
        return result

    @staticmethod
    def _binop_size(operator: str, left: Any, right: Any, limit: int) -> int:
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            if ints:
                return 0 if left.bit_length() + right.bit_length() <= MAX_INT_BITS else limit + 1
            count, seq = (right, left) if isinstance(right, int) else (left, right)
            return max(0, count) * _allocated(seq) if isinstance(count, int) else 0
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            return 0 if left.bit_length() * right <= MAX_INT_BITS else limit + 1
        if operator == "%" and isinstance(left, (str, bytes)):
            return _percent_size(left if isinstance(left, str) else left.decode("latin-1"), right, limit)
        return 0

    def getitem(self, obj: Any, argument: Any) -> Any:
        result = super().getitem(obj, argument)
        budget = _BUDGET.get()
        if budget is not None and isinstance(argument, slice):
            budget.step()
            budget.charge(_allocated(result), "a slice")
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.step()
            owner = getattr(__obj, "__self__", None)
            if isinstance(__obj, types.BuiltinMethodType) and isinstance(owner, (str, bytes, int)):
                # Integer arguments of these methods are widths and lengths: 'x'.ljust(n), (1).to_bytes(n).
                for arg in (*args, *kwargs.values()):
                    if isinstance(arg, int) and arg > budget.room:
                        budget.check(arg, "a value ({}({}))", __obj.__name__, arg)
                if isinstance(owner, (str, bytes)):
                    if __obj.__name__ == "join" and args and not isinstance(args[0], (list, tuple)):
                        args = (list(args[0]), *args[1:])
                    budget.check(_str_method_size(__obj, args, kwargs, budget.room), "text ({})", __obj.__name__)
        result = super().call(__context, __obj, *args, **kwargs)
        if budget is not None:
            if _int_too_big(result):
                raise LimitExceeded(f"chat template computed an integer of more than {MAX_INT_BITS} bits")
            budget.charge(_allocated(result))
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # As the sandbox's own, with formatters that check each field against the budget before formatting it.
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        owner = value.__self__
        if not isinstance(owner, str):
            return None
        formatter: SandboxedFormatter = (
            _BoundedEscapeFormatter(self, escape=owner.escape) if isinstance(owner, Markup) else _BoundedFormatter(self)
        )
        is_map = value.__name__ == "format_map"
        str_type = type(owner)

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                return str_type(formatter.vformat(owner, (), args[0]))
            return str_type(formatter.vformat(owner, args, kwargs))

        return bounded_format


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes '<', '>' and '&'; HF's does not, and templates are written for HF.
    width = len(indent) if isinstance(indent, str) else (indent or 0)
    if width > MAX_JSON_INDENT:
        raise LimitExceeded(f"tojson indent of {width} is more than the {MAX_JSON_INDENT} a chat template may use")
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    # Built chunk by chunk so a value that grows past the budget as JSON (long separators) stops midway.
    budget = _BUDGET.get()
    built = 0
    pieces: list[str] = []
    for chunk in encoder.iterencode(value):
        built += len(chunk)
        if budget is not None:
            budget.check(built, "text (tojson)")
        pieces.append(chunk)
    return "".join(pieces)


def _strftime_now(fmt: str) -> str:
    if len(fmt) > MAX_STRFTIME_FORMAT:
        raise LimitExceeded(f"strftime_now format of {len(fmt)} characters; at most {MAX_STRFTIME_FORMAT}")
    return datetime.now().strftime(fmt)


def sandbox_environment() -> BoundedSandbox:
    """A fresh bounded sandbox with HF's options, filters and globals; every filter counted against the budget."""
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, func) for name, func in env.filters.items()}
    env.filters.update(_HOOKS)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    # lipsum exists to generate text in bulk; no chat template uses it.
    del env.globals["lipsum"]
    return env


def compile_bounded(env: BoundedSandbox, source: str) -> jinja2.Template:
    """Parse and compile untrusted template source with loops, output, `~` and literals routed through the budget.

    Raises what Jinja raises for a bad template (TemplateSyntaxError, or Python's own compiler limits).
    """
    tree = env.parse(source)
    return env.from_string(_Instrument().visit(tree))


@contextmanager
def render_budget(limits: RenderLimits) -> Iterator[None]:
    """Charge everything the templates render inside this block (on this thread) to one fresh budget of `limits`."""
    token = _BUDGET.set(_Budget(limits))
    try:
        yield
    finally:
        _BUDGET.reset(token)
