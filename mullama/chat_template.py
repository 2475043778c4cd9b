"""Render Jinja chat templates (Hugging Face style) in a sandbox with budgets.

A chat template comes from the model file (``tokenizer.chat_template``) or from
the user, so it is untrusted code. It is rendered only in Jinja's
``ImmutableSandboxedEnvironment`` (no access to ``_``-prefixed attributes, no
mutation of lists or dicts), tightened further:

* source size: at most ``MAX_SOURCE_BYTES``;
* time: every attribute access, call, operator, filter, loop iteration and
  output piece checks a deadline (``time_limit``, 2 s by default), so nested
  loops and recursive macros stop in time;
* memory: every string or container a template builds (operators ``*``,
  ``+``, ``%``, ``~``, ``**``, literals, filter and call results, ``str.replace``,
  ``join``) is sized *before* it is built and refused above the output limit
  (``max_output``, 1 MiB by default, plus twice the size of the messages), and
  all output produced along the way, including inside macros and ``set``
  blocks, is counted;
* only the filters and string methods chat templates use are available.

The globals are those Hugging Face templates expect: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools`` (None),
``raise_exception``, ``strftime_now``, plus any extra keyword arguments. Every
failure (syntax, security, budget, an exception raised by the template)
becomes :class:`~mullama.errors.TemplateError`. Rendering blocks the calling
thread for at most about ``time_limit``; it is thread-safe.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import re
import string
import time
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, _PassArg, pass_context
from jinja2.visitor import NodeTransformer

from mullama.errors import TemplateError

__all__ = ["render_chat_template", "looks_like_jinja", "MAX_SOURCE_BYTES", "MAX_OUTPUT_BYTES", "TIME_LIMIT_S"]

MAX_SOURCE_BYTES = 64 * 1024
MAX_OUTPUT_BYTES = 1 << 20
TIME_LIMIT_S = 2.0
MAX_INT_BITS = 4096          # integers a template computes (``**``, ``*``) stay below 2^4096
MAX_TOJSON_INDENT = 8
EMITTED_FACTOR = 4           # output counted inside macros / set blocks may be counted again outside

# What chat templates use; the rest (center, wordwrap, urlize, pprint, random, ...) is left out
# because it can multiply sizes or is of no use here.
_FILTERS = frozenset("""abs attr batch capitalize count d default dictsort e escape first float format
    groupby indent int items join last length list lower map max min reject rejectattr replace reverse
    round safe select selectattr slice sort string striptags sum title tojson trim truncate unique upper
    wordcount""".split())
_STR_METHODS = frozenset("""capitalize casefold count endswith find index isalnum isalpha isdigit islower
    isspace isupper join lower lstrip partition removeprefix removesuffix replace rfind rindex rpartition
    rsplit rstrip split splitlines startswith strip swapcase title upper""".split())
_DICT_METHODS = frozenset(("get", "items", "keys", "values"))
_SEQ_METHODS = frozenset(("count", "index"))
_PRINTF_WIDTH = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d{4,})|%(?:\([^)]*\))?[-#0 +]*\d*\.(\*|\d{4,})")
_STRFTIME_WIDTH = re.compile(r"%[-_0^#]*\d")


class _Budget:
    """Deadline and size limits of one render (held in a context variable)."""

    def __init__(self, time_limit: float, limit: int) -> None:
        self.deadline = time.monotonic() + time_limit
        self.time_limit = time_limit
        self.limit = limit
        self.emitted = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"the chat template ran for more than {self.time_limit:g} s")

    def size(self, value: Any, what: str = "a value") -> int:
        """Size of ``value`` as text, bounded: raises as soon as it exceeds the limit."""
        if isinstance(value, str):  # the common case, kept cheap
            if len(value) > self.limit:
                self.check(len(value), what)
            return len(value)
        return _weigh(value, self.limit, what, self)[0]

    def check(self, n: int, what: str) -> None:
        if n > self.limit:
            raise TemplateError(f"the chat template would build {what} of about {n} bytes "
                                f"(limit {self.limit})")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("mullama_template_budget",
                                                                          default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # only reachable when Jinja folds constants while compiling
        raise TemplateError("template code ran outside a render")
    budget.tick()
    return budget


def _weigh(value: Any, limit: int, what: str, budget: _Budget | None = None) -> tuple[int, int]:
    """(approximate length of ``str(value)``, nesting depth), walking containers iteratively and
    stopping as soon as the length exceeds ``limit``. A shared sub-list counts each time it appears,
    as it would be printed. Objects that are not plain data (iterators, macros) count 1."""
    total, depth, stack, steps = 0, 0, [(value, 1)], 0
    while stack:
        obj, level = stack.pop()
        steps += 1
        if budget is not None and not steps & 0xFFF:
            budget.tick()
        depth = max(depth, level)
        if isinstance(obj, (str, bytes)):
            total += len(obj)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            total += 2 + len(obj)
            stack.extend((item, level + 1) for item in obj)
        elif isinstance(obj, Mapping):
            total += 2 + 2 * len(obj)
            stack.extend((item, level + 1) for pair in obj.items() for item in pair)
        elif isinstance(obj, range):
            total += 2 + 8 * len(obj)
        elif isinstance(obj, int) and not isinstance(obj, bool):
            total += obj.bit_length() // 3 + 1
        else:
            total += 4
        if total > limit:
            raise TemplateError(f"the chat template would build {what} larger than {limit} bytes")
    return total, depth


# ---------------------------------------------------------------- guards inserted into templates


class _Guards(NodeTransformer):
    """Rewrites the parsed template so that loops, ``~``, literals and output go through guards."""

    def __init__(self, environment: jinja2.Environment) -> None:
        self.environment = environment

    def _wrap(self, node: nodes.Expr, name: str) -> nodes.Expr:
        new = nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)
        new.set_environment(self.environment)
        return new

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = self._wrap(node.iter, "mll_iter")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return self._wrap(nodes.List(node.nodes, lineno=node.lineno), "mll_concat")

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        node = self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":
            return node
        items = node.items if not isinstance(node, nodes.Dict) else [p.value for p in node.items]
        if all(isinstance(i, nodes.Const) for i in items):
            return node  # its size is bounded by the source
        return self._wrap(node, "mll_size")

    visit_List = visit_Tuple = visit_Dict = _literal

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        node = self.generic_visit(node)
        node.nodes = [self._wrap(child, "mll_emit") for child in node.nodes]
        return node


@pass_context
def _iter_guard(context: Any, iterable: Any) -> Iterable[Any]:
    budget = _budget()
    if isinstance(iterable, (str, list, tuple, dict, range)) or not hasattr(iterable, "__iter__"):
        budget.size(iterable, "a loop")

    def guarded() -> Iterable[Any]:
        for item in iterable:
            budget.tick()
            yield item

    return guarded()


@pass_context
def _concat_guard(context: Any, parts: list) -> str:
    budget = _budget()
    texts = [p if isinstance(p, str) else _to_text(budget, p) for p in parts]
    budget.check(sum(map(len, texts)), "a string (~)")
    return "".join(texts)


@pass_context
def _size_guard(context: Any, value: Any) -> Any:
    _budget().size(value, "a literal")
    return value


@pass_context
def _emit_guard(context: Any, value: Any) -> Any:
    """Every output piece of the template (also inside macros and ``{% set %}`` blocks)."""
    budget = _budget()
    n = len(value) if isinstance(value, str) else budget.size(value, "an output value")
    budget.emitted += n
    if budget.emitted > EMITTED_FACTOR * budget.limit:
        raise TemplateError(f"the chat template produced more than {EMITTED_FACTOR * budget.limit} bytes")
    return value


def _to_text(budget: _Budget, value: Any) -> str:
    budget.size(value, "a string")
    return str(value)


# ---------------------------------------------------------------- filters


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` behind the deadline and size checks (and never folded at compile time)."""
    pass_arg = _PassArg.from_obj(func)
    special = _SPECIAL_FILTER_CHECKS.get(name)

    @pass_context
    def guarded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if isinstance(value, Iterator):  # e.g. the output of |map: collect it under the budget
            value = _collect(budget, value, name)
        budget.size(value, f"the input of |{name}")
        for arg in (*args, *kwargs.values()):
            budget.size(arg, f"an argument of |{name}")
            if isinstance(arg, int) and abs(arg) > budget.limit:
                raise TemplateError(f"|{name}: argument {arg} is too large")
        if special is not None:
            special(budget, value, *args, **kwargs)
        if pass_arg is _PassArg.context:
            result = func(context, value, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        if isinstance(result, (str, list, tuple, dict)):
            budget.size(result, f"the result of |{name}")
        return result

    return guarded


def _collect(budget: _Budget, items: Iterator[Any], name: str) -> list[Any]:
    out, total = [], 0
    for item in items:
        budget.tick()
        total += budget.size(item, f"the input of |{name}")
        budget.check(total, f"the input of |{name}")
        out.append(item)
    return out


def _check_join(budget: _Budget, value: Any, sep: str = "", attribute: Any = None) -> None:
    if isinstance(value, (list, tuple, str)):
        budget.check(budget.size(value, "|join") + len(str(sep)) * len(value), "a joined string")


def _check_replace(budget: _Budget, s: Any, old: Any = "", new: Any = "", count: Any = None) -> None:
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    budget.check(len(s) + hits * max(0, len(new) - len(old)), "a replaced string")


def _check_indent(budget: _Budget, s: Any, width: Any = 4, *args: Any, **kwargs: Any) -> None:
    pad = width if isinstance(width, str) else " " * int(width)
    budget.check(len(str(s)) * (1 + len(pad)), "an indented string")


def _check_format(budget: _Budget, fmt: Any, *args: Any, **kwargs: Any) -> None:
    if _PRINTF_WIDTH.search(str(fmt)):
        raise TemplateError("format strings with * or widths of 1000 or more are not allowed")


_SPECIAL_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "join": _check_join, "replace": _check_replace, "indent": _check_indent, "format": _check_format,
}


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Hugging Face's ``tojson`` (no HTML escaping), with a bounded indent."""
    budget = _budget()
    if indent is not None:
        width = len(indent) if isinstance(indent, str) else int(indent)
        if not 0 <= width <= MAX_TOJSON_INDENT:
            raise TemplateError(f"|tojson: indent must be at most {MAX_TOJSON_INDENT}")
        size, depth = _weigh(value, budget.limit, "|tojson", budget)
        budget.check(size * (2 + width * depth), "a JSON string")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys, default=str)


def _sum(iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    """``sum`` of numbers only: summing lists would copy them quadratically."""
    values = list(iterable)
    if attribute is not None or not all(isinstance(v, (int, float)) for v in values) \
            or not isinstance(start, (int, float)):
        raise TemplateError("|sum adds numbers only")
    return sum(values, start)


@pass_context
def _attr(context: Any, obj: Any, name: str) -> Any:
    return context.environment.getattr(obj, name)


# ---------------------------------------------------------------- the environment


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (Hugging Face's assistant-mask marker): a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _SandboxedTemplates(ImmutableSandboxedEnvironment):
    """The immutable sandbox with deadline and size checks on every operation."""

    intercepted_binops = frozenset(("*", "**", "+", "%"))  # also stops them being folded at compile time

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                         extensions=[loopcontrols, _GenerationTag], cache_size=0)
        originals = self.filters
        self.filters = {name: _guard_filter(name, originals[name]) for name in _FILTERS}
        self.filters.update(tojson=_guard_filter("tojson", _tojson), sum=_guard_filter("sum", _sum),
                            attr=_attr, mll_iter=_iter_guard, mll_concat=_concat_guard,
                            mll_size=_size_guard, mll_emit=_emit_guard)
        self.globals = {"range": self.globals["range"], "dict": dict, "namespace": Namespace,
                        "cycler": self.globals["cycler"], "joiner": self.globals["joiner"]}

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Guards(self).visit(super()._parse(source, name, filename))

    def wrap_str_format(self, value: Any) -> Any:
        """``str.format`` / ``format_map`` through Jinja's sandboxed formatter, refusing field
        widths of 1000 or more and computed widths (``{:{}}``), which could build huge strings."""
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
            for _, field, spec, _ in string.Formatter().parse(owner):
                if field is not None and spec and ("{" in spec or re.search(r"\d{4,}", spec)):
                    raise TemplateError(f"format field {{{field}:{spec}}}: widths of 1000 or more are not allowed")
        return super().wrap_str_format(value)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if attr.startswith("_"):
            return False
        if isinstance(obj, str):
            return attr in _STR_METHODS
        if isinstance(obj, Mapping):
            return attr in _DICT_METHODS
        if isinstance(obj, (list, tuple)):
            return attr in _SEQ_METHODS
        if isinstance(obj, (int, float, complex, bytes, bytearray, type)):
            return False  # e.g. int.to_bytes(10**9), or str.ljust reached through a type
        return super().is_safe_attribute(obj, attr, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _budget()
        if isinstance(attribute, str) and attribute.startswith("_"):
            raise SecurityError(f"access to attribute {attribute!r} is not allowed")
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _budget()
        if isinstance(argument, str) and argument.startswith("_"):
            raise SecurityError(f"access to item {argument!r} is not allowed")
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget()
        for arg in (*args, *kwargs.values()):
            budget.size(arg, "a call argument")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name == "replace":
                _check_replace(budget, owner, *args[:2])
            elif name == "join" and args:
                # each item weighs at least 1, so this bounds the separators too
                budget.check(budget.size(args[0], "join") * (1 + len(owner)), "a joined string")
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple, dict)):
            budget.size(result, "a call result")
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                budget.check(budget.size(seq, "a repeated value") * max(n, 0), "a repeated value")
            elif isinstance(left, int) and isinstance(right, int):
                _check_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if abs(left) > 1:
                _check_bits(right * left.bit_length())
        elif operator == "+" and not (isinstance(left, (int, float)) and isinstance(right, (int, float))):
            budget.check(budget.size(left, "a sum") + budget.size(right, "a sum"), "a concatenation (+)")
        elif operator == "%" and isinstance(left, str):
            _check_format(budget, left)
            budget.check(len(left) + budget.size(right, "format arguments"), "a formatted string")
        return super().call_binop(context, operator, left, right)


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateError(f"the chat template would compute an integer of about {bits} bits")


_ENV = _SandboxedTemplates()


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


# ---------------------------------------------------------------- rendering


def _raise_exception(message: Any = "") -> None:
    raise TemplateError(f"the chat template raised an error: {message}")


def _strftime_now(fmt: Any) -> str:
    fmt = str(fmt)
    if len(fmt) > 256 or _STRFTIME_WIDTH.search(fmt):
        raise TemplateError("strftime_now: format too long or with a field width")
    return datetime.datetime.now().strftime(fmt)


def looks_like_jinja(template: str) -> bool:
    """True if ``template`` is Jinja source rather than the name of a built-in template."""
    return "{{" in template or "{%" in template or "{#" in template


def _plain(value: Any, where: str) -> Any:
    """A deep copy of message data as plain JSON-like values (the template cannot reach the caller's objects)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {type(key).__name__}")
            out[key] = _plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} values are not allowed in chat messages")


def render_chat_template(
    template: str,
    messages: Iterable[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: list[Any] | None = None,
    time_limit: float = TIME_LIMIT_S,
    max_output: int = MAX_OUTPUT_BYTES,
    **extra: Any,
) -> str:
    """Render the Jinja chat ``template`` for ``messages`` in the sandbox.

    ``messages`` are mappings with a string ``role``; values must be plain
    data (str, numbers, bool, None, lists, mappings). Extra keyword arguments
    become template globals (e.g. ``enable_thinking=False``). The output may
    be at most ``max_output`` bytes plus twice the size of the messages and
    tools; rendering may take at most ``time_limit`` seconds. Raises
    :class:`TemplateError` for any failure of the template, ``TypeError``
    for malformed messages.
    """
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    if len(template.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        raise TemplateError(f"the chat template is larger than {MAX_SOURCE_BYTES} bytes")
    msgs = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise TypeError(f"message {i} must be a mapping with a string 'role'")
        msgs.append(_plain(msg, f"message {i}"))
    context = {"messages": msgs, "tools": _plain(tools, "tools"), **_plain(extra, "template arguments"),
               "add_generation_prompt": bool(add_generation_prompt), "bos_token": bos_token,
               "eos_token": eos_token, "raise_exception": _raise_exception, "strftime_now": _strftime_now}
    input_size, _ = _weigh([msgs, context["tools"], extra], 1 << 62, "the messages")
    budget = _Budget(time_limit, max_output + 2 * input_size)
    token = _BUDGET.set(budget)
    try:
        template_obj = _compile(template)
        parts: list[str] = []
        size = 0
        chunks = template_obj.generate(context)
        try:
            for chunk in chunks:
                size += len(chunk)
                budget.check(size, "output")
                budget.tick()
                parts.append(chunk)
        finally:
            chunks.close()
        return "".join(parts)
    except TemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template error: {type(exc).__name__}: {exc}") from None
    except (Exception, RecursionError, MemoryError) as exc:  # the template's own bugs, e.g. 1/0
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        _BUDGET.reset(token)
