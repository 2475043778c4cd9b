"""Tool calling: checking OpenAI-style tools, the grammar that forces a call, the parsed result.

A tool is an OpenAI function tool::

    {"type": "function", "function": {"name": "get_weather", "description": "...",
                                      "parameters": {JSON Schema of the arguments}}}

``tool_call_grammar`` builds GBNF whose sentences are calls of these tools in
a model family's format (see :mod:`mullama.grammar.tool_formats`), each
call's arguments constrained by its ``parameters`` schema. With
``choice="required"`` or a tool's name the grammar applies from the first
token, so the model must call; with ``choice="auto"`` it comes with triggers
(lazy: the model writes freely until it starts a call, then the call must be
valid). ``parse_tool_calls`` reads a finished answer back into a
:class:`ChatResult`. ``prepare_chat_messages`` shapes a conversation with
tools, assistant ``tool_calls`` and ``tool`` messages for a chat template.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mullama.errors import ToolError
from mullama.grammar.json_schema import json_schema_to_gbnf
from mullama.grammar.tool_formats import FORMATS, WS_RULE, ToolFormat, calls_start, detect_tool_format, scan_calls

__all__ = ["ToolError", "ToolCall", "ChatResult", "ToolGrammar", "validate_tools", "tool_call_grammar",
           "parse_tool_calls", "prepare_chat_messages", "detect_tool_format", "new_call_id",
           "MAX_PARALLEL_CALLS", "TOOL_FORMATS"]

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8      # calls one forced answer may hold when parallel calls are allowed
TOOL_FORMATS = tuple(FORMATS)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for function names
_RULE_DEF = re.compile(r"^([A-Za-z0-9-]+)\s*::=", re.M)
_WORD = re.compile(r"[A-Za-z0-9-]+")


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is JSON text, as OpenAI's ``function.arguments``."""

    name: str
    arguments: str
    id: str = ""

    def parsed_arguments(self) -> Any:
        """The arguments as Python data (``json.JSONDecodeError`` when the text was cut short)."""
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ChatResult:
    """A finished chat answer: its text content (None when it only called tools) and its calls."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class ToolGrammar:
    """GBNF of a tool call and, for ``choice="auto"``, the triggers that make it lazy."""

    grammar: str
    triggers: tuple[str, ...] = ()

    def sampler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~mullama.SamplerParams` (``grammar``, ``grammar_triggers``)."""
        return {"grammar": self.grammar, "grammar_triggers": self.triggers}


# ---------------------------------------------------------------- checking tools


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """``tools`` checked and normalised to OpenAI function tools (``parameters`` defaults to an
    object with no properties; a bare function mapping is wrapped). Raises :class:`ToolError`
    naming the bad tool."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ToolError("'tools' must be a list of function tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' has {len(tools)} entries; at most {MAX_TOOLS} are allowed")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ToolError(f"{where} must be an object with \"type\": \"function\"")
        # a bare function ({"name", "description", "parameters"}), as Hugging Face also takes it
        fn = tool.get("function") if "function" in tool or "name" not in tool else tool
        if not isinstance(fn, Mapping):
            raise ToolError(f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise ToolError(f"{where}: the tool name {name!r} is used twice")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{where}.function.description must be a string")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping) or params.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters must be a JSON Schema of type \"object\"")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ToolError(f"{where}.function.strict must be true or false")
        clean: dict[str, Any] = {"name": name}
        if desc is not None:
            clean["description"] = desc
        clean["parameters"] = json.loads(json.dumps(params))  # a plain copy
        if strict is not None:
            clean["strict"] = strict
        out.append({"type": "function", "function": clean})
    return out


def _tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def check_choice(tools: Sequence[Mapping[str, Any]], choice: Any) -> str:
    """``choice`` ('none', 'auto', 'required', a tool name or OpenAI's named object) as a string:
    the mode or the tool's name. Raises :class:`ToolError` (param ``tool_choice``)."""
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ToolError("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        choice = fn["name"]
        if choice not in _tool_names(tools):
            raise ToolError(f"'tool_choice' names the tool {choice!r}, which is not in 'tools'", "tool_choice")
        return choice
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, str) and choice in _tool_names(tools):
        return choice
    raise ToolError(f"'tool_choice' must be \"none\", \"auto\", \"required\" or a named function, got {choice!r}",
                    "tool_choice")


# ---------------------------------------------------------------- grammar


def prefix_rules(gbnf: str, prefix: str) -> str:
    """``gbnf`` with every rule it defines renamed ``prefix + name`` (references too), so that
    several grammars can live in one. Literals, character classes and comments are left alone."""
    defined = set(_RULE_DEF.findall(gbnf))
    out: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            out.append(gbnf[i:j + 1])
            i = j + 1
        elif c == "#":
            j = gbnf.find("\n", i)
            j = n if j < 0 else j
            out.append(gbnf[i:j])
            i = j
        elif c == "{":  # a repetition count such as {2,5}: digits, not rule names
            j = gbnf.find("}", i)
            j = n - 1 if j < 0 else j
            out.append(gbnf[i:j + 1])
            i = j + 1
        elif (m := _WORD.match(gbnf, i)) is not None:
            word = m.group()
            out.append(prefix + word if word in defined else word)
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _arguments_grammar(tool: Mapping[str, Any], index: int) -> tuple[str, str]:
    """(GBNF of the tool's arguments with prefixed rules, the name of its start rule)."""
    fn = tool["function"]
    try:
        gbnf = json_schema_to_gbnf(fn["parameters"])
    except ValueError as exc:
        raise ToolError(f"tools[{index}] ({fn['name']}): its parameters schema cannot be used: {exc}") from None
    prefix = f"t{index}-"
    return prefix_rules(gbnf, prefix), prefix + "root"


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], format: str = "generic", choice: str = "required",
                      parallel: bool = True) -> ToolGrammar | None:
    """The grammar of a call for ``choice`` (see :func:`check_choice`), or None for 'none'.

    ``format`` is one of :data:`TOOL_FORMATS`. A named choice allows exactly one
    call of that tool; 'required' and 'auto' one call, or up to
    :data:`MAX_PARALLEL_CALLS` when ``parallel`` and the format can hold several.
    """
    tools = validate_tools(tools)
    choice = check_choice(tools, choice)
    if choice == "none":
        return None
    fmt = _format(format)
    named = choice not in ("auto", "required")
    parts, alternatives = [], []
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if named and name != choice:
            continue
        args, start = _arguments_grammar(tool, i)
        parts.append(args)
        parts.append(f"tc-call-{i} ::= {fmt.call_rule(name, start)}")
        alternatives.append(f"tc-call-{i}")
    max_calls = 1 if named or not parallel else MAX_PARALLEL_CALLS
    head = [fmt.root_rule(max_calls), f"tc-call ::= {' | '.join(alternatives)}", WS_RULE]
    grammar = "\n".join(head + parts) + "\n"
    return ToolGrammar(grammar, (fmt.trigger,) if choice == "auto" else ())


def _format(name: str) -> ToolFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ToolError(f"unknown tool-call format {name!r}; known: {', '.join(FORMATS)}") from None


# ---------------------------------------------------------------- parsing


def new_call_id(format: str = "generic") -> str:
    """A fresh call id: ``call_`` and 24 hex digits; Mistral's templates want 9 letters or digits."""
    if format == "mistral":
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


def _decoded_calls(text: str, start: int, fmt: ToolFormat) -> list[tuple[str, str]]:
    """Calls read as whole JSON (any key order), for answers the scanner cannot follow."""
    decoder = json.JSONDecoder()
    found: list[Any] = []
    i = start + (len(fmt.opener) if fmt.opener and fmt.name != "generic" else 0)
    if fmt.name == "hermes":
        for block in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text[start:], re.S):
            try:
                found.append(json.loads(block.strip()))
            except ValueError:
                pass
    else:
        text = text.replace("<|python_tag|>", " ", 1) if fmt.name == "llama3" else text
        while True:
            while i < len(text) and text[i] in " \t\r\n;,":
                i += 1
            try:
                value, i = decoder.raw_decode(text, i)
            except ValueError:
                break
            found.extend(value if isinstance(value, list) else [value])
            if fmt.name != "llama3":
                break
    if fmt.name == "generic":
        found = [c for obj in found if isinstance(obj, Mapping) for c in (obj.get("tool_calls") or [])]
    out = []
    for call in found:
        if isinstance(call, Mapping) and isinstance(call.get("name"), str):
            args = call.get("arguments", call.get("parameters", {}))
            out.append((call["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return out


def parse_tool_calls(text: str, format: str = "generic", ids: Iterable[str] | None = None) -> ChatResult:
    """Read a finished answer in ``format``: the text before the first call is the content (None when
    blank), each call's arguments are the JSON text the model wrote. A call cut short (the answer hit
    its token limit) keeps its partial arguments. ``ids`` name the calls in order (fresh ids else)."""
    fmt = _format(format)
    start = calls_start(text, fmt)
    if start is None:
        return ChatResult(text, [])
    scanned = [(c.name, c.arguments) for c in scan_calls(text, start)]
    if not scanned or not all(_is_json(a) for _, a in scanned):
        decoded = _decoded_calls(text, start, fmt)
        if decoded:
            scanned = decoded
    if not scanned:
        return ChatResult(text, [])
    id_list = list(ids or ())
    calls = [ToolCall(name, args, id_list[k] if k < len(id_list) else new_call_id(format))
             for k, (name, args) in enumerate(scanned)]
    content = text[:start]
    return ChatResult(content if content.strip() else None, calls)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- prompts


def _mistral_id(call_id: Any) -> Any:
    """Mistral's templates insist on ids of 9 letters or digits; others are mapped, stably."""
    if isinstance(call_id, str) and re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    digest = hashlib.sha256(str(call_id).encode()).hexdigest()
    return digest[:9]


def _arguments_value(args: Any) -> Any:
    """Hugging Face templates expect a call's arguments as a mapping, OpenAI sends JSON text."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def generic_tools_prompt(tools: Sequence[Mapping[str, Any]], choice: str = "auto") -> str:
    """The system-prompt text that teaches a template without tool support the generic format."""
    listing = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    text = ("You can call these tools (each with a JSON Schema of its arguments):\n" + listing + "\n"
            'To call tools, reply with only this JSON object: {"tool_calls": [{"name": "<tool name>", '
            '"arguments": {<arguments>}}]}')
    if choice == "auto":
        text += "\nIf no tool is needed, answer normally instead."
    elif choice == "required":
        text += "\nCall one of the tools now."
    elif choice != "none":
        text += f"\nCall the tool {choice} now."
    return text


def prepare_chat_messages(messages: Iterable[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                          format: str, choice: str = "auto") -> tuple[list[dict[str, Any]], list[dict] | None]:
    """(messages, tools) ready for a chat template that speaks ``format``.

    Native formats get Hugging Face's shapes: assistant ``tool_calls`` with
    arguments as mappings, ``tool`` messages as they are, the tools as the
    ``tools`` variable. The generic format gets plain turns instead: the tools
    and the expected JSON described in the system message, past calls written
    as that JSON, tool results as user turns; the template then sees no tools.
    """
    fmt = _format(format)
    out: list[dict[str, Any]] = []
    called: dict[Any, Any] = {}    # call id -> tool name, to label results in the generic format
    for msg in messages:
        msg = dict(msg)
        calls = msg.get("tool_calls")
        for c in calls or ():
            called[c.get("id")] = c.get("function", {}).get("name")
        if fmt.name == "generic":
            if calls:
                listed = [{"name": c.get("function", {}).get("name"),
                           "arguments": _arguments_value(c.get("function", {}).get("arguments"))} for c in calls]
                text = json.dumps({"tool_calls": listed}, ensure_ascii=False)
                msg = {"role": "assistant", "content": ((msg.get("content") or "") + "\n" + text).lstrip()}
            elif msg.get("role") == "tool":
                label = msg.get("name") or called.get(msg.get("tool_call_id")) or "a tool"
                msg = {"role": "user", "content": f"Result of {label}: {msg.get('content') or ''}"}
            msg.pop("tool_calls", None)
            out.append(msg)
            continue
        if calls:
            msg["tool_calls"] = [{"id": _mistral_id(c.get("id")) if fmt.name == "mistral" else c.get("id"),
                                  "type": "function",
                                  "function": {"name": c.get("function", {}).get("name"),
                                               "arguments": _arguments_value(c.get("function", {}).get("arguments"))}}
                                 for c in calls]
        elif "tool_calls" in msg:
            del msg["tool_calls"]  # templates test for the key's presence
        if msg.get("role") == "tool" and fmt.name == "mistral":
            msg["tool_call_id"] = _mistral_id(msg.get("tool_call_id"))
        out.append(msg)
    if fmt.name == "generic":
        if tools and choice != "none":
            note = generic_tools_prompt(tools, choice)
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{note}".lstrip()}
            else:
                out.insert(0, {"role": "system", "content": note})
        return out, None
    return out, (list(tools) if tools and choice != "none" else None)
