"""How each model family writes tool calls: detection, the grammar's wrapper, the parser.

Four formats are known:

- ``generic`` — for templates with no tool support of their own (Gemma 3,
  llama.cpp's built-in templates): the tools are described in the system
  prompt and a call is one JSON object
  ``{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}``.
- ``llama3`` — Llama 3.x: ``{"name": ..., "parameters": {...}}``, optionally
  after ``<|python_tag|>``; one call per turn.
- ``hermes`` — Qwen 2.5 / 3, Hermes: ``<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>``, one block per call.
- ``mistral`` — ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

Each format gives the GBNF wrapper around the calls, the lazy-grammar trigger
(a regex whose first group starts where the grammar takes over) and the text
that opens a call. Parsing is shared: a scanner finds each call's name and the
raw JSON text of its arguments, so a streamed answer and a whole one agree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["FORMATS", "ToolFormat", "detect_tool_format", "scan_calls", "json_value_end", "gbnf_literal"]


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + out.replace("\t", "\\t") + '"'


@dataclass(frozen=True)
class ToolFormat:
    """One family's way of writing calls.

    ``opener``: the text that starts the calls (None: a JSON object at the
    start of the answer, as Llama 3 writes). ``args_key``: the key of the
    arguments object. ``first`` / ``sep`` / ``last``: GBNF around the calls
    (``call`` stands for one call). ``parallel``: whether the family can
    write several calls in one answer.
    """

    name: str
    opener: str | None
    args_key: str
    first: str
    sep: str
    last: str
    trigger: str
    parallel: bool = True

    def call_rule(self, name: str, args_rule: str) -> str:
        """GBNF of one call of the tool ``name`` whose arguments follow ``args_rule``."""
        return (f'"{{" tc-ws "\\"name\\"" tc-ws ":" tc-ws {gbnf_literal(json.dumps(name))} tc-ws "," tc-ws '
                f'{gbnf_literal(json.dumps(self.args_key))} tc-ws ":" tc-ws {args_rule} tc-ws "}}"')

    def root_rule(self, max_calls: int) -> str:
        """The calls: one, or up to ``max_calls`` when the family can write several."""
        more = max_calls - 1 if self.parallel else 0
        rest = f" ({self.sep} tc-call){{0,{more}}}" if more > 0 else ""
        return f"root ::= {self.first} tc-call{rest} {self.last}".replace("  ", " ")


# The wrapper's optional whitespace; the triggers below accept exactly this much.
WS_RULE = 'tc-ws ::= [ \\n]?'

FORMATS: dict[str, ToolFormat] = {
    "generic": ToolFormat(
        "generic", '{"tool_calls"', "arguments",
        first='"{" tc-ws "\\"tool_calls\\"" tc-ws ":" tc-ws "["', sep='"," tc-ws', last='"]" tc-ws "}"',
        trigger=r'^[\s\S]*?(\{[ \n]?"tool_calls")[\s\S]*$'),
    "llama3": ToolFormat(
        "llama3", None, "parameters", first="", sep="", last="",
        trigger=r'^\s*(?:<\|python_tag\|>)?\s*(\{[ \n]?"name")[\s\S]*$', parallel=False),
    "hermes": ToolFormat(
        "hermes", "<tool_call>", "arguments",
        first='"<tool_call>\\n"', sep='"\\n</tool_call>\\n<tool_call>\\n"', last='"\\n</tool_call>"',
        trigger=r'^[\s\S]*?(<tool_call>)[\s\S]*$'),
    "mistral": ToolFormat(
        "mistral", "[TOOL_CALLS]", "arguments",
        first='"[TOOL_CALLS][" tc-ws', sep='"," tc-ws', last='tc-ws "]"',
        trigger=r'^[\s\S]*?(\[TOOL_CALLS\])[\s\S]*$'),
}


def detect_tool_format(template: str | None) -> str:
    """The tool-call format a chat template's source speaks ('generic' when none is recognised).

    ``None`` or a built-in template name (not Jinja) is 'generic'.
    """
    if not template or "tools" not in template:
        return "generic"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and '"parameters"' in template):
        return "llama3"
    return "generic"


# ---------------------------------------------------------------- scanning model output

_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')
_SCALAR = re.compile(r"[^,}\]\s]+")
_LLAMA_START = re.compile(r'\s*(?:<\|python_tag\|>)?\s*(?=\{\s*"(?:name|parameters|arguments)")')


def json_value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value that begins at ``text[start:]`` (after whitespace), or
    None while it is incomplete. Only the nesting and strings are followed, not validity."""
    i, n = start, len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    if i >= n:
        return None
    depth, in_string, escaped = 0, False, False
    if text[i] not in "{[\"":
        m = _SCALAR.match(text, i)  # a number, true, false, null
        return m.end() if m and m.end() < n else None
    while i < n:
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def calls_start(text: str, fmt: ToolFormat) -> int | None:
    """Where the calls begin in ``text``, or None when no call has started (yet)."""
    if fmt.opener is None:
        return 0 if _LLAMA_START.match(text) else None
    if fmt.name == "generic":
        m = re.search(r'\{\s*"tool_calls"', text)
        return m.start() if m else None
    pos = text.find(fmt.opener)
    return pos if pos >= 0 else None


def undecided_tail(text: str, fmt: ToolFormat) -> int:
    """How many characters at the end of ``text`` could still become the start of a call (they are
    held back from the streamed content)."""
    if fmt.opener is None:  # Llama 3: a call is the whole answer, so only its very start is in doubt
        stripped = text.lstrip()
        tag = "<|python_tag|>"
        if not stripped or stripped.startswith("{") or tag.startswith(stripped[:len(tag)]):
            return len(text)
        return 0
    if fmt.name == "generic":
        brace = text.rfind("{")
        if brace >= 0 and '{"tool_calls"'.startswith("".join(text[brace:].split())):
            return len(text) - brace
        return 0
    opener = fmt.opener
    for k in range(min(len(opener) - 1, len(text)), 0, -1):
        if text.endswith(opener[:k]):
            return k
    return 0


@dataclass
class ScannedCall:
    name: str
    arguments: str          # raw JSON text as the model wrote it (partial while incomplete)
    complete: bool


def scan_calls(text: str, start: int) -> list[ScannedCall]:
    """The calls written from ``text[start:]`` on, in order; the last may be incomplete."""
    calls: list[ScannedCall] = []
    pos = start
    while True:
        m = _HEADER.search(text, pos)
        if m is None:
            return calls
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            name = m.group(1)
        value_start = m.end()
        while value_start < len(text) and text[value_start] in " \t\r\n":
            value_start += 1
        end = json_value_end(text, value_start)
        if end is None:
            calls.append(ScannedCall(name, text[value_start:], False))
            return calls
        calls.append(ScannedCall(name, text[value_start:end], True))
        pos = end
